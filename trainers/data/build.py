"""The engine config's ``dataset`` section -> checked paths, datasets and loaders.

```yaml
dataset:
  kind: voc                      # voc | coco
  root: data/VOCdevkit           # voc: the folder holding VOC2007/ and VOC2012/
  train_sets: ["2012/trainval"]  # voc: "year/split" strings, their union
  test_sets: ["2007/test"]
  class_names: null              # voc, optional: defaults to the 20 VOC classes
  repeat: 1                      # voc: training set repeat factor (released configs: 3)
  scale: [1000, 600]             # used by the model's transform, checked here
  flip: 0.5                      # horizontal-flip probability in training
  num_workers: 2
  # coco instead: train_ann, train_images, val_ann, val_images
```
"""

from __future__ import annotations

import os
from numbers import Real


from trainers.data.coco import COCODetection
from trainers.data.voc import VOC_CLASSES, VOCDetection, parse_voc_set
from trainers.errors import ConfigError, DatasetError, choice_error

KINDS = ("voc", "coco")
VOC_KEYS = ("root", "train_sets", "test_sets", "class_names", "repeat")
COCO_KEYS = ("train_ann", "train_images", "val_ann", "val_images")
COMMON_KEYS = ("kind", "scale", "flip", "num_workers")
KNOWN_KEYS = COMMON_KEYS + VOC_KEYS + COCO_KEYS
PATH_KEYS = ("root",) + COCO_KEYS


def resolve_dataset_paths(dataset_cfg: dict) -> dict:
    """A copy with every path made absolute against the current directory.

    Resolved where the config is read (the sweep driver): Ray Tune runs each trial in
    its own working directory, where a relative ``root: data/VOCdevkit`` that the
    driver checked would point nowhere.
    """
    resolved = dict(dataset_cfg)
    for key in PATH_KEYS:
        value = resolved.get(key)
        if isinstance(value, (str, os.PathLike)) and str(value):
            resolved[key] = os.path.abspath(os.path.expanduser(value))
    return resolved


def validate_dataset_config(dataset_cfg: dict) -> None:
    """Check keys, types and that every path exists, without reading the dataset.

    Raises ConfigError (bad key or value) or DatasetError (missing path), naming the
    field, e.g. ``dataset.root``. Cheap: meant to run before any trial starts.
    """
    if not isinstance(dataset_cfg, dict):
        raise ConfigError("dataset", "must be a mapping.",
                          "See the example in trainers/data/build.py.")
    unknown = sorted(set(dataset_cfg) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(f"dataset.{unknown[0]}", "unknown key.",
                          f"Known keys: {', '.join(KNOWN_KEYS)}.")
    kind = dataset_cfg.get("kind")
    if kind not in KINDS:
        raise choice_error("dataset.kind", kind, KINDS)

    scale = dataset_cfg.get("scale", [1000, 600])
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2
            and all(_is_int(v) and v > 0 for v in scale)):
        raise ConfigError("dataset.scale",
                          f"must be two positive integers [long, short], got {scale!r}.")
    flip = dataset_cfg.get("flip", 0.5)
    if not (isinstance(flip, Real) and not isinstance(flip, bool) and 0 <= flip <= 1):
        raise ConfigError("dataset.flip", f"must be a probability in [0, 1], got {flip!r}.")
    workers = dataset_cfg.get("num_workers", 2)
    if not (_is_int(workers) and workers >= 0):
        raise ConfigError("dataset.num_workers", f"must be an integer >= 0, got {workers!r}.")

    if kind == "voc":
        _validate_voc(dataset_cfg)
    else:
        _validate_coco(dataset_cfg)


