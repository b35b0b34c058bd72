"""COCO detection / instance-segmentation dataset over pycocotools.

Conventions (mmdetection 2.x ``CocoDataset`` and torchvision references):
- Labels are contiguous, 1..K in the order of the sorted category ids (0 is the
  background); ``label_to_cat_id`` / ``cat_id_to_label`` map back and forth.
- Boxes are ``[x, y, x + w, y + h]`` from the ``xywh`` bbox.
- Training keeps only usable objects: not crowd, ``w >= 1``, ``h >= 1``, ``area > 0``,
  overlapping the image (mmdetection's ``_parse_ann_info``); images without any are
  skipped (``filter_empty_gt``). The test set keeps every image and every object, with
  ``iscrowd``, since evaluation reads the annotation file through ``.coco`` anyway.
- The JSON is read and checked once, at construction; ``__getitem__`` decodes the image
  and, with ``with_masks``, the object masks (polygons or RLE, via pycocotools).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from trainers.data.transforms import load_image
from trainers.errors import DatasetError


class COCODetection(torch.utils.data.Dataset):
    """Images of one COCO annotation file; ``target["image_id"]`` indexes ``image_ids``."""

    def __init__(self, ann_file, image_dir, train: bool = False, transforms=None,
                 with_masks: bool = False):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.train = train
        self.transforms = transforms
        self.with_masks = with_masks

        data = _load_json(self.ann_file)
        _check_coco_structure(data, self.ann_file, with_masks)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            self.coco.createIndex()

        cat_ids = sorted(self.coco.cats)
        # No COCO category has id 0, so 0 stands for the background.
        self.label_to_cat_id = [0] + cat_ids
        self.cat_id_to_label = {cat_id: label for label, cat_id in enumerate(cat_ids, start=1)}
        self.class_names = [self.coco.cats[cat_id]["name"] for cat_id in cat_ids]

        self.image_ids: list[int] = []
        self._records: list[dict] = []
        for coco_image_id in sorted(self.coco.imgs):
            record = self._image_record(coco_image_id)
            if train and len(record["labels"]) == 0:
                continue
            self.image_ids.append(coco_image_id)
            self._records.append(record)
        if not self._records:
            crowd = sum(1 for a in data["annotations"] if a.get("iscrowd", 0))
            raise DatasetError(str(self.ann_file),
                               f"holds no image usable for {'training' if train else 'testing'}: "
                               f"{len(data['images'])} images, {len(data['annotations'])} "
                               f"annotations, {crowd} of them crowd regions (training needs "
                               "non-crowd objects of at least 1x1 pixel inside the image).",
                               "Check that this is the right annotation file.")
        self._check_images_exist()

    def coco_image_id(self, index: int) -> int:
        """The COCO image id of dataset item ``index`` (``target["image_id"]``)."""
        return self.image_ids[index]

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index: int):
        record = self._records[index]
        image = load_image(self.image_dir / record["file_name"])
        target = {
            "boxes": torch.from_numpy(record["boxes"].copy()),
            "labels": torch.from_numpy(record["labels"].copy()),
            "image_id": index,
            "iscrowd": torch.from_numpy(record["iscrowd"].copy()),
        }
        if self.with_masks:
            masks = [segmentation_to_mask(ann["segmentation"], record["height"], record["width"])
                     for ann in record["anns"]]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks else
                               torch.zeros((0, record["height"], record["width"]),
                                           dtype=torch.uint8))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _image_record(self, coco_image_id: int) -> dict:
        """Boxes, labels and flags of one image, in arrays, computed once."""
        info = self.coco.imgs[coco_image_id]
        width, height = info["width"], info["height"]
        anns = []
        for ann in self.coco.imgToAnns.get(coco_image_id, []):
            if self.train and not _usable_for_training(ann, width, height):
                continue
            anns.append(ann)
        boxes = np.asarray([_xywh_to_xyxy(ann["bbox"]) for ann in anns],
                           dtype=np.float32).reshape(-1, 4)
        return {
            "file_name": info["file_name"],
            "width": width,
            "height": height,
            "boxes": boxes,
            "labels": np.asarray([self.cat_id_to_label[a["category_id"]] for a in anns],
                                 dtype=np.int64),
            "iscrowd": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            "anns": anns if self.with_masks else [],
        }

    def _check_images_exist(self):
        """Every used image file is in ``image_dir`` (one listing, not a stat per image)."""
        if not self.image_dir.is_dir():
            raise DatasetError(str(self.image_dir), "the image folder does not exist.",
                               "Point the dataset's images path at the folder of JPEGs.")
        present = set(os.listdir(self.image_dir))
        missing = [r["file_name"] for r in self._records
                   if r["file_name"] not in present
                   and not ("/" in r["file_name"] and (self.image_dir / r["file_name"]).is_file())]
        if missing:
            raise DatasetError(str(self.ann_file),
                               f"refers to images missing from {self.image_dir} "
                               f"({len(missing)} missing, first: {missing[0]}).",
                               "Check that the annotation file and image folder belong together.")


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or compressed RLE) -> uint8 (H, W) mask."""
    if isinstance(segmentation, list):
        # mmdetection drops polygons of fewer than 3 points; pycocotools rejects them.
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def _xywh_to_xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _usable_for_training(ann: dict, width: int, height: int) -> bool:
    if ann.get("iscrowd", 0):
        return False
    x, y, w, h = ann["bbox"]
    overlap_w = max(0.0, min(x + w, width) - max(x, 0.0))
    overlap_h = max(0.0, min(y + h, height) - max(y, 0.0))
    return overlap_w * overlap_h > 0 and ann["area"] > 0 and w >= 1 and h >= 1


