"""Claim: a paired bootstrap of a COCO-val-sized bbox AP delta (5,000 images, 80
categories, ~7 ground truths and 100 detections per image, 1,000 resamples) is fast when
vectorised (``reports.coco_bootstrap``: match once, weighted cumulative sums per
resample), against running pycocotools' ``COCOeval`` on every resampled image list
(naive: the definition, each copy of an image a new image).

The naive side is timed on a few resamples per size and scaled to 1,000; both sides
evaluate the same resamples and the largest |difference| of the resampled deltas is
printed (non-zero only through equal scores of one category inside one image; the
scores here are float32 draws, such ties are counted and printed). PASS: 1,000 resamples
of the largest size within 60 s, and naive = vectorised within 1e-9 at every size.

    python benchmarks/bench_coco_bootstrap.py            # 500, 2,000, 5,000 images
    python benchmarks/bench_coco_bootstrap.py --quick    # 250, 500, 1,000 images
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from reports.bootstrap import paired_delta, resample_weights  # noqa: E402
from reports.coco_bootstrap import prepare_coco, weighted_aps  # noqa: E402

N_CATEGORIES = 80
DETECTIONS_PER_IMAGE = 100
LIMIT_S = 60.0      # 1,000 resamples of the largest size, matching included
AGREEMENT = 1e-9    # max |naive - vectorised| resampled delta where no same-image ties


def coco_like(n_images: int, seed: int = 0):
    """COCO-val-like ground truth (~7.3 objects per image, ~1 % crowd regions, long-tailed
    categories) and a detector's 100 detections per image: each object found with
    probability 0.7 at a spread of localisation errors, the rest clutter."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, N_CATEGORIES + 1) ** 0.9
    popularity /= popularity.sum()
    detections, annotations = [], []
    for _ in range(n_images):
        m = int(min(rng.poisson(7.3), 60))
        xy = rng.uniform(0, 560, (m, 2))
        wh = np.exp(rng.uniform(np.log(4), np.log(400), (m, 2)))
        boxes = np.hstack([xy, xy + wh])
        labels = rng.choice(N_CATEGORIES, m, p=popularity) + 1
        crowd = rng.random(m) < 0.01
        found = rng.random(m) < 0.7
        near = boxes[found] + rng.normal(0, 1, (found.sum(), 4)) * wh[found].repeat(2, 1) * rng.uniform(
            0.01, 0.25, (found.sum(), 1))
        n_clutter = DETECTIONS_PER_IMAGE - near.shape[0]
        cxy = rng.uniform(0, 560, (n_clutter, 2))
        clutter = np.hstack([cxy, cxy + np.exp(rng.uniform(np.log(4), np.log(300), (n_clutter, 2)))])
        dets = np.vstack([near, clutter])
        det_labels = np.concatenate([labels[found], rng.choice(N_CATEGORIES, n_clutter, p=popularity) + 1])
        scores = np.concatenate([rng.beta(4, 2, near.shape[0]), rng.beta(1, 4, n_clutter)])
        detections.append({"boxes": dets.astype(np.float32), "scores": scores.astype(np.float32),
                           "labels": det_labels})
        annotations.append({"boxes": boxes.astype(np.float32), "labels": labels, "iscrowd": crowd})
    return detections, annotations


def rescored(detections, seed: int):
    rng = np.random.default_rng(seed)
    return [{**d, "scores": np.abs(d["scores"] + rng.normal(0, 0.05, d["scores"].shape)).astype(np.float32)}
            for d in detections]


def same_image_ties(detections) -> int:
    ties = 0
    for d in detections:
        keys = np.stack([d["labels"].astype(np.float64), d["scores"].astype(np.float64)], axis=1)
        ties += len(keys) - len(np.unique(keys, axis=0))
    return ties


