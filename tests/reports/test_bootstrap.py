"""The vectorised paired bootstrap (reports.bootstrap) against a plain one: resample the
image list, evaluate it with the slow loop VOC reference, take the difference."""

from __future__ import annotations

import numpy as np
import pytest

from reports import bootstrap
from trainers.evaluation.detections_io import load_detections, save_detections
from trainers.evaluation.voc import voc_map
from trainers.evaluation.voc_reference import voc_map_reference


def synthetic(n_images, n_classes, rng, quality):
    """Ground truth, and detections near it (jittered) plus clutter; no equal scores."""
    detections, annotations = [], []
    for _ in range(n_images):
        m = int(rng.integers(0, 4))
        xy = rng.uniform(0, 80, (m, 2))
        boxes = np.hstack([xy, xy + rng.uniform(10, 40, (m, 2))])
        labels = rng.integers(0, n_classes, m)
        difficult = rng.random(m) < 0.1
        found = rng.random(m) < quality
        jitter = boxes[found] + rng.normal(0, 3, (found.sum(), 4))
        clutter_n = int(rng.integers(0, 4))
        cxy = rng.uniform(0, 80, (clutter_n, 2))
        clutter = np.hstack([cxy, cxy + rng.uniform(5, 30, (clutter_n, 2))])
        dets = np.vstack([jitter, boxes[found][: 1] + 1.0, clutter]) if found.any() else clutter
        det_labels = np.concatenate([labels[found], labels[found][:1], rng.integers(0, n_classes, clutter_n)]) \
            if found.any() else rng.integers(0, n_classes, clutter_n)
        scores = rng.random(len(dets))
        detections.append({"boxes": dets.astype(np.float32), "scores": scores.astype(np.float32),
                           "labels": det_labels})
        annotations.append({"boxes": boxes.astype(np.float32), "labels": labels, "difficult": difficult})
    return detections, annotations


def plain_paired(a, b, draws, method):
    """The definition: per resample, evaluate both resampled lists (images in ascending
    order, copies side by side) with the loop reference and subtract."""
    deltas = []
    for draw in draws:
        order = np.sort(draw)
        gts = [a["annotations"][i] for i in order]
        map_a = voc_map_reference([a["detections"][i] for i in order], gts, method=method)["map"]
        map_b = voc_map_reference([b["detections"][i] for i in order], gts, method=method)["map"]
        deltas.append(map_b - map_a)
    return np.array(deltas)


@pytest.mark.parametrize("method", ["11point", "area"])
def test_vectorised_resamples_equal_plain_reference(tmp_path, method):
    rng = np.random.default_rng(3)
    dets_a, gts = synthetic(40, 4, rng, quality=0.6)
    # a second trial on the same images (its own detections, the first one's ground truth)
    dets_b, _ = synthetic(40, 4, np.random.default_rng(4), quality=0.8)
    save_detections(tmp_path / "a.npz", dets_a, gts, method=method)
    save_detections(tmp_path / "b.npz", dets_b, gts, method=method)
    a, b = load_detections(tmp_path / "a.npz"), load_detections(tmp_path / "b.npz")
    # the file round-trips: the same mAP as the in-memory lists
    assert voc_map(a["detections"], a["annotations"], method=method)["map"] == \
        voc_map(dets_a, gts, method=method)["map"]

    prepared_a = bootstrap.prepare(a["detections"], a["annotations"], method=method)
    prepared_b = bootstrap.prepare(b["detections"], b["annotations"], method=method)
    ones = np.ones((1, 40), dtype=np.int32)
    assert bootstrap.weighted_maps(prepared_a, ones)[0] == pytest.approx(
        voc_map_reference(dets_a, gts, method=method)["map"], abs=1e-12)

    draws = np.random.default_rng(7).integers(0, 40, size=(25, 40))
    weights = np.stack([np.bincount(d, minlength=40) for d in draws]).astype(np.int32)
    fast = bootstrap.weighted_maps(prepared_b, weights) - bootstrap.weighted_maps(prepared_a, weights)
    np.testing.assert_allclose(fast, plain_paired(a, b, draws, method), rtol=0, atol=1e-12)


def test_paired_delta_interval_and_same_image_check(tmp_path):
    rng = np.random.default_rng(0)
    dets_a, gts = synthetic(120, 3, rng, quality=0.5)
    dets_b, _ = synthetic(120, 3, np.random.default_rng(1), quality=0.5)
    a = {"detections": dets_a, "annotations": gts, "image_ids": np.arange(120).astype(str), "meta": {}}
    same = bootstrap.paired_delta(a, a, n_resamples=200)
    assert same.delta == 0 and same.low == 0 and same.high == 0 and not same.excludes_zero
    # a better detector: every detection of the baseline plus a perfect copy of each ground truth
    better = [{"boxes": np.vstack([g["boxes"].reshape(-1, 4), d["boxes"]]),
               "scores": np.concatenate([np.full(len(g["labels"]), 2.0), d["scores"]]),
               "labels": np.concatenate([g["labels"], d["labels"]])} for d, g in zip(dets_a, gts)]
    b = {**a, "detections": better}
    result = bootstrap.paired_delta(a, b, n_resamples=300)
    expected = (voc_map(better, gts)["map"] - voc_map(dets_a, gts)["map"]) * 100
    assert result.delta == pytest.approx(expected, abs=1e-9)
    assert result.low > 0 and result.excludes_zero and result.low <= result.delta <= result.high
    other = {**a, "image_ids": np.arange(1, 121).astype(str), "detections": dets_b}
    with pytest.raises(Exception, match="different images"):
        bootstrap.paired_delta(a, other, n_resamples=10)


def test_welch_matches_the_formula():
    a, b = [74.0, 74.5, 74.2], [75.1, 75.9, 75.0, 75.4]
    ma, mb = np.mean(a), np.mean(b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    t = (mb - ma) / np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    from scipy.stats import t as student
    assert bootstrap.welch(a, b) == pytest.approx(2 * student.sf(abs(t), dof), rel=1e-10)
    assert np.isnan(bootstrap.welch([1.0], b))