def _validate_voc(cfg: dict) -> None:
    root = _required_path(cfg, "root", kind="voc")
    if not os.path.isdir(root):
        raise DatasetError(f"dataset.root = {root}", "folder does not exist.",
                           "Point it at the VOCdevkit folder holding VOC2007/ and VOC2012/ "
                           "(or run `alwa-sweep make-synthetic --format voc`).")
    for field in ("train_sets", "test_sets"):
        sets = cfg.get(field)
        if not (isinstance(sets, (list, tuple)) and sets):
            raise ConfigError(f"dataset.{field}", f"must be a non-empty list of 'year/split' "
                              f"strings such as ['2007/test'], got {sets!r}.")
        for i, text in enumerate(sets):
            try:
                year, split = parse_voc_set(text)
            except ValueError as exc:
                raise ConfigError(f"dataset.{field}[{i}]", f"{exc}.") from None
            split_file = os.path.join(root, f"VOC{year}", "ImageSets", "Main", f"{split}.txt")
            if not os.path.isfile(split_file):
                raise DatasetError(f"dataset.{field}[{i}] = {text!r}",
                                   f"split file {split_file} does not exist.",
                                   "Check dataset.root and the year/split names.")
    repeat = cfg.get("repeat", 1)
    if not (_is_int(repeat) and repeat >= 1):
        raise ConfigError("dataset.repeat", f"must be an integer >= 1, got {repeat!r}.")
    names = cfg.get("class_names")
    if names is not None and not (isinstance(names, (list, tuple)) and names
                                  and all(isinstance(n, str) for n in names)
                                  and len(set(names)) == len(names)):
        raise ConfigError("dataset.class_names", "must be a list of distinct class names.")


def _validate_coco(cfg: dict) -> None:
    for ann_key, image_key in (("train_ann", "train_images"), ("val_ann", "val_images")):
        ann = _required_path(cfg, ann_key, kind="coco")
        if not os.path.isfile(ann):
            raise DatasetError(f"dataset.{ann_key} = {ann}", "annotation file does not exist.",
                               "Point it at a COCO instances_*.json file.")
        images = _required_path(cfg, image_key, kind="coco")
        if not os.path.isdir(images):
            raise DatasetError(f"dataset.{image_key} = {images}", "image folder does not exist.")
    if cfg.get("repeat", 1) != 1:
        raise ConfigError("dataset.repeat", "only VOC training sets can be repeated.",
                          "Remove it or set it to 1 for COCO.")


def _required_path(cfg: dict, key: str, kind: str) -> str:
    value = cfg.get(key)
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"dataset.{key}", f"a path is required for kind: {kind}, got {value!r}.")
    return str(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_datasets(dataset_cfg: dict, with_masks: bool = False):
    """``(train_dataset, test_dataset)`` from the ``dataset`` config section.

    Training drops difficult / crowd objects; the test set keeps everything, for
    evaluation. Flips are the sampler's (``trainers.sampling``): a function of (seed,
    epoch), so a resumed run repeats them.
    """
    validate_dataset_config(dataset_cfg)
    if dataset_cfg["kind"] == "voc":
        if with_masks:
            raise ConfigError("dataset.kind", "Mask R-CNN needs instance masks, which VOC "
                              "detection annotations do not have.", "Use kind: coco.")
        class_names = dataset_cfg.get("class_names") or VOC_CLASSES
        train = VOCDetection(dataset_cfg["root"], dataset_cfg["train_sets"],
                             repeat=dataset_cfg.get("repeat", 1), train=True, class_names=class_names)
        test = VOCDetection(dataset_cfg["root"], dataset_cfg["test_sets"], train=False,
                            class_names=class_names)
        return train, test
    train = COCODetection(dataset_cfg["train_ann"], dataset_cfg["train_images"], train=True,
                          with_masks=with_masks)
    test = COCODetection(dataset_cfg["val_ann"], dataset_cfg["val_images"], train=False,
                         with_masks=with_masks)
    if train.class_names != test.class_names:
        raise DatasetError(f"dataset.val_ann = {dataset_cfg['val_ann']}",
                           "its categories differ from those of dataset.train_ann.")
    return train, test