def _load_json(path: Path):
    if not path.is_file():
        raise DatasetError(str(path), "annotation file does not exist.",
                           "Check the dataset's annotation paths.")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(str(path), f"not valid JSON ({exc}).",
                           "Replace the file with the dataset's original copy.") from exc
    except RecursionError:
        raise DatasetError(str(path), "not valid COCO JSON: nested too deeply.",
                           "Replace the file with the dataset's original copy.") from None
    except OSError as exc:
        raise DatasetError(str(path), f"cannot read the file ({exc}).") from exc


def _check_coco_structure(data, path: Path, with_masks: bool) -> None:
    """Fail fast, naming the file and the entry, on what would break training later."""
    where = str(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DatasetError(where, "not a COCO annotation file (needs 'images' and "
                           "'categories' lists).")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise DatasetError(where, "'annotations' is not a list.")

    image_ids = set()
    for position, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise DatasetError(where, f"images[{position}] is not an object: {str(image)[:80]}.")
        image_id = image.get("id")
        if not _is_int(image_id) or not isinstance(image.get("file_name"), str) \
                or not image["file_name"]:
            raise DatasetError(where, f"image entry {str(image)[:120]} needs an integer 'id', "
                               "a 'file_name' and positive 'width'/'height'.")
        if image_id in image_ids:
            raise DatasetError(where, f"image id {image_id} appears twice in 'images'.",
                               "Give every image its own id.")
        for field in ("width", "height"):
            value = image.get(field)
            if not (_is_int(value) and 0 < value <= MAX_IMAGE_SIDE):
                raise DatasetError(where, f"image id {image_id}: '{field}' must be an integer in "
                                   f"1..{MAX_IMAGE_SIDE}, got {value!r}"
                                   f"{_type_note(value)}.",
                                   "Write the image's size in pixels as a JSON number.")
        image_ids.add(image_id)
    category_ids = set()
    for category in data["categories"]:
        if not isinstance(category, dict) or not _is_int(category.get("id")) \
                or not isinstance(category.get("name"), str):
            raise DatasetError(where, f"category entry {str(category)[:120]} needs an "
                               "integer 'id' and a 'name'.")
        if category["id"] in category_ids:
            raise DatasetError(where, f"category id {category['id']} appears twice in "
                               "'categories'.", "Give every category its own id.")
        category_ids.add(category["id"])
    if not category_ids:
        raise DatasetError(where, "defines no category.")

    ann_ids = set()
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        what = f"annotation id {ann_id}"
        if not _is_int(ann_id):
            raise DatasetError(where, f"annotation entry {str(ann)[:120]} has no integer 'id'.")
        if ann_id in ann_ids:
            raise DatasetError(where, f"annotation id {ann_id} appears twice.",
                               "Give every annotation its own id.")
        ann_ids.add(ann_id)
        if ann.get("image_id") not in image_ids:
            raise DatasetError(where, f"{what}: image_id {ann.get('image_id')!r} is not in "
                               "'images'.")
        if ann.get("category_id") not in category_ids:
            raise DatasetError(where, f"{what}: category_id {ann.get('category_id')!r} is "
                               "not in 'categories'.")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite(v) for v in bbox)):
            raise DatasetError(where, f"{what}: bbox must be [x, y, width, height], got {bbox!r}.",
                               "Use four finite JSON numbers.")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(where, f"{what}: negative box size {bbox!r} (x2 < x1 or y2 < y1).")
        if "area" not in ann:  # pycocotools' evaluation needs it; COCO files always have it
            ann["area"] = float(bbox[2] * bbox[3])
        elif not (_is_finite(ann["area"]) and ann["area"] >= 0):
            raise DatasetError(where, f"{what}: 'area' must be a finite number >= 0, got "
                               f"{ann['area']!r}{_type_note(ann['area'])}.")
        if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), float):
            raise DatasetError(where, f"{what}: 'iscrowd' must be 0 or 1, got "
                               f"{ann.get('iscrowd')!r}.")
        if with_masks and "segmentation" not in ann:
            raise DatasetError(where, f"{what}: no 'segmentation', needed for mask training.")


MAX_IMAGE_SIDE = 100_000  # pixels; larger is a typo (and a memory blow-up when decoded)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _type_note(value) -> str:
    if isinstance(value, bool):
        return " (a boolean)"
    if isinstance(value, str):
        return " (a string: remove the quotes)"
    return ""
