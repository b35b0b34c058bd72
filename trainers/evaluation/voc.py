"""PASCAL VOC mean average precision (mAP@IoU), vectorised with numpy.

The semantics are those of the VOC devkit and of mmdetection 2.x ``eval_map`` (the code
that produced the paper's VOC numbers):

* Per class, every detection of that class over all images is ranked by descending
  score. **Tie rule**: the sort is stable over the detections laid end to end in image
  order, so equal scores keep image order, then the order inside the image.
* Each detection looks only at its best ground truth of the same class in its image
  (highest IoU; on equal IoU the first one in annotation order, like the devkit's
  ``max``; mmdetection stacks the difficult boxes after the others instead, which only
  differs for a difficult and a non-difficult box with exactly the same IoU).
  IoU >= threshold and that ground truth difficult -> ignored (neither TP nor FP);
  IoU >= threshold, not difficult, not matched yet -> TP (and now matched);
  anything else -> FP.
* Recall is over the non-difficult ground truths. ``"11point"`` is the VOC2007 metric:
  the mean over the 11 recall thresholds ``np.arange(0, 1.1, 0.1)`` of the highest
  precision at recall >= threshold (0 when no point reaches it). Those thresholds are
  the floats used by mmdetection, py-faster-rcnn and the other Python ports, so e.g.
  ``0.6000000000000001``: a recall of exactly 3/5 does *not* reach the 0.6 threshold.
  ``"area"`` is the VOC2010+ metric: the area under the monotone precision envelope.
* ``map`` is the mean over the classes with at least one non-difficult ground truth;
  ``ap`` holds exactly those classes. Classes that only have detections are left out.

Why the matching needs no loop over detections: a detection's fate only depends on its
own best ground truth, so "not matched yet" is the same as "no detection ranked before
it has the same best ground truth with IoU >= threshold". The TPs are therefore the
first occurrence, in rank order, of every (non-difficult) best ground truth id.
"""

from __future__ import annotations

import numpy as np

from trainers.errors import ConfigError, choice_error

METHODS = ("11point", "area")

# The VOC2007 recall thresholds exactly as the Python evaluators compute them
# (start + i * step, so 0.30000000000000004, 0.6000000000000001, 0.7000000000000001).
ELEVEN_POINT_RECALLS = np.arange(0.0, 1.1, 0.1)

# Guards the IoU division for degenerate (zero-area) boxes, as mmdetection does.
_UNION_EPS = np.finfo(np.float64).eps


def voc_map(detections, annotations, iou_threshold: float = 0.5, method: str = "11point",
            legacy_coordinates: bool = False) -> dict:
    """VOC mAP of ``detections`` against ``annotations``.

    Args:
        detections: one dict per image, ``{"boxes": (N, 4) xyxy, "scores": (N,),
            "labels": (N,) int}``; numpy arrays, torch tensors or lists.
        annotations: same length and order, ``{"boxes": (M, 4), "labels": (M,),
            "difficult": (M,) bool}`` (``difficult`` optional, default all False).
        iou_threshold: a detection matches a ground truth at IoU >= this.
        method: ``"11point"`` (VOC2007) or ``"area"`` (VOC2010+).
        legacy_coordinates: widths and heights are ``x2 - x1 + 1`` (devkit,
            py-faster-rcnn) instead of ``x2 - x1`` (mmdetection 2.x, torchvision).

    Returns:
        ``{"map": float, "ap": {label: float}}``.
    """
    check_arguments(detections, annotations, iou_threshold, method)
    dets = flatten_detections(detections)
    gts = flatten_annotations(annotations)
    extra = 1.0 if legacy_coordinates else 0.0

    det_groups = rows_by_label(dets["labels"])
    gt_groups = rows_by_label(gts["labels"])
    aps = {}
    for label in evaluated_labels(gts):
        det_rows = det_groups.get(label, np.zeros(0, dtype=np.int64))
        aps[label] = _class_ap(dets, det_rows, gts, gt_groups[label], iou_threshold, method,
                               extra)
    mean_ap = float(np.mean(list(aps.values()))) if aps else 0.0
    return {"map": mean_ap, "ap": aps}


