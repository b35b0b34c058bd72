"""Pascal VOC detection dataset (VOCdevkit layout), read the way mmdetection 2.x reads it.

Conventions (mmdetection 2.x ``XMLDataset``, which the paper's code uses):
- Box coordinates are the XML's 1-based pixel coordinates taken as they are
  (``int(float(text))``, no -1): a box covering pixel columns 0..9 reads as
  ``x1=1, x2=10``.
- Training drops difficult objects from the targets (mmdetection puts them in
  ``gt_bboxes_ignore``) and skips images without any object (``filter_empty_gt``);
  the test set keeps every object, with its ``difficult`` flag, for the VOC metric.
- Every XML is parsed once, at construction; ``__getitem__`` only decodes the JPEG.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from trainers.data.transforms import load_image
from trainers.errors import DatasetError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def parse_voc_set(text: str) -> tuple[str, str]:
    """``"2012/trainval"`` -> ``("2012", "trainval")``; ValueError if malformed."""
    parts = text.split("/") if isinstance(text, str) else []
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"expected 'year/split' such as '2007/test', got {text!r}")
    return parts[0], parts[1]


class VOCDetection(torch.utils.data.Dataset):
    """Union of VOC ``(year, split)`` sets under one VOCdevkit folder.

    ``annotations`` lists every image of the (base, un-repeated) dataset with all its
    objects, difficult ones included; ``target["image_id"]`` indexes it. Label ``i``
    is ``class_names[i - 1]`` (0 is the background, torchvision convention).
    """

    def __init__(self, root, sets=(("2007", "test"),), repeat: int = 1, train: bool = False,
                 transforms=None, class_names=VOC_CLASSES):
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.root = Path(root)
        self.repeat = int(repeat)
        self.train = train
        self.transforms = transforms
        self.class_names = list(class_names)
        if not self.root.is_dir():
            raise DatasetError(str(self.root), "the VOCdevkit folder does not exist.",
                               "Point dataset.root at the folder holding VOC2007/ and VOC2012/.")
        class_to_label = {name: label for label, name in enumerate(self.class_names, start=1)}

        self.annotations: list[dict] = []
        self.image_paths: list[Path] = []
        seen = set()
        for voc_set in sets:
            year, split = parse_voc_set(voc_set) if isinstance(voc_set, str) else voc_set
            year_dir = self.root / f"VOC{year}"
            for image_id in _read_split(year_dir, split):
                if (year, image_id) in seen:  # a union: an image listed twice counts once
                    continue
                seen.add((year, image_id))
                image_path = year_dir / "JPEGImages" / f"{image_id}.jpg"
                annotation = parse_voc_xml(year_dir / "Annotations" / f"{image_id}.xml",
                                           class_to_label, image_path)
                annotation["image_id"] = image_id
                if train and len(annotation["labels"]) == 0:
                    continue
                self.annotations.append(annotation)
                self.image_paths.append(image_path)
        if not self.annotations:
            raise DatasetError(str(self.root), f"the sets {list(sets)} hold no usable image.",
                               "Check the split files under ImageSets/Main.")

    def __len__(self):
        return self.repeat * len(self.annotations)

    def __getitem__(self, index: int):
        base_index = index % len(self.annotations)
        annotation = self.annotations[base_index]
        image = load_image(self.image_paths[base_index])
        keep = ~annotation["difficult"] if self.train else np.ones_like(annotation["difficult"])
        target = {
            "boxes": torch.from_numpy(annotation["boxes"][keep]),
            "labels": torch.from_numpy(annotation["labels"][keep]),
            "image_id": base_index,
            "difficult": torch.from_numpy(annotation["difficult"][keep]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _read_split(year_dir: Path, split: str) -> list[str]:
    """Image ids of ``ImageSets/Main/<split>.txt``, each checked to have XML and JPEG."""
    if not year_dir.is_dir():
        raise DatasetError(str(year_dir), "folder does not exist.",
                           "Download and extract that VOC year under dataset.root.")
    split_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(str(split_file), "split file does not exist.",
                           "Use a split that the dataset has (train, val, trainval, test).")
    image_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not image_ids:
        raise DatasetError(str(split_file), "split file lists no image.")
    # One listing per folder instead of a stat per image.
    for folder, suffix in (("Annotations", ".xml"), ("JPEGImages", ".jpg")):
        directory = year_dir / folder
        if not directory.is_dir():
            raise DatasetError(str(directory), "folder does not exist.",
                               "The VOC tree is incomplete; extract it again.")
        present = set(os.listdir(directory))
        missing = [i for i in image_ids if i + suffix not in present]
        if missing:
            raise DatasetError(str(directory / (missing[0] + suffix)),
                               f"listed in {split_file} but missing "
                               f"({len(missing)} of {len(image_ids)} ids have no {suffix} file).",
                               "The VOC tree is incomplete; extract it again.")
    return image_ids


def parse_voc_xml(xml_path: Path, class_to_label: dict, image_path: Path | None = None) -> dict:
    """One VOC annotation file -> ``{"boxes", "labels", "difficult", "width", "height"}``.

    Raises DatasetError naming the file for malformed XML, unknown classes and empty
    boxes. Width/height come from ``<size>``, or from the image header when absent.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(str(xml_path), f"malformed XML ({exc}).",
                           "Replace the file with the dataset's original copy.") from exc

    def number(element, tag, what):
        child = element.find(tag)
        try:
            value = float(child.text)
            if not math.isfinite(value):
                raise ValueError(value)
            return int(value)
        except (AttributeError, TypeError, ValueError, OverflowError):
            text = None if child is None else child.text
            raise DatasetError(str(xml_path), f"{what}: missing or non-numeric <{tag}> "
                               f"(got {text!r}).", "Use a finite number of pixels.") from None

    size = root.find("size")
    if size is not None and size.find("width") is not None:
        width, height = number(size, "width", "<size>"), number(size, "height", "<size>")
        if width <= 0 or height <= 0:
            raise DatasetError(str(xml_path), f"<size>: width {width} and height {height} must "
                               "be positive.", "Replace the file with the dataset's original copy.")
    else:
        width, height = image_header_size(image_path)

    boxes, labels, difficult = [], [], []
    for index, obj in enumerate(root.findall("object")):
        what = f"object {index}"
        name_element = obj.find("name")
        name = name_element.text.strip() if name_element is not None and name_element.text else ""
        if name not in class_to_label:
            raise DatasetError(str(xml_path), f"{what}: unknown class {name!r}.",
                               f"Known classes: {', '.join(class_to_label)}.")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetError(str(xml_path), f"{what} ({name}): no <bndbox>.")
        box = [number(bndbox, tag, what) for tag in ("xmin", "ymin", "xmax", "ymax")]
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DatasetError(str(xml_path), f"{what} ({name}): empty box {box} "
                               "(needs xmax > xmin and ymax > ymin).")
        if box[0] < 0 or box[1] < 0 or box[2] > width + 1 or box[3] > height + 1:
            raise DatasetError(str(xml_path), f"{what} ({name}): box {box} [xmin, ymin, xmax, "
                               f"ymax] lies outside the {width}x{height} image.",
                               "Fix the box or the <size> of the annotation.")
        flag = obj.find("difficult")
        boxes.append(box)
        labels.append(class_to_label[name])
        difficult.append(flag is not None and number(obj, "difficult", what) == 1)

    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "difficult": np.asarray(difficult, dtype=bool),
        "width": width,
        "height": height,
    }


def image_header_size(image_path) -> tuple[int, int]:
    """``(width, height)`` from an image file's header; DatasetError naming the file."""
    if image_path is None:
        raise DatasetError("annotation", "has no <size> and no image to read it from.")
    try:
        with Image.open(image_path) as image:  # reads the header only
            return image.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(str(image_path), f"not a readable image ({exc}).",
                           "Replace the file with the dataset's original copy.") from None
