"""The vectorised COCO AP bootstrap (reports.coco_bootstrap) against pycocotools itself:
the full image list, and resampled lists (each copy of an image a new image with its own
annotation ids) given to ``COCOeval`` through ``trainers.evaluation.coco``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO

from reports import bootstrap, coco_bootstrap
from trainers.evaluation.coco import evaluate_coco_results, predictions_to_coco_results
from trainers.evaluation.detections_io import load_detections, save_detections

N_LABELS = 8  # label 7: detections only; label 8: crowd regions only (both without AP)


def random_coco(n_images, rng, crowded_images=(), quality=0.7):
    """Ground truth (some crowd regions) and detections near it plus clutter, on a 0.5-pixel
    grid (float32-exact); every score distinct (no ties); ``crowded_images`` get > 100
    detections of one label."""
    detections, annotations = [], []
    for i in range(n_images):
        m = int(rng.integers(0, 6))
        xy = np.round(rng.uniform(0, 200, (m, 2)) * 2) / 2
        boxes = np.hstack([xy, xy + np.round(rng.uniform(4, 80, (m, 2)) * 2) / 2])
        labels = rng.integers(1, 7, m)
        crowd = rng.random(m) < 0.15
        if rng.random() < 0.2:  # a crowd-only category
            xy = np.round(rng.uniform(0, 150, (1, 2)))
            boxes = np.vstack([boxes, np.hstack([xy, xy + 60])])
            labels, crowd = np.append(labels, 8), np.append(crowd, True)
        found = rng.random(len(labels)) < quality
        near = boxes[found] + rng.normal(0, 4, (found.sum(), 4))
        near_labels = labels[found]
        n_clutter = int(rng.integers(0, 12))
        cxy = rng.uniform(0, 200, (n_clutter, 2))
        clutter = np.hstack([cxy, cxy + rng.uniform(3, 60, (n_clutter, 2))])
        clutter_labels = rng.integers(1, 8, n_clutter)
        parts, part_labels = [near, clutter], [near_labels, clutter_labels]
        if len(labels):  # a duplicate of the first object, and one exact copy
            parts += [boxes[:1] + 1.0, boxes[:1]]
            part_labels += [labels[:1], labels[:1]]
        if i in crowded_images:  # > 100 of one label, some near a ground truth
            centre = boxes[0] if len(labels) else np.array([50.0, 50, 90, 90])
            parts.append(centre + rng.normal(0, 6, (130, 4)))
            part_labels.append(np.full(130, labels[0] if len(labels) else 1))
        if rng.random() < 0.1:  # a degenerate box (negative width: area < 0)
            parts.append(np.array([[50.0, 50, 40, 70]]))
            part_labels.append(np.array([int(rng.integers(1, 7))]))
        dets = np.vstack(parts)
        detections.append({"boxes": dets.astype(np.float32), "labels": np.concatenate(part_labels),
                           "scores": np.zeros(len(dets), np.float32)})
        annotations.append({"boxes": boxes.astype(np.float32), "labels": labels,
                            "difficult": np.zeros(len(labels), bool), "iscrowd": crowd})
    total = sum(len(d["labels"]) for d in detections)
    scores = rng.permutation(np.linspace(0.001, 0.999, total)).astype(np.float32)
    assert np.unique(scores).size == total
    start = 0
    for d in detections:
        d["scores"] = scores[start:start + len(d["labels"])]
        start += len(d["labels"])
    return detections, annotations


def pycocotools_ap(detections, annotations, order=None) -> float:
    """COCOeval bbox stats[0] of the images ``order`` (default all), each listed image a new
    COCO image (ids 1..), annotations numbered 1.. in that order."""
    order = range(len(annotations)) if order is None else order
    images, anns, predictions = [], [], []
    for new_id, i in enumerate(order, start=1):
        images.append({"id": new_id, "width": 300, "height": 300, "file_name": f"{new_id}.jpg"})
        gt = annotations[i]
        for box, label, crowd in zip(np.asarray(gt["boxes"], np.float64), gt["labels"], gt["iscrowd"]):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": new_id, "category_id": int(label),
                         "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(crowd)})
        predictions.append({"image_id": new_id, **detections[i]})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k, "name": str(k)} for k in range(1, N_LABELS + 1)]}
    coco.createIndex()
    results = predictions_to_coco_results(predictions, list(range(N_LABELS + 1)))
    evaluation = evaluate_coco_results(coco, results, "bbox", [img["id"] for img in images])
    return float(evaluation.stats[0])


def test_full_set_equals_cocoeval_and_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    dets, gts = random_coco(60, rng, crowded_images=(3, 17))
    assert max(np.bincount(d["labels"]).max() for d in dets) > 100
    save_detections(tmp_path / "d.npz", dets, gts, dataset="coco")
    loaded = load_detections(tmp_path / "d.npz")
    assert loaded["meta"]["dataset"] == "coco"
    assert np.array_equal(np.concatenate([a["iscrowd"] for a in loaded["annotations"]]),
                          np.concatenate([a["iscrowd"] for a in gts]))
    prepared = coco_bootstrap.prepare_coco(loaded["detections"], loaded["annotations"])
    assert 7 not in prepared.labels and 8 not in prepared.labels
    value = coco_bootstrap.weighted_aps(prepared, np.ones((1, 60), np.int64))[0]
    expected = pycocotools_ap(dets, gts)
    assert 0.05 < expected < 0.95
    assert value == pytest.approx(expected, abs=1e-12)


def test_resamples_equal_cocoeval_on_the_resampled_list():
    rng = np.random.default_rng(1)
    n = 40
    dets, gts = random_coco(n, rng, crowded_images=(5,))
    prepared = coco_bootstrap.prepare_coco(dets, gts)
    draws = np.random.default_rng(2).integers(0, n, size=(6, n))
    draws[0] = 5  # one image drawn n times (its > 100 detections, n copies)
    weights = np.stack([np.bincount(d, minlength=n) for d in draws])
    fast = coco_bootstrap.weighted_aps(prepared, weights)
    slow = [pycocotools_ap(dets, gts, np.sort(d)) for d in draws]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-9)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(1, 12), quality=st.floats(0.0, 1.0))
def test_property_resample_equals_cocoeval(seed, n, quality):
    rng = np.random.default_rng(seed)
    dets, gts = random_coco(n, rng, crowded_images=(0,) if rng.random() < 0.3 else (), quality=quality)
    prepared = coco_bootstrap.prepare_coco(dets, gts)
    draw = np.sort(rng.integers(0, n, n))
    fast = coco_bootstrap.weighted_aps(prepared, np.bincount(draw, minlength=n)[None, :])[0]
    assert fast == pytest.approx(pycocotools_ap(dets, gts, draw), abs=1e-9)


def test_paired_delta_on_coco_files(tmp_path):
    rng = np.random.default_rng(4)
    dets_a, gts = random_coco(80, rng, quality=0.5)
    dets_b, _ = random_coco(80, np.random.default_rng(4), quality=0.5)  # same ground truth
    # a better trial: the baseline's detections plus every regular ground truth, top-scored
    better = [{"boxes": np.vstack([g["boxes"][~g["iscrowd"]], d["boxes"]]),
               "scores": np.concatenate([1.0 + np.arange((~g["iscrowd"]).sum(), dtype=np.float32)[::-1],
                                         d["scores"]]).astype(np.float32),
               "labels": np.concatenate([g["labels"][~g["iscrowd"]], d["labels"]])}
              for d, g in zip(dets_a, gts)]
    save_detections(tmp_path / "a.npz", dets_a, gts, dataset="coco")
    save_detections(tmp_path / "b.npz", better, gts, dataset="coco")
    a, b = load_detections(tmp_path / "a.npz"), load_detections(tmp_path / "b.npz")
    same = bootstrap.paired_delta(a, a, n_resamples=50)
    assert same.delta == 0 and same.low == 0 and same.high == 0
    result = bootstrap.paired_delta(a, b, n_resamples=200, chunk=64)
    expected = (pycocotools_ap(better, gts) - pycocotools_ap(dets_a, gts)) * 100
    assert result.delta == pytest.approx(expected, abs=1e-9)
    assert result.baseline == pytest.approx(pycocotools_ap(dets_a, gts) * 100, abs=1e-9)
    assert result.excludes_zero and 0 < result.low <= result.delta <= result.high
    # the resampled deltas are those of pycocotools on the same draws
    weights = bootstrap.resample_weights(80, 3, np.random.default_rng(9))
    pa = coco_bootstrap.prepare_coco(a["detections"], a["annotations"])
    pb = coco_bootstrap.prepare_coco(b["detections"], b["annotations"])
    fast = coco_bootstrap.weighted_aps(pb, weights) - coco_bootstrap.weighted_aps(pa, weights)
    drawn = [np.repeat(np.arange(80), w) for w in weights]  # each image as often as drawn, in order
    slow = [pycocotools_ap(better, gts, d) - pycocotools_ap(dets_a, gts, d) for d in drawn]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-9)
    # a crowd flag changed: not the same test set
    changed = [dict(g) for g in gts]
    first = next(i for i, g in enumerate(gts) if len(g["labels"]))
    changed[first]["iscrowd"] = ~changed[first]["iscrowd"]
    save_detections(tmp_path / "c.npz", dets_b, changed, dataset="coco")
    with pytest.raises(Exception, match="iscrowd"):
        bootstrap.paired_delta(a, load_detections(tmp_path / "c.npz"), n_resamples=10)


def test_cocoeval_matching_rules_on_hand_made_cases():
    """Exact IoU ties between two ground truths (COCOeval keeps the later one), a regular
    ground truth preferred to a better-overlapping crowd region, a crowd region matched by
    several detections, a category without ground truth: against COCOeval, full set and
    resampled."""
    box = np.array([[0, 0, 10, 10]], np.float32)
    tie = {  # det 0 overlaps both ground truths with IoU 100/120; det 1 only the second one
        "detections": {"boxes": np.array([[0, 0, 10, 10], [0, -2, 10, 8]], np.float32),
                       "scores": np.array([0.9, 0.8], np.float32), "labels": np.array([1, 1])},
        "annotations": {"boxes": np.array([[0, 0, 10, 12], [0, -2, 10, 10]], np.float32),
                        "labels": np.array([1, 1]), "iscrowd": np.array([False, False])}}
    # det 0 (first by score): IoU 0.822 with the regular box, 0.9025 with the crowd region
    # (intersection / its area): taken as a TP up to .80, ignored above; then det 1 (IoU 1
    # with the regular box) is ignored up to .80 (crowd IoU .81) and a TP above; det 2
    # exactly on a second crowd region and det 3 on the first: ignored; det 4's label
    # has no ground truth; det 5 (between 0 and 1 by score) a false positive
    crowd = {
        "detections": {"boxes": np.vstack([box + 0.5, box, box + 50, box + 1, box + 51, box + 100]),
                       "scores": np.array([0.99, 0.7, 0.95, 0.6, 0.5, 0.8], np.float32),
                       "labels": np.array([2, 2, 2, 2, 3, 2])},
        "annotations": {"boxes": np.vstack([box, box + 1, box + 50]),
                        "labels": np.array([2, 2, 2]), "iscrowd": np.array([False, True, True])}}
    empty = {"detections": {"boxes": box, "scores": np.array([0.3], np.float32), "labels": np.array([1])},
             "annotations": {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, int),
                             "iscrowd": np.zeros(0, bool)}}
    images = [tie, crowd, empty]
    dets = [i["detections"] for i in images]
    gts = [{**i["annotations"], "difficult": np.zeros(len(i["annotations"]["labels"]), bool)} for i in images]
    prepared = coco_bootstrap.prepare_coco(dets, gts)
    iou = coco_bootstrap.box_iou_xywh(coco_bootstrap._xywh(tie["detections"]["boxes"][:1]),
                                      coco_bootstrap._xywh(tie["annotations"]["boxes"]), np.zeros(2, bool))
    assert iou[0, 0] == iou[0, 1] == 100 / 120
    iou = coco_bootstrap.box_iou_xywh(coco_bootstrap._xywh(crowd["detections"]["boxes"][:1]),
                                      coco_bootstrap._xywh(crowd["annotations"]["boxes"][:2]), np.array([False, True]))
    assert iou[0, 0] == pytest.approx(90.25 / 109.75) and iou[0, 1] == pytest.approx(0.9025)
    for draw in ([0, 1, 2], [0, 0, 1], [1, 1, 2], [2, 2, 2], [0, 2, 2]):
        weights = np.bincount(draw, minlength=3)[None, :]
        expected = pycocotools_ap(dets, gts, np.sort(draw))
        assert coco_bootstrap.weighted_aps(prepared, weights)[0] == pytest.approx(expected, abs=1e-12)
    # with the later ground truth taken by det 0, det 1 is a false positive: AP of label 1 < 1
    assert pycocotools_ap(dets, gts, [0]) < 0.99


def test_engine_path_on_unrounded_coco_coordinates(tmp_path):
    """Real COCO boxes have two decimals (not float32-exact): the engine's path
    (``coco_evaluate`` for val/ap; ``coco_ground_truth`` -> ``save_detections``) keeps the
    file's xywh, and the bootstrap's AP of the stored file is COCOeval's to 1e-12."""
    from trainers.evaluation.coco import coco_evaluate, coco_ground_truth

    rng = np.random.default_rng(11)
    images, anns, predictions = [], [], []
    for image_id in range(1, 31):
        images.append({"id": image_id, "width": 640, "height": 640, "file_name": f"{image_id}.jpg"})
        m = int(rng.integers(1, 8))
        xywh = np.round(np.hstack([rng.uniform(100, 500, (m, 2)), rng.uniform(3, 120, (m, 2))]), 2)
        cats = rng.choice([1, 3, 5, 9], m)
        for box, cat in zip(xywh, cats):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(cat), "bbox": box.tolist(),
                         "area": float(box[2] * box[3]), "iscrowd": int(rng.random() < 0.1)})
        xyxy = np.hstack([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]])
        near = xyxy + rng.normal(0, 1, xyxy.shape) * xywh[:, 2:].repeat(2, 1) * 0.1
        clutter = np.hstack([rng.uniform(100, 500, (5, 2)), rng.uniform(100, 500, (5, 2)) + 50])
        labels = np.concatenate([[{1: 1, 3: 2, 5: 3, 9: 4}[c] for c in cats], rng.integers(1, 5, 5)])
        predictions.append({"image_id": image_id, "boxes": np.vstack([near, clutter]).astype(np.float32),
                            "scores": rng.random(m + 5).astype(np.float32), "labels": labels})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k, "name": str(k)} for k in (1, 3, 5, 9)]}
    coco.createIndex()
    logged = coco_evaluate(coco, predictions, [0, 1, 3, 5, 9])["ap"]
    truth = coco_ground_truth(coco, [p["image_id"] for p in predictions], {1: 1, 3: 2, 5: 3, 9: 4})
    save_detections(tmp_path / "d.npz", [{k: p[k] for k in ("boxes", "scores", "labels")} for p in predictions],
                    truth, dataset="coco")
    loaded = load_detections(tmp_path / "d.npz")
    stored = np.concatenate([a["xywh"] for a in loaded["annotations"]])
    assert np.array_equal(stored, np.array([a["bbox"] for a in anns]))
    rounded = coco_bootstrap._xywh(np.concatenate([a["boxes"] for a in loaded["annotations"]]))
    assert not np.array_equal(rounded, stored)  # what float32 xyxy alone would give
    prepared = coco_bootstrap.prepare_coco(loaded["detections"], loaded["annotations"])
    assert 0.05 < logged < 0.95
    assert coco_bootstrap.weighted_aps(prepared, np.ones((1, 30), np.int64))[0] == pytest.approx(logged, abs=1e-12)