def _class_ap(dets, det_rows, gts, gt_rows, iou_threshold, method, extra) -> float:
    num_positives = int(np.count_nonzero(~gts["difficult"][gt_rows]))
    if det_rows.size == 0:
        return 0.0
    det_boxes = dets["boxes"][det_rows]
    det_images = dets["images"][det_rows]
    gt_boxes = gts["boxes"][gt_rows]
    gt_images = gts["images"][gt_rows]  # ascending: annotations are laid out in image order
    gt_difficult = gts["difficult"][gt_rows]

    best_gt, best_iou = best_ground_truth(det_boxes, det_images, gt_boxes, gt_images, extra)

    # Rank by descending score; stable, so ties keep image order then in-image order.
    order = np.argsort(-dets["scores"][det_rows].astype(np.float64), kind="stable")
    best_gt = best_gt[order]
    hit = best_iou[order] >= iou_threshold
    ignored = hit & gt_difficult[best_gt]
    candidate = hit & ~ignored
    true_positive = np.zeros(order.size, dtype=bool)
    candidate_ranks = np.flatnonzero(candidate)
    # np.unique's return_index gives the first occurrence of each value: the first
    # detection (in rank order) that claims a ground truth is the one that gets it.
    _, first = np.unique(best_gt[candidate_ranks], return_index=True)
    true_positive[candidate_ranks[first]] = True

    # The devkit keeps ignored detections as tp = fp = 0 entries; they only repeat the
    # previous (recall, precision) point (or add (0, 0) before the first counted one),
    # which changes neither AP, so they are simply dropped.
    kept = ~ignored
    tp_cumulative = np.cumsum(true_positive[kept], dtype=np.float64)
    fp_cumulative = np.cumsum(~true_positive[kept], dtype=np.float64)
    if tp_cumulative.size == 0:
        return 0.0
    recall = tp_cumulative / num_positives
    precision = tp_cumulative / (tp_cumulative + fp_cumulative)
    if method == "11point":
        return eleven_point_ap(recall, precision)
    return area_ap(recall, precision)


def best_ground_truth(det_boxes, det_images, gt_boxes, gt_images, extra):
    """For every detection, its highest-IoU ground truth in the same image.

    Returns ``(index into gt_boxes, IoU)``; detections in an image without ground
    truth get index 0 and IoU -1 (never a hit). Only same-image pairs are formed, so
    the work is proportional to the number of candidate pairs, not to D x G.
    """
    num_dets = det_boxes.shape[0]
    best_gt = np.zeros(num_dets, dtype=np.int64)
    best_iou = np.full(num_dets, -1.0)
    starts = np.searchsorted(gt_images, det_images, side="left")
    counts = np.searchsorted(gt_images, det_images, side="right") - starts
    if counts.sum() == 0:
        return best_gt, best_iou
    # Pairs laid out detection by detection, ground truths in annotation order inside.
    pair_det = np.repeat(np.arange(num_dets), counts)
    pair_offsets = np.cumsum(counts) - counts
    pair_gt = np.repeat(starts - pair_offsets, counts) + np.arange(pair_det.size)
    ious = pairwise_iou(det_boxes[pair_det].astype(np.float64),
                        gt_boxes[pair_gt].astype(np.float64), extra)

    with_gt = np.flatnonzero(counts > 0)
    max_iou = np.maximum.reduceat(ious, pair_offsets[with_gt])
    best_iou[with_gt] = max_iou
    # First pair reaching the maximum = the first ground truth in annotation order.
    at_max = np.flatnonzero(ious == best_iou[pair_det])
    first_of_det = np.r_[True, pair_det[at_max][1:] != pair_det[at_max][:-1]]
    winners = at_max[first_of_det]
    best_gt[pair_det[winners]] = pair_gt[winners]
    return best_gt, best_iou


def pairwise_iou(boxes_a, boxes_b, extra):
    """IoU of ``boxes_a[i]`` with ``boxes_b[i]`` (row-wise), float64.

    ``extra`` is 1 for legacy (+1) coordinates, 0 otherwise. The expression order is
    the one of the reference implementation, so both give bit-identical IoUs.
    """
    inter_w = np.maximum(np.minimum(boxes_a[:, 2], boxes_b[:, 2])
                         - np.maximum(boxes_a[:, 0], boxes_b[:, 0]) + extra, 0.0)
    inter_h = np.maximum(np.minimum(boxes_a[:, 3], boxes_b[:, 3])
                         - np.maximum(boxes_a[:, 1], boxes_b[:, 1]) + extra, 0.0)
    intersection = inter_w * inter_h
    area_a = (boxes_a[:, 2] - boxes_a[:, 0] + extra) * (boxes_a[:, 3] - boxes_a[:, 1] + extra)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0] + extra) * (boxes_b[:, 3] - boxes_b[:, 1] + extra)
    union = area_a + area_b - intersection
    return intersection / np.maximum(union, _UNION_EPS)


def eleven_point_ap(recall, precision) -> float:
    """VOC2007: mean over 11 recall thresholds of the best precision at recall >= t."""
    best_from_here = np.maximum.accumulate(precision[::-1])[::-1]
    first_reaching = np.searchsorted(recall, ELEVEN_POINT_RECALLS, side="left")
    reached = first_reaching < recall.size
    values = np.zeros(ELEVEN_POINT_RECALLS.size)
    values[reached] = best_from_here[first_reaching[reached]]
    return float(values.sum() / ELEVEN_POINT_RECALLS.size)


