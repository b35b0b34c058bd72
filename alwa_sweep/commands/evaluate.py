"""``alwa-sweep evaluate``: score a saved detections file against VOC or COCO ground truth.

VOC detections file: a JSON list of ``{"image_id": "<VOC image id>", "class": "<class
name>"`` (or ``"label": <1..20>``) ``, "bbox": [x1, y1, x2, y2], "score": <float>}``, in
the coordinates of ``trainers.data.voc`` (the XML's numbers as they are).
COCO detections file: the standard COCO results JSON, a list of ``{"image_id",
"category_id", "bbox": [x, y, w, h], "score"}`` (``"segmentation"`` RLE for segm).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from alwa_sweep.commands.argcheck import float_in, one_paragraph_errors
from trainers.errors import ConfigError, DatasetError
from trainers.evaluation.coco import (SUMMARY_KEYS, evaluate_coco_results, per_category_ap,
                                      summary_metrics)
from trainers.evaluation.voc import METHODS, voc_map



def _voc_set(text: str) -> str:
    """An argparse type: ``YEAR/SPLIT``."""
    from trainers.data.voc import parse_voc_set

    try:
        parse_voc_set(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _nonempty_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def add_arguments(parser) -> None:
    one_paragraph_errors(parser)
    parser.add_argument("--dataset", choices=("voc", "coco"), required=True,
                        help="ground-truth format")
    parser.add_argument("--detections", required=True, metavar="FILE", type=_nonempty_path,
                        help="detections JSON; VOC: a list of {image_id (VOC id string), "
                             "class (name) or label (1..20), bbox [x1,y1,x2,y2], score}; "
                             "COCO: the standard results list {image_id, category_id, "
                             "bbox [x,y,w,h], score}")
    voc = parser.add_argument_group("VOC")
    voc.add_argument("--voc-root", metavar="DIR", type=_nonempty_path, help="VOCdevkit folder (holds VOC2007/ ...)")
    voc.add_argument("--sets", action="append", metavar="YEAR/SPLIT", type=_voc_set,
                     help="image set(s) to evaluate on, repeatable (default: 2007/test)")
    voc.add_argument("--method", choices=METHODS, default="11point",
                     help="11point (VOC2007 metric, the paper's) or area (VOC2010+)")
    voc.add_argument("--iou", type=float_in(0.0, 1.0, lo_open=True), default=0.5,
                     help="IoU threshold, in (0, 1] (default: 0.5)")
    voc.add_argument("--legacy-coordinates", action="store_true",
                     help="box sizes x2-x1+1 as in the devkit / py-faster-rcnn "
                          "(default: x2-x1, mmdetection 2.x)")
    coco = parser.add_argument_group("COCO")
    coco.add_argument("--ann-file", metavar="FILE", type=_nonempty_path, help="COCO instances_*.json ground truth")
    coco.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox",
                      help="what the results hold (default: bbox)")


def run(args) -> int:
    if args.dataset == "coco":
        unused = [flag for flag, value, default in (("--voc-root", args.voc_root, None),
                                                    ("--sets", args.sets, None),
                                                    ("--method", args.method, "11point"),
                                                    ("--iou", args.iou, 0.5),
                                                    ("--legacy-coordinates", args.legacy_coordinates, False))
                  if value != default]
        if unused:
            raise ConfigError(unused[0], "is a VOC option; it has no effect with --dataset coco.",
                              "Remove it (COCO AP averages IoU 0.50:0.95 itself).")
    elif args.ann_file is not None or args.iou_type != "bbox":
        flag = "--ann-file" if args.ann_file is not None else "--iou-type"
        raise ConfigError(flag, "is a COCO option; it has no effect with --dataset voc.",
                          "Remove it, or use --dataset coco.")
    if args.dataset == "voc":
        return run_voc(args)
    return run_coco(args)


# ----------------------------------------------------------------------------- VOC
def run_voc(args) -> int:
    from trainers.data.voc import VOCDetection, parse_voc_set

    if not args.voc_root:
        raise ConfigError("--voc-root", "is required with --dataset voc.",
                          "Point it at the VOCdevkit folder.")
    if not (math.isfinite(args.iou) and 0.0 < args.iou <= 1.0):
        raise ConfigError("--iou", f"must be a number in (0, 1], got {args.iou}.")
    sets = []
    for text in args.sets or ["2007/test"]:
        try:
            sets.append(parse_voc_set(text))
        except ValueError as exc:
            raise ConfigError("--sets", str(exc) + ".") from None
    dataset = VOCDetection(args.voc_root, sets=sets, train=False)
    annotations = dataset.annotations
    class_names = dataset.class_names

    detections = read_voc_detections(Path(args.detections), annotations, class_names)
    result = voc_map(detections, annotations, iou_threshold=args.iou, method=args.method,
                     legacy_coordinates=args.legacy_coordinates)

    rows = []
    for label, name in enumerate(class_names, start=1):
        num_gt = sum(int(np.count_nonzero(a["labels"][~a["difficult"]] == label))
                     for a in annotations)
        num_difficult = sum(int(np.count_nonzero(a["labels"][a["difficult"]] == label))
                            for a in annotations)
        num_det = sum(int(np.count_nonzero(d["labels"] == label)) for d in detections)
        if num_gt or num_difficult or num_det:
            rows.append((name, num_gt, num_det, result["ap"].get(label)))
    set_names = ", ".join(f"{year}/{split}" for year, split in sets)
    print(f"VOC {set_names}: {len(annotations)} images, IoU {args.iou:g}, {args.method}"
          + (", legacy coordinates" if args.legacy_coordinates else ""))
    print(format_table(rows, "#gt"))
    num_difficult = sum(int(a["difficult"].sum()) for a in annotations)
    print(f"mAP: {result['map']:.4f} over {len(result['ap'])} classes "
          f"(#gt counts non-difficult objects; {num_difficult} difficult ones ignored)")
    return 0


def read_voc_detections(path: Path, annotations, class_names) -> list:
    """The file's detections as ``voc_map`` input, one entry per dataset image."""
    entries = _read_json_list(path)
    index_of_image = {a["image_id"]: i for i, a in enumerate(annotations)}
    label_of_class = {name: label for label, name in enumerate(class_names, start=1)}
    per_image = [([], [], []) for _ in annotations]
    for position, entry in enumerate(entries):
        what = f"entry {position}"
        if not isinstance(entry, dict):
            raise DatasetError(str(path), f"{what} is not an object: {str(entry)[:80]}.")
        image_id = entry.get("image_id")
        if image_id not in index_of_image:
            raise DatasetError(str(path), f"{what}: image_id {image_id!r} is not in the "
                               "evaluated sets.", "Check --sets (and that ids are strings "
                               "such as \"000001\").")
        if "class" in entry:
            if entry["class"] not in label_of_class:
                raise DatasetError(str(path), f"{what}: unknown class {entry['class']!r}.",
                                   f"Known classes: {', '.join(class_names)}.")
            label = label_of_class[entry["class"]]
        elif "label" in entry:
            label = entry["label"]
            if not (isinstance(label, int) and not isinstance(label, bool)
                    and 1 <= label <= len(class_names)):
                raise DatasetError(str(path), f"{what}: label {label!r} is not an integer "
                                   f"in 1..{len(class_names)}.")
        else:
            raise DatasetError(str(path), f"{what}: needs 'class' (a class name) or 'label'.")
        box = _numbers(entry.get("bbox"), 4)
        if box is None:
            raise DatasetError(str(path), f"{what}: bbox must be [x1, y1, x2, y2], "
                               f"got {entry.get('bbox')!r}.")
        score = _numbers([entry.get("score")], 1)
        if score is None:
            raise DatasetError(str(path), f"{what}: score must be a number, "
                               f"got {entry.get('score')!r}.")
        boxes, scores, labels = per_image[index_of_image[image_id]]
        boxes.append(box)
        scores.append(score[0])
        labels.append(label)
    return [{"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
             "scores": np.asarray(scores, dtype=np.float64),
             "labels": np.asarray(labels, dtype=np.int64)} for boxes, scores, labels in per_image]


