"""Is a delta real? A paired bootstrap over test images of VOC mAP, vectorised.

Resampling images with replacement and recomputing ``voc_map`` each time is what the
interval means; this module computes the same numbers without re-running the matching:

* A detection's outcome (TP, FP, or ignored for a difficult box) only depends on its own
  image, so it is the same in every resample: an image drawn k times contributes k copies
  of each of its detections with the same outcome, and its ground truths k times.
* A resample is therefore a weight vector over images (how often each was drawn). For a
  class, with its detections in rank order, the cumulative TP and FP counts are weighted
  cumulative sums, and precision only rises at a TP, so the precision envelope and both AP
  definitions (VOC07 11-point, VOC10+ area) only need the curve at the TP ranks. One
  ``(resamples, TPs)`` cumulative sum per class replaces a full evaluation per resample.

This equals ``voc_map`` of the resampled image list laid out in ascending image order
(copies side by side) exactly, except where two detections of one class *in the same
image* have exactly equal scores: there the order of the copies inside the tie differs
(as it already depends on image order in any evaluation).

``paired_delta`` draws one set of resamples and applies it to both trials (they must
have been evaluated on the same images), so the interval is that of the difference, not
of each mAP. For COCO trials (``meta["dataset"] == "coco"``) it resamples COCO bbox AP
the same way, through ``reports.coco_bootstrap``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainers.errors import UserInputError
from trainers.evaluation.voc import (ELEVEN_POINT_RECALLS, METHODS, best_ground_truth,
                                     flatten_annotations, flatten_detections, rows_by_label)


@dataclass
class Prepared:
    """One trial's detections reduced to what the resamples need."""

    n_images: int
    labels: list                # the classes with a non-difficult ground truth somewhere
    positives: np.ndarray       # (n_images, n_classes) non-difficult ground truths per image
    tp_images: list             # per class: image of each TP, in rank order
    fp_images: list             # per class: image of each FP, in rank order
    fp_before_tp: list          # per class: how many FPs rank before each TP
    method: str


def prepare(detections, annotations, iou_threshold: float = 0.5, method: str = "11point",
            legacy_coordinates: bool = False) -> Prepared:
    """Match once, as ``voc_map`` does, and keep per class the TP/FP images in rank order."""
    if method not in METHODS:
        raise UserInputError("method", f"unknown AP method {method!r}.", f"Use one of {METHODS}.")
    dets = flatten_detections(detections)
    gts = flatten_annotations(annotations)
    extra = 1.0 if legacy_coordinates else 0.0
    n_images = len(annotations)
    det_groups = rows_by_label(dets["labels"])
    gt_groups = rows_by_label(gts["labels"])
    labels = [int(v) for v in np.unique(gts["labels"][~gts["difficult"]])]
    positives = np.zeros((n_images, len(labels)), dtype=np.int64)
    tp_images, fp_images, fp_before_tp = [], [], []
    for c, label in enumerate(labels):
        gt_rows = gt_groups[label]
        counted = gt_rows[~gts["difficult"][gt_rows]]
        positives[:, c] = np.bincount(gts["images"][counted], minlength=n_images)
        det_rows = det_groups.get(label, np.zeros(0, dtype=np.int64))
        if det_rows.size == 0:
            tp_images.append(np.zeros(0, np.int64))
            fp_images.append(np.zeros(0, np.int64))
            fp_before_tp.append(np.zeros(0, np.int64))
            continue
        best_gt, best_iou = best_ground_truth(dets["boxes"][det_rows], dets["images"][det_rows],
                                              gts["boxes"][gt_rows], gts["images"][gt_rows], extra)
        order = np.argsort(-dets["scores"][det_rows].astype(np.float64), kind="stable")
        images = dets["images"][det_rows][order]
        best_gt = best_gt[order]
        hit = best_iou[order] >= iou_threshold
        ignored = hit & gts["difficult"][gt_rows][best_gt]
        candidate = np.flatnonzero(hit & ~ignored)
        true_positive = np.zeros(order.size, dtype=bool)
        _, first = np.unique(best_gt[candidate], return_index=True)
        true_positive[candidate[first]] = True
        kept = ~ignored
        tp_kept = true_positive[kept]
        images_kept = images[kept]
        tp_images.append(images_kept[tp_kept])
        fp_images.append(images_kept[~tp_kept])
        fp_before_tp.append(np.cumsum(~tp_kept)[tp_kept])
    return Prepared(n_images, labels, positives, tp_images, fp_images, fp_before_tp, method)


