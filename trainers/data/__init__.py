"""Datasets (Pascal VOC, COCO, synthetic), transforms and loaders.

Samples are ``(image, target)`` in torchvision detection form: ``image`` float32 CHW in
[0, 1] at the original size (the model's transform resizes it), ``target`` a dict with
``boxes`` (float32, xyxy), ``labels`` (int64, 1..K, 0 = background), ``image_id`` (index
into the dataset's image list), and ``difficult`` (VOC) / ``iscrowd`` / ``masks`` (COCO).
"""

from trainers.data.build import build_datasets, validate_dataset_config
from trainers.data.coco import COCODetection
from trainers.data.synthetic import make_synthetic
from trainers.data.transforms import collate_fn, hflip, load_image
from trainers.data.voc import VOC_CLASSES, VOCDetection

__all__ = [
    "COCODetection", "VOCDetection", "VOC_CLASSES",
    "build_datasets", "collate_fn", "hflip", "load_image",
    "make_synthetic", "validate_dataset_config",
]