class Naive:
    """COCOeval on a resampled image list: the per-image COCO dicts built once, renumbered per draw."""

    def __init__(self, detections, annotations):
        self.gts, self.dts = [], []
        for det, gt in zip(detections, annotations):
            b = np.asarray(gt["boxes"], np.float64)
            self.gts.append([(box[0], box[1], box[2] - box[0], box[3] - box[1], int(label), int(c))
                             for box, label, c in zip(b, gt["labels"], gt["iscrowd"])])
            b = np.asarray(det["boxes"], np.float64)
            self.dts.append(([[box[0], box[1], box[2] - box[0], box[3] - box[1]] for box in b],
                             det["scores"].astype(np.float64).tolist(), det["labels"].tolist()))

    def ap(self, order) -> float:
        images, anns, results = [], [], []
        for new_id, i in enumerate(order, start=1):
            images.append({"id": new_id})
            for x, y, w, h, label, crowd in self.gts[i]:
                anns.append({"id": len(anns) + 1, "image_id": new_id, "category_id": label,
                             "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd})
            boxes, scores, labels = self.dts[i]
            results += [{"image_id": new_id, "category_id": c, "bbox": b, "score": s}
                        for b, s, c in zip(boxes, scores, labels)]
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = {"images": images, "annotations": anns,
                            "categories": [{"id": k} for k in range(1, N_CATEGORIES + 1)]}
            coco.createIndex()
            evaluation = COCOeval(coco, coco.loadRes(results), iouType="bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return float(evaluation.stats[0])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = (250, 500, 1000) if args.quick else (500, 2000, 5000)
    print(f"COCO-like: {N_CATEGORIES} categories, {DETECTIONS_PER_IMAGE} detections per image; numpy threads <= 2")
    print(f"{'images':>7} {'gts':>7} {'ties':>5} | {'naive s/resample':>16} {'naive 1,000 (scaled)':>21} | "
          f"{'vectorised 1,000':>16} {'ratio':>7} | {'max |diff|':>10}")
    rows = []
    for n in sizes:
        dets_a, gts = coco_like(n, seed=n)
        dets_b = rescored(dets_a, seed=n + 1)
        ids = np.arange(n).astype(str)
        a = {"detections": dets_a, "annotations": gts, "image_ids": ids, "meta": {"dataset": "coco"}}
        b = {**a, "detections": dets_b}
        naive_k = 3 if n <= 1000 else (2 if n <= 2000 else 1)
        weights = resample_weights(n, naive_k, np.random.default_rng(5))
        naive_a, naive_b = Naive(dets_a, gts), Naive(dets_b, gts)
        start = time.perf_counter()
        slow = np.array([naive_b.ap(np.repeat(np.arange(n), w)) - naive_a.ap(np.repeat(np.arange(n), w))
                         for w in weights])
        naive_each = (time.perf_counter() - start) / naive_k
        pa, pb = prepare_coco(dets_a, gts), prepare_coco(dets_b, gts)
        fast = weighted_aps(pb, weights) - weighted_aps(pa, weights)
        start = time.perf_counter()
        result = paired_delta(a, b, n_resamples=1000)
        seconds = time.perf_counter() - start
        ratio = naive_each * 1000 / seconds
        n_gts = sum(len(g["labels"]) for g in gts)
        print(f"{n:7d} {n_gts:7d} {same_image_ties(dets_a) + same_image_ties(dets_b):5d} | {naive_each:16.2f} "
              f"{naive_each * 1000:19.0f} s | {seconds:14.2f} s {ratio:6.0f}x | {np.abs(slow - fast).max():10.1e}")
        ties = same_image_ties(dets_a) + same_image_ties(dets_b)
        rows.append((n, seconds, result, ties == 0 and np.abs(slow - fast).max() <= AGREEMENT))
    n, seconds, result, _ = rows[-1]
    print(f"\n{n} images: delta {result.delta:+.3f} AP points, 95 % interval [{result.low:+.3f}, {result.high:+.3f}]")
    # the vectorised cost per resample: how it grows with the number of resamples
    dets_a, gts = coco_like(sizes[-1], seed=sizes[-1])
    a = {"detections": dets_a, "annotations": gts, "image_ids": np.arange(sizes[-1]).astype(str),
         "meta": {"dataset": "coco"}}
    b = {**a, "detections": rescored(dets_a, seed=sizes[-1] + 1)}
    for resamples in (100, 250, 500):
        start = time.perf_counter()
        paired_delta(a, b, n_resamples=resamples)
        t = time.perf_counter() - start
        print(f"  {sizes[-1]:5d} images x {resamples:4d} resamples: {t:6.2f} s")
    agree = all(row[3] for row in rows)
    ok = seconds <= LIMIT_S and agree
    print(f"\n{'PASS' if ok else 'FAIL'}: {n} images x 1,000 resamples in {seconds:.1f} s (limit {LIMIT_S:.0f} s); "
          f"naive and vectorised deltas {'agree' if agree else 'DIFFER'} within {AGREEMENT:g} at every size")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