def area_ap(recall, precision) -> float:
    """VOC2010+: area under the precision envelope (precision made non-increasing)."""
    padded_recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.concatenate(([0.0], precision, [0.0]))
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    steps = np.flatnonzero(padded_recall[1:] != padded_recall[:-1])
    return float(np.sum((padded_recall[steps + 1] - padded_recall[steps]) * envelope[steps + 1]))


# --------------------------------------------------------------------------- inputs
def check_arguments(detections, annotations, iou_threshold, method) -> None:
    """Shared by ``voc_map`` and the reference: the same errors for the same misuse."""
    if method not in METHODS:
        raise choice_error("method", method, METHODS)
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ConfigError("iou_threshold", f"must be in [0, 1], got {iou_threshold!r}.")
    if len(detections) != len(annotations):
        raise ConfigError(
            "detections",
            f"{len(detections)} images of detections but {len(annotations)} of annotations.",
            "Pass one entry per image, in the same order.")


def flatten_detections(detections) -> dict:
    """All images' detections end to end, in image order, with their image index.

    Converted image by image in the caller's dtype and cast once at the end: per-image
    casts dominate the run time on VOC07-test-sized inputs.
    """
    boxes, scores, labels, counts = [], [], [], []
    for entry in detections:
        image_boxes = _raw(entry.get("boxes")).reshape(-1, 4)
        image_scores = _raw(entry.get("scores")).reshape(-1)
        image_labels = _raw(entry.get("labels")).reshape(-1)
        if not image_boxes.shape[0] == image_scores.shape[0] == image_labels.shape[0]:
            raise ConfigError("detections", f"boxes, scores and labels differ in length "
                              f"({image_boxes.shape[0]}, {image_scores.shape[0]}, "
                              f"{image_labels.shape[0]}).")
        boxes.append(image_boxes)
        scores.append(image_scores)
        labels.append(image_labels)
        counts.append(image_boxes.shape[0])
    return {
        "boxes": _concatenate(boxes, None, (4,)),
        "scores": _concatenate(scores, None),
        "labels": _concatenate(labels, np.int64),
        "images": np.repeat(np.arange(len(counts)), counts),
    }


def flatten_annotations(annotations) -> dict:
    boxes, labels, difficult, counts = [], [], [], []
    for entry in annotations:
        image_boxes = _raw(entry.get("boxes")).reshape(-1, 4)
        image_labels = _raw(entry.get("labels")).reshape(-1)
        image_difficult = entry.get("difficult")
        if image_difficult is None:
            image_difficult = np.zeros(image_labels.shape[0], dtype=bool)
        else:
            image_difficult = _raw(image_difficult).reshape(-1)
        if not image_boxes.shape[0] == image_labels.shape[0] == image_difficult.shape[0]:
            raise ConfigError("annotations", f"boxes, labels and difficult differ in length "
                              f"({image_boxes.shape[0]}, {image_labels.shape[0]}, "
                              f"{image_difficult.shape[0]}).")
        boxes.append(image_boxes)
        labels.append(image_labels)
        difficult.append(image_difficult)
        counts.append(image_boxes.shape[0])
    return {
        "boxes": _concatenate(boxes, None, (4,)),
        "labels": _concatenate(labels, np.int64),
        "difficult": _concatenate(difficult, bool),
        "images": np.repeat(np.arange(len(counts)), counts),
    }


def rows_by_label(labels) -> dict:
    """{label: row indices of that label, ascending} from one stable sort."""
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    ends = np.r_[starts[1:], order.size]
    return {int(v): order[lo:hi] for v, lo, hi in zip(values, starts, ends)}


def evaluated_labels(gts) -> list:
    """The classes that count: those with at least one non-difficult ground truth."""
    return [int(label) for label in np.unique(gts["labels"][~gts["difficult"]])]


def _raw(value) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor, list or None, dtype untouched."""
    if value is None:
        return np.zeros(0)
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _concatenate(arrays, dtype, shape_tail=()):
    """Concatenate, then cast to ``dtype``; ``None`` keeps a real dtype as it is.

    Boxes and scores keep e.g. float32: they are cast to float64 later, only for the
    rows that need it (exact, so the numbers are those of float64 inputs).
    """
    if not arrays:
        return np.zeros((0, *shape_tail), dtype=dtype or np.float64)
    joined = np.concatenate(arrays)
    if dtype is None:
        if joined.dtype.kind in "fiu":
            return joined
        dtype = np.float64
    return joined.astype(dtype, copy=False)