def resample_weights(n_images: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n_images) int32: how often each image is drawn in each resample."""
    draws = rng.integers(0, n_images, size=(n_resamples, n_images))
    offsets = (np.arange(n_resamples) * n_images)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_images)
    return counts.reshape(n_resamples, n_images).astype(np.int32)


def weighted_maps(prepared: Prepared, weights: np.ndarray) -> np.ndarray:
    """mAP (fraction) of each resample, ``weights`` (B, n_images) from ``resample_weights``.

    Like ``voc_map``, the mean is over the classes with a non-difficult ground truth in
    the resample; a resample without any scores 0.
    """
    weights = np.asarray(weights)
    n_resamples = weights.shape[0]
    positives = weights.astype(np.float64) @ prepared.positives  # (B, C)
    ap = np.zeros((n_resamples, len(prepared.labels)))
    for c in range(len(prepared.labels)):
        tp_images = prepared.tp_images[c]
        if tp_images.size == 0:
            continue
        tp = np.cumsum(weights[:, tp_images], axis=1, dtype=np.int64)
        fp_weights = weights[:, prepared.fp_images[c]]
        fp = np.zeros((n_resamples, fp_weights.shape[1] + 1), dtype=np.int64)
        np.cumsum(fp_weights, axis=1, out=fp[:, 1:])
        fp = fp[:, prepared.fp_before_tp[c]]
        total = tp + fp
        precision = np.divide(tp, total, out=np.zeros(tp.shape), where=total > 0)
        npos = positives[:, c:c + 1]
        recall = np.divide(tp, npos, out=np.zeros(tp.shape), where=npos > 0)
        envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        if prepared.method == "11point":
            first = (recall[:, :, None] < ELEVEN_POINT_RECALLS[None, None, :]).sum(axis=1)  # (B, 11)
            reached = first < tp.shape[1]
            values = np.take_along_axis(envelope, np.minimum(first, tp.shape[1] - 1), axis=1)
            ap[:, c] = np.where(reached, values, 0.0).sum(axis=1) / ELEVEN_POINT_RECALLS.size
        else:
            steps = np.diff(recall, axis=1, prepend=0.0)
            ap[:, c] = (steps * envelope).sum(axis=1)
    present = positives > 0
    counted = present.sum(axis=1)
    return np.where(counted > 0, (ap * present).sum(axis=1) / np.maximum(counted, 1), 0.0)


@dataclass(frozen=True)
class DeltaInterval:
    baseline: float      # mAP of the baseline on the test set, percent
    other: float         # mAP of the other trial, percent
    delta: float         # other - baseline, percent
    low: float           # 2.5 % quantile of the resampled deltas, percent
    high: float          # 97.5 %
    n_resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_delta(baseline, other, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95, chunk: int | None = None) -> DeltaInterval:
    """Paired bootstrap interval of ``metric(other) - metric(baseline)`` over test images.

    ``baseline``/``other``: ``load_detections`` results evaluated on the same images
    (same ids, same ground truth), or equally long lists of them (the seeds of two
    configs, paired seed by seed): then the delta is the mean over the pairs, and each
    resample draws the same images for every pair. The metric is the one the trials
    logged: VOC mAP with the evaluation settings in the first one's ``meta``, or, for
    ``meta["dataset"] == "coco"``, COCO bbox AP@[.5:.95] (``reports.coco_bootstrap``).
    ``chunk``: resamples evaluated at once (memory; default 100 for VOC, sized to the
    largest category for COCO).
    """
    baselines = baseline if isinstance(baseline, list) else [baseline]
    others = other if isinstance(other, list) else [other]
    if len(baselines) != len(others) or not baselines:
        raise UserInputError("paired_delta", f"{len(baselines)} baselines for {len(others)} trials.",
                             "Pair the trials seed by seed.")
    datasets = {str(x["meta"].get("dataset", "voc")) for x in baselines + others}
    if len(datasets) > 1:
        raise UserInputError("detections.npz", f"the trials were evaluated on different kinds of "
                             f"dataset ({', '.join(sorted(datasets))}).",
                             "Compare trials of the same dataset.")
    for item in baselines[1:] + others:
        _check_same_images(baselines[0], item)
    meta = baselines[0]["meta"]
    if datasets == {"coco"}:
        from reports import coco_bootstrap

        a = [coco_bootstrap.prepare_coco(x["detections"], x["annotations"]) for x in baselines]
        b = [coco_bootstrap.prepare_coco(x["detections"], x["annotations"]) for x in others]
        evaluate = coco_bootstrap.weighted_aps
        chunk = chunk or coco_bootstrap.default_chunk(a + b)
    else:
        settings = dict(iou_threshold=meta.get("iou_threshold", 0.5), method=meta.get("method", "11point"),
                        legacy_coordinates=meta.get("legacy_coordinates", False))
        a = [prepare(x["detections"], x["annotations"], **settings) for x in baselines]
        b = [prepare(x["detections"], x["annotations"], **settings) for x in others]
        evaluate = weighted_maps
        chunk = chunk or 100
    n_images = a[0].n_images
    full = np.ones((1, n_images), dtype=np.int32)
    map_a = float(np.mean([evaluate(p, full)[0] for p in a]))
    map_b = float(np.mean([evaluate(p, full)[0] for p in b]))
    rng = np.random.default_rng(seed)
    deltas = []
    for start in range(0, n_resamples, chunk):
        weights = resample_weights(n_images, min(chunk, n_resamples - start), rng)
        deltas.append(np.mean([evaluate(pb, weights) - evaluate(pa, weights)
                               for pa, pb in zip(a, b)], axis=0))
    deltas = np.concatenate(deltas) * 100.0
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(deltas, [tail, 1.0 - tail])
    return DeltaInterval(map_a * 100.0, map_b * 100.0, (map_b - map_a) * 100.0, float(low),
                         float(high), n_resamples)


def _check_same_images(a: dict, b: dict) -> None:
    if not np.array_equal(a["image_ids"], b["image_ids"]):
        raise UserInputError("detections.npz", "the two trials were evaluated on different images "
                             f"({a['image_ids'].size} vs {b['image_ids'].size} images, or another order).",
                             "Compare trials evaluated on the same test set.")
    for key in ("boxes", "labels", "difficult", "iscrowd"):
        left = np.concatenate([_flags(x, key) for x in a["annotations"]] or [np.zeros(0)])
        right = np.concatenate([_flags(x, key) for x in b["annotations"]] or [np.zeros(0)])
        if not np.array_equal(left, right):
            raise UserInputError("detections.npz", f"the two trials' ground-truth {key} differ.",
                                 "Compare trials evaluated on the same test set.")


def _flags(annotation: dict, key: str) -> np.ndarray:
    value = annotation.get(key)
    if value is None:  # no difficult / iscrowd flags: all False
        return np.zeros(len(annotation["labels"]), dtype=bool)
    return np.asarray(value).reshape(-1)


def welch(a, b) -> float:
    """Two-sided p-value of Welch's t-test of mean(b) != mean(a); NaN below 2 values each."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or b.size < 2:
        return math.nan
    from scipy import stats

    result = stats.ttest_ind(b, a, equal_var=False)
    return float(result.pvalue)