# ---------------------------------------------------------------------------- COCO
def run_coco(args) -> int:
    from pycocotools.coco import COCO

    if not args.ann_file:
        raise ConfigError("--ann-file", "is required with --dataset coco.",
                          "Point it at the instances_*.json ground truth.")
    ann_path = Path(args.ann_file)
    ground_truth = _read_json(ann_path)
    if not (isinstance(ground_truth, dict)
            and all(isinstance(ground_truth.get(k), list)
                    for k in ("images", "annotations", "categories"))):
        raise DatasetError(str(ann_path), "not a COCO annotation file (needs lists "
                           "'images', 'annotations' and 'categories').")
    coco_gt = COCO()
    coco_gt.dataset = ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()

    results = read_coco_results(Path(args.detections), coco_gt, args.iou_type)
    evaluation = evaluate_coco_results(coco_gt, results, args.iou_type)
    metrics = summary_metrics(evaluation)
    category_aps = per_category_ap(evaluation)

    gt_counts = Counter(a.get("category_id") for a in coco_gt.dataset["annotations"]
                        if not a.get("iscrowd", 0))
    det_counts = Counter(r["category_id"] for r in results)
    rows = []
    for category in sorted(coco_gt.dataset["categories"], key=lambda c: c["id"]):
        category_id = category["id"]
        if gt_counts[category_id] or det_counts[category_id]:
            rows.append((category.get("name", str(category_id)), gt_counts[category_id],
                         det_counts[category_id], category_aps.get(category_id)))
    print(f"COCO {ann_path.name}: {len(coco_gt.getImgIds())} images, {args.iou_type}, "
          "AP@[.50:.95] per class")
    print(format_table(rows, "#gt"))
    names = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "aps": "APs", "apm": "APm",
             "apl": "APl"}
    print("  ".join(f"{names[key]} {_ap_text(metrics[key])}" for key in SUMMARY_KEYS))
    return 0


