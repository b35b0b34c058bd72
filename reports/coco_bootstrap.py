"""Is a COCO delta real? A paired bootstrap over test images of COCO AP, vectorised.

The number resampled is the one a COCO trial logs as ``val/ap``: pycocotools'
``COCOeval`` bbox ``stats[0]``, AP@[.50:.05:.95] over area ``all`` with at most 100
detections per image and category (``trainers.evaluation.coco``). Mask R-CNN's segm AP
is not bootstrapped (the artifact holds boxes only).

What ``COCOeval`` does, and how the resamples reuse it (as ``reports.bootstrap`` does for
VOC):

* ``evaluateImg`` matches one image and one category on its own: its detections sorted by
  score (stable), the top 100 kept; for each of the 10 IoU thresholds, greedily, each
  detection takes the best-IoU ground truth still free (crowd regions stay free, and
  their IoU is intersection / detection area), preferring a regular ground truth over a
  crowd one; a detection on a crowd region is ignored. So every outcome (TP, FP,
  ignored, per threshold) is fixed per image, the same in every resample: ``prepare``
  runs the matching once.
* ``accumulate`` ranks a category's kept detections over all images by score (ties in
  image order), and at each rank takes recall ``tp / npig`` and precision
  ``tp / (tp + fp + eps)``; the precision is made monotone from the right, read at 101
  recall points (0 beyond the last recall reached); AP is the mean over thresholds,
  recall points and the categories with a regular ground truth (-1 if none has one).
* A resample is a weight vector over images (how often each was drawn): an image drawn k
  times contributes k copies of its detections with the same outcomes, and its ground
  truths k times. Cumulative TP / FP counts become weighted cumulative sums, and since
  precision only rises at a TP, the envelope and the recall points only need the curve
  at the TP ranks: one ``(resamples, TPs)`` cumulative sum per category and threshold
  replaces an evaluation per resample.

This equals ``COCOeval`` on the resampled image list (copies side by side, in the
original image order, given new image and annotation ids) to rounding, except where two
detections of one category *in the same image* have exactly equal scores (the order of
the copies inside that tie differs). IoUs are computed as pycocotools' C ``bbIou`` does,
from ``xywh`` boxes: the detections' ``w = x2 - x1`` in float64 from the float32 outputs
(as ``trainers.evaluation.coco`` converts them), the ground truths' from the annotation
file as it is (``"xywh"``, stored by the engine; without it, from the float32 ``xyxy``
boxes, which round real COCO's coordinates: an IoU within ~1e-6 of a threshold could then
be decided differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainers.evaluation.voc import flatten_annotations, flatten_detections

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = 100
AREA_ALL = (0.0 ** 2, 1e5 ** 2)
_EPS = np.spacing(1)


@dataclass
class PreparedCoco:
    """One trial's detections, matched once, reduced to what the resamples need."""

    n_images: int
    labels: list            # the categories with a regular (non-crowd) ground truth somewhere
    positives: np.ndarray   # (n_images, n_labels) regular ground truths per image
    det_images: list        # per label: image of each detection kept, in COCOeval's rank order
    tp_ranks: list          # per label, per threshold: ranks (into det_images) of the TPs
    ignored_before_tp: list  # per label, per threshold: ignored detections ranked before each TP
    ignored_images: list    # per label, per threshold: image of each ignored detection, in rank order


