"""COCO AP through pycocotools' ``COCOeval`` (bbox, and segm for Mask R-CNN).

Detectors speak contiguous labels 1..K and xyxy boxes; COCO results speak original
category ids and xywh boxes, masks as RLE. This module converts one into the other and
returns COCOeval's summary numbers as fractions under short names. A number COCOeval
cannot define (no ground truth in that area range, e.g. ``aps`` without small objects)
stays -1, as in ``COCOeval.stats``.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainers.errors import ConfigError, choice_error

IOU_TYPES = ("bbox", "segm")

# Names of COCOeval.stats[0:6]: AP@[.5:.95], AP@.5, AP@.75, AP small / medium / large.
SUMMARY_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl")

# Probabilities from a mask head are binarised here, like torchvision's reference.
MASK_THRESHOLD = 0.5


def coco_evaluate(coco_gt: COCO, predictions, label_to_cat_id, iou_types=("bbox",),
                  verbose: bool = False) -> dict:
    """COCO AP of ``predictions`` against ``coco_gt``.

    Args:
        coco_gt: the ground truth as a pycocotools ``COCO`` object.
        predictions: one dict per evaluated image: ``{"image_id": COCO image id,
            "boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,) in 1..K}`` and, for
            ``"segm"``, ``"masks"``: (N, H, W) or (N, 1, H, W) probabilities or binary
            masks at image size. Only the images listed here are evaluated (an image
            with no detections is listed with empty arrays); an empty list evaluates
            every ground-truth image, all missed.
        label_to_cat_id: contiguous label -> COCO category id, a dict or a list
            indexed by label.
        iou_types: ``("bbox",)`` or ``("bbox", "segm")``.
        verbose: let COCOeval print its usual tables.

    Returns:
        ``{"ap", "ap50", "ap75", "aps", "apm", "apl"}`` for bbox and the same keys
        prefixed ``segm_`` for segm, as Python floats.
    """
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise choice_error("iou_types", iou_type, IOU_TYPES)
    image_ids = sorted({int(prediction["image_id"]) for prediction in predictions}) or None
    metrics = {}
    for iou_type in iou_types:
        results = predictions_to_coco_results(predictions, label_to_cat_id, iou_type)
        evaluation = evaluate_coco_results(coco_gt, results, iou_type, image_ids, verbose)
        prefix = "" if iou_type == "bbox" else f"{iou_type}_"
        metrics.update(summary_metrics(evaluation, prefix))
    return metrics


def predictions_to_coco_results(predictions, label_to_cat_id, iou_type: str = "bbox") -> list:
    """Detector outputs -> COCO results dicts (xywh boxes or RLE masks, category ids)."""
    results = []
    for prediction in predictions:
        image_id = int(prediction["image_id"])
        scores = _numpy(prediction["scores"]).astype(np.float64).reshape(-1)
        labels = _numpy(prediction["labels"]).astype(np.int64).reshape(-1)
        category_ids = [category_id_of(label_to_cat_id, label) for label in labels.tolist()]
        if iou_type == "bbox":
            shapes = _xyxy_to_xywh(_numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4))
            key = "bbox"
        else:
            if "masks" not in prediction:
                raise ConfigError("predictions", f"image {image_id} has no 'masks'.",
                                  "segm evaluation needs the mask head's output.")
            shapes = _encode_masks(prediction["masks"], len(scores))
            key = "segmentation"
        for shape, score, category_id in zip(shapes, scores.tolist(), category_ids):
            results.append({"image_id": image_id, "category_id": category_id,
                            key: shape, "score": score})
    return results


def evaluate_coco_results(coco_gt: COCO, results: list, iou_type: str = "bbox",
                          image_ids=None, verbose: bool = False) -> COCOeval:
    """Run COCOeval (evaluate, accumulate, summarize) on a COCO results list.

    ``image_ids`` restricts the evaluation (None: every ground-truth image). Returns
    the COCOeval object, for ``summary_metrics`` and ``per_category_ap``.
    """
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = _load_results(coco_gt, results)
        evaluation = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def summary_metrics(evaluation: COCOeval, prefix: str = "") -> dict:
    return {prefix + key: float(value) for key, value in zip(SUMMARY_KEYS, evaluation.stats)}


def per_category_ap(evaluation: COCOeval) -> dict:
    """AP@[.5:.95] (area all, 100 detections) per category id that has ground truth."""
    precision = evaluation.eval["precision"]  # [iou thr, recall thr, category, area, max dets]
    aps = {}
    for k, category_id in enumerate(evaluation.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        if values.size:
            aps[int(category_id)] = float(values.mean())
    return aps


def coco_ground_truth(coco_gt: COCO, image_ids, cat_id_to_label) -> list:
    """Per COCO image id, its ground truth as ``save_detections`` takes it.

    ``{"boxes": (G, 4) float32 xyxy, "labels": (G,) contiguous, "iscrowd": (G,) bool,
    "xywh": (G, 4) float64}`` with every annotation of the image in the annotation file's
    order (the order ``COCOeval`` sees them in), crowd regions included; ``xywh`` is the
    file's ``bbox`` as it is (``COCOeval``'s IoUs are computed from it, and float32 ``xyxy``
    would round it). ``report --ci`` recomputes the logged bbox AP from these
    (``reports.coco_bootstrap``).
    """
    out = []
    for image_id in image_ids:
        anns = coco_gt.imgToAnns.get(int(image_id), [])
        boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                            for a in anns], dtype=np.float32).reshape(-1, 4)
        out.append({"boxes": boxes,
                    "labels": np.asarray([cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64),
                    "iscrowd": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
                    "xywh": np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)})
    return out


def category_id_of(label_to_cat_id, label: int) -> int:
    try:
        if isinstance(label_to_cat_id, dict):
            return int(label_to_cat_id[label])
        if label < 0:
            raise IndexError(label)
        return int(label_to_cat_id[label])
    except (KeyError, IndexError):
        raise ConfigError("label_to_cat_id", f"has no category id for label {label}.",
                          "Map every contiguous label the detector predicts (1..K).") from None


def _load_results(coco_gt: COCO, results: list) -> COCO:
    if results:
        return coco_gt.loadRes(results)
    # loadRes cannot take an empty list (it looks at results[0]); an empty results
    # object makes COCOeval count every ground truth as missed, i.e. AP 0.
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                       "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def _encode_masks(masks, count: int) -> list:
    masks = _numpy(masks)
    if masks.ndim == 4:  # (N, 1, H, W) from torchvision's Mask R-CNN
        masks = masks[:, 0]
    if masks.shape[0] != count:
        raise ConfigError("predictions", f"{masks.shape[0]} masks for {count} detections.")
    if masks.dtype == bool:
        binary = masks
    else:
        binary = masks > MASK_THRESHOLD
    if count == 0:
        return []
    # encode wants (H, W, N) uint8 in Fortran order.
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable, same RLE
    return rles


def _xyxy_to_xywh(boxes: np.ndarray) -> list:
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return np.stack([boxes[:, 0], boxes[:, 1], widths, heights], axis=1).tolist()


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
