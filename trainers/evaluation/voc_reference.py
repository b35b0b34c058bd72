"""A plain-loop VOC mAP, written from the devkit's description, to check ``voc_map``.

Same signature and result as :func:`trainers.evaluation.voc.voc_map`; slow on purpose:
one Python iteration per detection and per ground truth, no vectorisation tricks, the
"already matched" flags kept as in ``VOCevaldet.m``. Only the input conversion and the
argument checks are shared with the fast version.
"""

from __future__ import annotations

import numpy as np

from trainers.errors import ConfigError
from trainers.evaluation.voc import check_arguments

_UNION_EPS = 2.220446049250313e-16  # float64 machine epsilon, as in voc.py


def voc_map_reference(detections, annotations, iou_threshold: float = 0.5,
                      method: str = "11point", legacy_coordinates: bool = False) -> dict:
    check_arguments(detections, annotations, iou_threshold, method)
    extra = 1.0 if legacy_coordinates else 0.0
    images_dets = [_image_detections(entry) for entry in detections]
    images_gts = [_image_annotations(entry) for entry in annotations]

    labels = set()
    for _, gt_labels, gt_difficult in images_gts:
        for label, difficult in zip(gt_labels.tolist(), gt_difficult.tolist()):
            if not difficult:
                labels.add(label)

    aps = {}
    for label in sorted(labels):
        aps[label] = _class_ap(label, images_dets, images_gts, iou_threshold, method, extra)
    mean_ap = sum(aps.values()) / len(aps) if aps else 0.0
    return {"map": float(mean_ap), "ap": aps}


def _class_ap(label, images_dets, images_gts, iou_threshold, method, extra):
    # Ground truth of this class, per image, with a "matched" flag each.
    gt_per_image = []
    num_positives = 0
    for boxes, gt_labels, gt_difficult in images_gts:
        entries = []
        for box, gt_label, difficult in zip(boxes.tolist(), gt_labels.tolist(),
                                            gt_difficult.tolist()):
            if gt_label == label:
                entries.append({"box": box, "difficult": difficult, "matched": False})
                if not difficult:
                    num_positives += 1
        gt_per_image.append(entries)

    # Detections of this class as (score, image, box), in image then in-image order;
    # Python's sort is stable, so sorting on -score alone gives the documented tie rule.
    candidates = []
    for image, (boxes, scores, det_labels) in enumerate(images_dets):
        for box, score, det_label in zip(boxes.tolist(), scores.tolist(), det_labels.tolist()):
            if det_label == label:
                candidates.append((score, image, box))
    candidates.sort(key=lambda candidate: -candidate[0])

    tp = []
    fp = []
    for _, image, box in candidates:
        best_iou = -1.0
        best = None
        for gt in gt_per_image[image]:
            overlap = _iou(box, gt["box"], extra)
            if overlap > best_iou:  # strict: the first ground truth wins ties
                best_iou = overlap
                best = gt
        if best is not None and best_iou >= iou_threshold:
            if best["difficult"]:
                tp.append(0)
                fp.append(0)
            elif not best["matched"]:
                best["matched"] = True
                tp.append(1)
                fp.append(0)
            else:
                tp.append(0)
                fp.append(1)
        else:
            tp.append(0)
            fp.append(1)

    recall = []
    precision = []
    tp_sum = 0
    fp_sum = 0
    for tp_i, fp_i in zip(tp, fp):
        tp_sum += tp_i
        fp_sum += fp_i
        recall.append(tp_sum / num_positives)
        precision.append(tp_sum / max(tp_sum + fp_sum, _UNION_EPS))

    if method == "11point":
        return _eleven_point(recall, precision)
    return _area(recall, precision)


def _as_numpy(value, dtype, shape_tail=()):
    """A numpy array from a numpy array, torch tensor, list or None (empty)."""
    if value is None:
        return np.zeros((0, *shape_tail), dtype=dtype)
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=dtype)
    if shape_tail:
        array = array.reshape(-1, *shape_tail)
    else:
        array = array.reshape(-1)
    return array


def _image_detections(entry):
    """(boxes float64 (N,4), scores float64 (N,), labels int64 (N,)) of one image."""
    boxes = _as_numpy(entry.get("boxes"), np.float64, (4,))
    scores = _as_numpy(entry.get("scores"), np.float64)
    labels = _as_numpy(entry.get("labels"), np.int64)
    if not boxes.shape[0] == scores.shape[0] == labels.shape[0]:
        raise ConfigError("detections", f"boxes, scores and labels differ in length "
                          f"({boxes.shape[0]}, {scores.shape[0]}, {labels.shape[0]}).")
    return boxes, scores, labels


def _image_annotations(entry):
    """(boxes float64 (M,4), labels int64 (M,), difficult bool (M,)) of one image."""
    boxes = _as_numpy(entry.get("boxes"), np.float64, (4,))
    labels = _as_numpy(entry.get("labels"), np.int64)
    difficult = entry.get("difficult")
    if difficult is None:
        difficult = np.zeros(labels.shape[0], dtype=bool)
    else:
        difficult = _as_numpy(difficult, bool)
    if not boxes.shape[0] == labels.shape[0] == difficult.shape[0]:
        raise ConfigError("annotations", f"boxes, labels and difficult differ in length "
                          f"({boxes.shape[0]}, {labels.shape[0]}, {difficult.shape[0]}).")
    return boxes, labels, difficult


def _iou(a, b, extra):
    inter_w = max(min(a[2], b[2]) - max(a[0], b[0]) + extra, 0.0)
    inter_h = max(min(a[3], b[3]) - max(a[1], b[1]) + extra, 0.0)
    intersection = inter_w * inter_h
    area_a = (a[2] - a[0] + extra) * (a[3] - a[1] + extra)
    area_b = (b[2] - b[0] + extra) * (b[3] - b[1] + extra)
    union = area_a + area_b - intersection
    return intersection / max(union, _UNION_EPS)


def _eleven_point(recall, precision):
    total = 0.0
    for step in range(11):
        threshold = step * 0.1  # 0.30000000000000004 etc., like np.arange(0, 1.1, 0.1)
        best = 0.0
        for r, p in zip(recall, precision):
            if r >= threshold and p > best:
                best = p
        total += best
    return total / 11


def _area(recall, precision):
    padded_recall = [0.0] + list(recall) + [1.0]
    envelope = [0.0] + list(precision) + [0.0]
    for i in range(len(envelope) - 2, -1, -1):
        envelope[i] = max(envelope[i], envelope[i + 1])
    total = 0.0
    for i in range(len(padded_recall) - 1):
        if padded_recall[i + 1] != padded_recall[i]:
            total += (padded_recall[i + 1] - padded_recall[i]) * envelope[i + 1]
    return total


# The same name as the fast version, so callers can swap the module.
voc_map = voc_map_reference
