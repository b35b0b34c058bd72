"""Claim: a paired bootstrap of a VOC07-test-sized mAP delta (4,952 images, 20 classes,
~55 detections per image, 1,000 resamples) takes <= 60 s on 2 cores, vectorised
(``reports.bootstrap``), against re-running ``voc_map`` on every resample (naive).

The naive side is timed on a few resamples and scaled to 1,000 (it would take many
minutes); both sides evaluate the same resamples and the largest |difference| of the
resampled deltas is printed (non-zero only through equal scores of one class inside
one image: the inputs round scores to 3 decimals so that ties happen). Then how the
vectorised cost grows with the number of images and of resamples.

    python benchmarks/bench_bootstrap.py            # full
    python benchmarks/bench_bootstrap.py --quick    # 1,000 images
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_voc_map import random_voc_like  # noqa: E402

from reports.bootstrap import paired_delta, prepare, weighted_maps  # noqa: E402
from trainers.evaluation.voc import voc_map  # noqa: E402

LIMIT_S = 60.0


def pair(num_images: int):
    """A baseline and a second trial on the same images (same boxes, re-scored)."""
    detections, annotations = random_voc_like(num_images, seed=0)
    rng = np.random.default_rng(1)
    other = [{**d, "scores": np.round(np.clip(d["scores"] + rng.normal(0, 0.1, d["scores"].shape), 0, 1),
                                      3).astype(np.float32)} for d in detections]
    ids = np.arange(num_images).astype(str)
    return ({"detections": detections, "annotations": annotations, "image_ids": ids, "meta": {}},
            {"detections": other, "annotations": annotations, "image_ids": ids, "meta": {}})


def naive(a, b, draws):
    deltas = []
    for draw in draws:
        order = np.sort(draw)
        gts = [a["annotations"][i] for i in order]
        deltas.append(voc_map([b["detections"][i] for i in order], gts)["map"]
                      - voc_map([a["detections"][i] for i in order], gts)["map"])
    return np.array(deltas)


def vectorised_time(a, b, n_resamples):
    start = time.perf_counter()
    result = paired_delta(a, b, n_resamples=n_resamples)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    full = 1000 if args.quick else 4952
    a, b = pair(full)
    n_dets = sum(len(d["scores"]) for d in a["detections"])
    print(f"{full} images, {n_dets} detections per trial, 20 classes; numpy threads <= 2")

    naive_k = 5
    draws = np.random.default_rng(5).integers(0, full, size=(naive_k, full))
    start = time.perf_counter()
    slow = naive(a, b, draws)
    naive_each = (time.perf_counter() - start) / naive_k
    weights = np.stack([np.bincount(d, minlength=full) for d in draws]).astype(np.int32)
    pa, pb = prepare(a["detections"], a["annotations"]), prepare(b["detections"], b["annotations"])
    fast = weighted_maps(pb, weights) - weighted_maps(pa, weights)
    print(f"same {naive_k} resamples: max |naive - vectorised| delta = {np.abs(slow - fast).max():.2e}")

    seconds, result = vectorised_time(a, b, 1000)
    print(f"naive:      {naive_each:.3f} s per resample (2 voc_map) -> {naive_each * 1000:.0f} s for 1,000 "
          f"(scaled from {naive_k})")
    print(f"vectorised: {seconds:.2f} s for 1,000 resamples (incl. matching) -> "
          f"{naive_each * 1000 / seconds:.1f}x faster")
    print(f"delta {result.delta:+.2f} mAP points, 95 % interval [{result.low:+.2f}, {result.high:+.2f}]")

    print("\nscaling (vectorised, seconds):")
    sizes = [250, 500, 1000] if args.quick else [1000, 2500, 4952]
    for n in sizes:
        pa_, pb_ = pair(n)
        t, _ = vectorised_time(pa_, pb_, 1000)
        print(f"  {n:5d} images x 1000 resamples: {t:6.2f} s  ({t / n * 1000:.2f} s per 1,000 images)")
    for resamples in (250, 500, 1000):
        t, _ = vectorised_time(a, b, resamples)
        print(f"  {full:5d} images x {resamples:4d} resamples: {t:6.2f} s  ({t / resamples * 1000:.1f} ms per resample)")

    ok = seconds <= LIMIT_S
    print(f"\n{'PASS' if ok else 'FAIL'}: 1,000 resamples in {seconds:.1f} s (limit {LIMIT_S:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
