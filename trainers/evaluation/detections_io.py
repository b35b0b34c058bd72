"""A trial's final test-set detections and ground truth in one compact ``.npz``.

Enough to recompute ``voc_map`` (and to resample images for a bootstrap) without the
dataset: per image its detections (boxes xyxy, scores, labels) and its ground truth
(boxes, labels, difficult; ``iscrowd`` for COCO), laid end to end in image order with a
count per image. Boxes and scores keep float32 (what the detector outputs), so ``voc_map``
of the loaded arrays equals ``voc_map`` of the engine's own tensors.

Arrays in the file: ``image_ids`` (N,) str; ``det_counts`` (N,) int64, ``det_boxes``
(D, 4) float32, ``det_scores`` (D,) float32, ``det_labels`` (D,) int32; ``gt_counts``,
``gt_boxes``, ``gt_labels``, ``gt_difficult`` (bool), ``gt_iscrowd`` (bool); for COCO,
when the annotations carry them, ``gt_xywh`` (G, 4) float64, the annotation file's boxes
unrounded (loaded as each annotation's ``"xywh"``); ``meta``
a JSON string (``format``, ``dataset``, ``iou_threshold``, ``method``,
``legacy_coordinates``, ``class_names`` and whatever the caller adds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainers.errors import UserInputError
from trainers.evaluation.voc import flatten_annotations, flatten_detections

FORMAT = "alwa-detections/1"


def save_detections(path, detections, annotations, *, image_ids=None, dataset: str = "voc",
                    iou_threshold: float = 0.5, method: str = "11point",
                    legacy_coordinates: bool = False, class_names=None, iscrowd=None,
                    extra_meta: dict | None = None) -> Path:
    """Write ``detections``/``annotations`` (the ``voc_map`` inputs, one dict per image) to ``path``.

    ``image_ids``: one id per image (default ``0..N-1``); two trials are compared image by
    image, so both must have evaluated the same images in the same order. ``iscrowd``: one
    bool array per image (COCO), default the annotations' own ``"iscrowd"`` where they
    have one, else all False. The evaluation settings go into
    ``meta`` so a reader recomputes the metric the trial logged.
    """
    if len(detections) != len(annotations):
        raise UserInputError("detections", f"{len(detections)} detection entries for "
                             f"{len(annotations)} annotated images.", "Pass one of each per image.")
    dets = flatten_detections(detections)
    gts = flatten_annotations(annotations)
    n_images = len(annotations)
    ids = np.asarray([str(i) for i in (range(n_images) if image_ids is None else image_ids)])
    if ids.shape != (n_images,):
        raise UserInputError("image_ids", f"{ids.size} ids for {n_images} images.")
    if iscrowd is None and any(entry.get("iscrowd") is not None for entry in annotations):
        iscrowd = [entry.get("iscrowd") if entry.get("iscrowd") is not None
                   else np.zeros(np.asarray(entry["labels"]).size, dtype=bool) for entry in annotations]
    crowd = (np.zeros(gts["labels"].size, dtype=bool) if iscrowd is None
             else np.concatenate([_numpy(c).astype(bool).reshape(-1) for c in iscrowd]
                                 or [np.zeros(0, dtype=bool)]))
    if crowd.size != gts["labels"].size:
        raise UserInputError("iscrowd", f"{crowd.size} flags for {gts['labels'].size} ground truths.")
    # COCO: the annotation file's xywh boxes as they are (what COCOeval's IoUs use)
    xywh = None
    if annotations and all(entry.get("xywh") is not None for entry in annotations):
        xywh = np.concatenate([_numpy(entry["xywh"]).astype(np.float64).reshape(-1, 4) for entry in annotations])
        if xywh.shape[0] != gts["labels"].size:
            raise UserInputError("annotations", f"{xywh.shape[0]} xywh boxes for {gts['labels'].size} ground truths.")
    meta = {"format": FORMAT, "dataset": dataset, "iou_threshold": float(iou_threshold),
            "method": method, "legacy_coordinates": bool(legacy_coordinates),
            "class_names": list(class_names) if class_names is not None else None,
            **(extra_meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez_compressed(
            handle, image_ids=ids,
            det_counts=np.bincount(dets["images"], minlength=n_images).astype(np.int64),
            det_boxes=np.asarray(dets["boxes"], dtype=np.float32).reshape(-1, 4),
            det_scores=np.asarray(dets["scores"], dtype=np.float32),
            det_labels=dets["labels"].astype(np.int32),
            gt_counts=np.bincount(gts["images"], minlength=n_images).astype(np.int64),
            gt_boxes=np.asarray(gts["boxes"], dtype=np.float32).reshape(-1, 4),
            gt_labels=gts["labels"].astype(np.int32), gt_difficult=gts["difficult"],
            gt_iscrowd=crowd, meta=np.asarray(json.dumps(meta)),
            **({} if xywh is None else {"gt_xywh": xywh}))
    return path


def load_detections(path) -> dict:
    """``{"detections": [...], "annotations": [...], "image_ids": array, "meta": dict}``.

    ``detections``/``annotations`` are the per-image dicts ``voc_map`` takes (views into
    the file's arrays). A file that is not one of ours is a ``UserInputError`` naming it.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError) as error:
        raise UserInputError(str(path), f"not a detections file ({error}).",
                             "It is written by trainers.evaluation.detections_io.save_detections.") from None
    if meta.get("format") != FORMAT:
        raise UserInputError(str(path), f"format {meta.get('format')!r}, expected {FORMAT!r}.")
    det_ends = np.cumsum(arrays["det_counts"])
    gt_ends = np.cumsum(arrays["gt_counts"])
    detections, annotations = [], []
    for i in range(arrays["image_ids"].size):
        d0, d1 = det_ends[i] - arrays["det_counts"][i], det_ends[i]
        g0, g1 = gt_ends[i] - arrays["gt_counts"][i], gt_ends[i]
        detections.append({"boxes": arrays["det_boxes"][d0:d1], "scores": arrays["det_scores"][d0:d1],
                           "labels": arrays["det_labels"][d0:d1]})
        annotations.append({"boxes": arrays["gt_boxes"][g0:g1], "labels": arrays["gt_labels"][g0:g1],
                            "difficult": arrays["gt_difficult"][g0:g1],
                            "iscrowd": arrays["gt_iscrowd"][g0:g1]})
        if "gt_xywh" in arrays:
            annotations[-1]["xywh"] = arrays["gt_xywh"][g0:g1]
    return {"detections": detections, "annotations": annotations,
            "image_ids": arrays["image_ids"], "meta": meta}


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