def box_iou_xywh(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU as pycocotools' ``bbIou``: crowd ground truths divide by the detection's area."""
    dx, dy, dw, dh = (dets[:, i:i + 1] for i in range(4))
    gx, gy, gw, gh = (gts[None, :, i] for i in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    da, ga = dw * dh, gw * gh
    inter = w * h
    union = np.where(crowd[None, :], da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


def match_image(iou: np.ndarray, gt_ignore: np.ndarray, det_area: np.ndarray):
    """``COCOeval.evaluateImg`` for one image and category, dets sorted and cut already.

    ``iou`` (D, G) with ground truths in the given order (regular first, as COCOeval sorts
    them). Returns ``(T, D)`` bool arrays: matched to a regular ground truth (TP), and ignored.
    Ignored ground truths are crowd regions (area ``all``), which any number of detections
    may match.
    """
    n_t, (n_d, n_g) = IOU_THRESHOLDS.size, iou.shape
    matched = np.zeros((n_t, n_d), dtype=bool)
    ignored = np.zeros((n_t, n_d), dtype=bool)
    if n_g:
        n_regular = int((~gt_ignore).sum())
        for t, threshold in enumerate(IOU_THRESHOLDS):
            floor = min(threshold, 1 - 1e-10)
            reachable = (iou >= floor).any(axis=1)
            taken = np.zeros(n_g, dtype=bool)
            for d in np.flatnonzero(reachable):
                row = iou[d]
                # regular ground truths still free: the best, ties to the last (COCOeval's `<`)
                free = (row[:n_regular] >= floor) & ~taken[:n_regular]
                if free.any():
                    best = _last_argmax(np.where(free, row[:n_regular], -np.inf))
                    taken[best] = True
                    matched[t, d] = True
                    continue
                crowd = row[n_regular:] >= floor
                if crowd.any():
                    ignored[t, d] = True
    # unmatched detections outside the area range are ignored (none for `all` but w*h < 0)
    outside = (det_area < AREA_ALL[0]) | (det_area > AREA_ALL[1])
    ignored |= ~matched & ~ignored & outside[None, :]
    return matched, ignored


def _last_argmax(values: np.ndarray) -> int:
    return int(values.size - 1 - np.argmax(values[::-1]))


def _xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)


def prepare_coco(detections, annotations) -> PreparedCoco:
    """Match every image once as ``COCOeval`` does (bbox, area all, 100 detections).

    ``detections``/``annotations``: per image, as ``load_detections`` returns them (labels
    are the detector's contiguous ones; ``annotations[i]["iscrowd"]`` marks crowd regions,
    ``annotations[i]["xywh"]``, where present, the annotation file's boxes).
    """
    dets = flatten_detections(detections)
    gts = flatten_annotations(annotations)
    crowd = np.concatenate([np.asarray(a.get("iscrowd", np.zeros(len(a["labels"]))), dtype=bool).reshape(-1)
                            for a in annotations] or [np.zeros(0, dtype=bool)])
    n_images = len(annotations)
    det_xywh = _xywh(dets["boxes"])
    if annotations and all(a.get("xywh") is not None for a in annotations):  # the annotation file's own
        gt_xywh = np.concatenate([np.asarray(a["xywh"], dtype=np.float64).reshape(-1, 4) for a in annotations])
    else:
        gt_xywh = _xywh(gts["boxes"])
    scores = np.asarray(dets["scores"], dtype=np.float64)
    det_area = det_xywh[:, 2] * det_xywh[:, 3]
    labels = [int(v) for v in np.unique(gts["labels"][~crowd])]
    positives = np.zeros((n_images, len(labels)), dtype=np.int64)
    prepared = PreparedCoco(n_images, labels, positives, [], [], [], [])
    n_t = IOU_THRESHOLDS.size
    for c, label in enumerate(labels):
        gt_rows = np.flatnonzero(gts["labels"] == label)
        positives[:, c] = np.bincount(gts["images"][gt_rows[~crowd[gt_rows]]], minlength=n_images)
        det_rows = np.flatnonzero(dets["labels"] == label)
        # per image: stable sort by score, top 100 (COCOeval.computeIoU / evaluateImg)
        order = det_rows[np.lexsort((np.arange(det_rows.size), -scores[det_rows], dets["images"][det_rows]))]
        images = dets["images"][order]
        starts = np.searchsorted(images, np.arange(n_images))
        rank_in_image = np.arange(order.size) - starts[images]
        keep = rank_in_image < MAX_DETECTIONS
        order, images = order[keep], images[keep]
        matched = np.zeros((n_t, order.size), dtype=bool)
        ignored = np.zeros((n_t, order.size), dtype=bool)
        gt_images = gts["images"][gt_rows]
        det_bounds = np.searchsorted(images, np.arange(n_images + 1))
        gt_order = np.lexsort((np.arange(gt_rows.size), crowd[gt_rows], gt_images))  # per image: regular first, stable
        gt_sorted = gt_rows[gt_order]
        gt_bounds = np.searchsorted(gt_images[gt_order], np.arange(n_images + 1))
        for i in np.flatnonzero((np.diff(det_bounds) > 0) & (np.diff(gt_bounds) > 0)):
            d0, d1 = det_bounds[i], det_bounds[i + 1]
            g = gt_sorted[gt_bounds[i]:gt_bounds[i + 1]]
            rows = order[d0:d1]
            iou = box_iou_xywh(det_xywh[rows], gt_xywh[g], crowd[g])
            matched[:, d0:d1], ignored[:, d0:d1] = match_image(iou, crowd[g], det_area[rows])
        # images without a ground truth of this label: unmatched, ignored only outside the area range
        no_gt = np.diff(gt_bounds)[images] == 0
        outside = (det_area[order] < AREA_ALL[0]) | (det_area[order] > AREA_ALL[1])
        ignored[:, no_gt & outside] = True
        # COCOeval.accumulate: over images (in order), mergesort by -score
        rank = np.lexsort((np.arange(order.size), -scores[order]))
        matched, ignored, images = matched[:, rank], ignored[:, rank], images[rank]
        prepared.det_images.append(images)
        tp_ranks, ig_before, ig_images = [], [], []
        for t in range(n_t):
            tp_ranks.append(np.flatnonzero(matched[t]))
            ig_before.append(np.cumsum(ignored[t])[tp_ranks[-1]])  # a TP is not ignored itself
            ig_images.append(images[ignored[t]])
        prepared.tp_ranks.append(tp_ranks)
        prepared.ignored_before_tp.append(ig_before)
        prepared.ignored_images.append(ig_images)
    return prepared


def _first_count_reaching(npig: np.ndarray) -> np.ndarray:
    """(B, R) the least integer m with ``m / npig >= RECALL_POINTS[r]`` in float64, as
    COCOeval's ``searchsorted(tp / npig, recThrs, 'left')`` decides it."""
    npig = npig[:, None]
    base = np.maximum(np.floor(RECALL_POINTS[None, :] * npig) - 1, 0)
    below = sum(((base + s) / npig < RECALL_POINTS[None, :]).astype(np.int64) for s in range(4))
    return base.astype(np.int64) + below


def weighted_aps(prepared: PreparedCoco, weights: np.ndarray) -> np.ndarray:
    """COCO AP (fraction) of each resample, ``weights`` (B, n_images) image draw counts.

    The mean is over the categories with a regular ground truth in the resample; -1 where
    there is none (COCOeval's value when nothing is defined).
    """
    weights = np.asarray(weights, dtype=np.int64)
    n_resamples = weights.shape[0]
    positives = weights @ prepared.positives  # (B, C)
    sums = np.zeros((n_resamples, len(prepared.labels)))
    rows = np.arange(n_resamples)[:, None]
    for c in range(len(prepared.labels)):
        det_images = prepared.det_images[c]
        if det_images.size == 0 or not any(r.size for r in prepared.tp_ranks[c]):
            continue
        npig = positives[:, c].astype(np.float64)
        safe = np.where(npig > 0, npig, 1.0)
        need = _first_count_reaching(safe)  # (B, R)
        seen = np.cumsum(weights[:, det_images], axis=1)  # weight of all detections up to each rank
        for t in range(IOU_THRESHOLDS.size):
            ranks = prepared.tp_ranks[c][t]
            n = ranks.size
            if n == 0:
                continue
            tp = np.cumsum(weights[:, det_images[ranks]], axis=1)
            ig = np.zeros((n_resamples, prepared.ignored_images[c][t].size + 1), dtype=np.int64)
            np.cumsum(weights[:, prepared.ignored_images[c][t]], axis=1, out=ig[:, 1:])
            fp = seen[:, ranks] - tp - ig[:, prepared.ignored_before_tp[c][t]]
            precision = tp / (fp.astype(np.float64) + tp + _EPS)
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            # first TP rank whose recall reaches each point: tp rows are non-decreasing integers
            offset = int(max(tp[:, -1].max(), need.max())) + 2
            keys = (tp + rows * offset).ravel()
            first = np.searchsorted(keys, (need + rows * offset).ravel(), side="left").reshape(need.shape)
            first -= rows * n
            reached = first < n
            values = envelope[rows, np.minimum(first, n - 1)]
            sums[:, c] += np.where(reached, values, 0.0).sum(axis=1)
    present = positives > 0
    counted = present.sum(axis=1)
    ap = sums / (IOU_THRESHOLDS.size * RECALL_POINTS.size)
    return np.where(counted > 0, (ap * present).sum(axis=1) / np.maximum(counted, 1), -1.0)


def default_chunk(prepared: list, budget: int = 5_000_000) -> int:
    """Resamples per chunk so that one (chunk, detections of a category) array stays under ``budget``."""
    widest = max([d.size for p in prepared for d in p.det_images] or [1])
    return int(max(1, min(200, budget // max(widest, 1))))