def read_coco_results(path: Path, coco_gt, iou_type: str) -> list:
    """A checked copy of a COCO results file (pycocotools only asserts)."""
    entries = _read_json_list(path)
    image_ids = set(coco_gt.getImgIds())
    category_ids = set(coco_gt.getCatIds())
    results = []
    for position, entry in enumerate(entries):
        what = f"entry {position}"
        if not isinstance(entry, dict):
            raise DatasetError(str(path), f"{what} is not an object: {str(entry)[:80]}.")
        if entry.get("image_id") not in image_ids:
            raise DatasetError(str(path), f"{what}: image_id {entry.get('image_id')!r} is not "
                               "in the ground truth.", "Evaluate against the matching --ann-file.")
        if entry.get("category_id") not in category_ids:
            raise DatasetError(str(path), f"{what}: category_id {entry.get('category_id')!r} "
                               "is not in the ground truth.")
        score = _numbers([entry.get("score")], 1)
        if score is None:
            raise DatasetError(str(path), f"{what}: score must be a number, "
                               f"got {entry.get('score')!r}.")
        result = {"image_id": entry["image_id"], "category_id": entry["category_id"],
                  "score": score[0]}
        if iou_type == "bbox":
            box = _numbers(entry.get("bbox"), 4)
            if box is None:
                raise DatasetError(str(path), f"{what}: bbox must be [x, y, width, height], "
                                   f"got {entry.get('bbox')!r}.")
            result["bbox"] = box
        else:
            segmentation = entry.get("segmentation")
            if not (isinstance(segmentation, dict) and "counts" in segmentation
                    and "size" in segmentation):
                raise DatasetError(str(path), f"{what}: segm evaluation needs a "
                                   "'segmentation' RLE ({'size', 'counts'}).")
            result["segmentation"] = segmentation
        results.append(result)
    return results


# ------------------------------------------------------------------------- shared
def format_table(rows, gt_header: str) -> str:
    """``rows`` of (class name, #gt, #det, AP or None) as aligned text."""
    width = max([len(name) for name, *_ in rows] + [5])
    gt_width = max(len(gt_header), 6)
    lines = [f"{'class':<{width}}  {gt_header:>{gt_width}}  {'#det':>7}  {'AP':>6}"]
    for name, num_gt, num_det, ap in rows:
        lines.append(f"{name:<{width}}  {num_gt:>{gt_width}}  {num_det:>7}  {_ap_text(ap):>6}")
    return "\n".join(lines)


def _ap_text(ap) -> str:
    # None: the class has no ground truth to score against; -1: COCO's "undefined".
    return "-" if ap is None or ap < 0 else f"{ap:.4f}"


def _read_json(path: Path):
    if not path.is_file():
        raise DatasetError(str(path), "file does not exist.")
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetError(str(path), f"not valid JSON ({exc}).") from exc
    except RecursionError:
        raise DatasetError(str(path), "not valid JSON for this purpose: nested too deeply.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(str(path), f"cannot read the file ({exc}).") from exc


def _read_json_list(path: Path) -> list:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(str(path), f"expected a JSON list of detections, got "
                           f"{type(data).__name__}.")
    return data


def _numbers(value, count: int):
    """``value`` as a list of ``count`` finite floats, or None if it is not one."""
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return None
    numbers = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            return None
        numbers.append(float(item))
    return numbers
