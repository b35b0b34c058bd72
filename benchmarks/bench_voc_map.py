"""Claim: ``voc_map`` is >= 10x faster than the plain-loop reference, same numbers.

Builds a VOC07-test-sized random input (4,952 images, 20 classes, ~3 ground truths per
image of which ~20 % difficult, up to 100 detections per image, many of them jittered
copies of ground truths so that TPs, duplicates and difficult hits all happen, scores
rounded so that ties happen), times both implementations in this one run for both AP
methods, and prints the times, the speed-up and the largest |difference| of mAP and
per-class AP.

    python benchmarks/bench_voc_map.py            # VOC07-test size
    python benchmarks/bench_voc_map.py --quick    # 500 images
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from trainers.evaluation.voc import voc_map
from trainers.evaluation.voc_reference import voc_map_reference

NUM_CLASSES = 20


def random_voc_like(num_images: int, seed: int = 0, max_detections: int = 100):
    rng = np.random.default_rng(seed)
    detections, annotations = [], []
    for _ in range(num_images):
        width, height = rng.integers(300, 501, size=2)
        num_gt = max(1, rng.poisson(3.0))
        gt_boxes = _random_boxes(rng, num_gt, width, height)
        gt_labels = rng.integers(1, NUM_CLASSES + 1, size=num_gt)
        difficult = rng.random(num_gt) < 0.2
        annotations.append({"boxes": gt_boxes.astype(np.float32), "labels": gt_labels,
                            "difficult": difficult})

        num_det = int(rng.integers(10, max_detections + 1))
        near = min(num_det, int(rng.integers(num_gt, 4 * num_gt + 1)))
        source = rng.integers(0, num_gt, size=near)
        # Jitter each coordinate by ~8 % of the box's width (x) or height (y).
        jitter = rng.normal(0.0, 0.08, size=(near, 4)) * np.tile(
            np.stack([gt_boxes[source, 2] - gt_boxes[source, 0],
                      gt_boxes[source, 3] - gt_boxes[source, 1]], axis=1), 2)
        near_boxes = np.round(gt_boxes[source] + jitter)
        near_boxes[:, 2:] = np.maximum(near_boxes[:, 2:], near_boxes[:, :2] + 1)
        near_labels = np.where(rng.random(near) < 0.85, gt_labels[source],
                               rng.integers(1, NUM_CLASSES + 1, size=near))
        far_boxes = _random_boxes(rng, num_det - near, width, height)
        far_labels = rng.integers(1, NUM_CLASSES + 1, size=num_det - near)
        scores = np.concatenate([rng.uniform(0.3, 1.0, size=near),
                                 rng.uniform(0.0, 0.7, size=num_det - near)])
        detections.append({"boxes": np.concatenate([near_boxes, far_boxes]).astype(np.float32),
                           "scores": np.round(scores, 3).astype(np.float32),
                           "labels": np.concatenate([near_labels, far_labels])})
    return detections, annotations


def _random_boxes(rng, count, width, height):
    x1 = rng.integers(0, width - 20, size=count)
    y1 = rng.integers(0, height - 20, size=count)
    x2 = np.minimum(x1 + rng.integers(10, width // 2, size=count), width)
    y2 = np.minimum(y1 + rng.integers(10, height // 2, size=count), height)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float64)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def largest_difference(a: dict, b: dict) -> float:
    assert a["ap"].keys() == b["ap"].keys(), "different classes evaluated"
    per_class = max(abs(a["ap"][k] - b["ap"][k]) for k in a["ap"])
    return max(per_class, abs(a["map"] - b["map"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 images instead of 4,952")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="voc_map timings: best of this many runs")
    args = parser.parse_args(argv)
    num_images = args.images or (500 if args.quick else 4952)

    detections, annotations = random_voc_like(num_images, args.seed)
    num_dets = sum(len(d["scores"]) for d in detections)
    num_gts = sum(len(a["labels"]) for a in annotations)
    num_difficult = sum(int(a["difficult"].sum()) for a in annotations)
    print(f"{num_images} images, {num_dets} detections, {num_gts} ground truths "
          f"({num_difficult} difficult), {NUM_CLASSES} classes")

    worst_ratio = float("inf")
    worst_difference = 0.0
    for method in ("11point", "area"):
        reference, reference_time = timed(voc_map_reference, detections, annotations,
                                          method=method)
        fast_time = float("inf")
        for _ in range(args.repeats):
            fast, elapsed = timed(voc_map, detections, annotations, method=method)
            fast_time = min(fast_time, elapsed)
        difference = largest_difference(fast, reference)
        ratio = reference_time / fast_time
        worst_ratio = min(worst_ratio, ratio)
        worst_difference = max(worst_difference, difference)
        print(f"{method:>8}: reference {reference_time:8.3f} s   voc_map {fast_time:7.3f} s   "
              f"speed-up {ratio:6.1f}x   mAP {fast['map']:.6f}   max |diff| {difference:.2e}")

    verdict = "PASS" if worst_ratio >= 10 and worst_difference <= 1e-9 else "FAIL"
    print(f"claim (>= 10x faster, |diff| <= 1e-9): {verdict} "
          f"(worst speed-up {worst_ratio:.1f}x, worst |diff| {worst_difference:.2e})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
