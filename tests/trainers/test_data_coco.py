"""COCO reader and COCO dataset config, on the synthetic COCO tree."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.data import (COCODetection, hflip, build_datasets,
                           validate_dataset_config)
from trainers.errors import ConfigError, DatasetError


def load(path):
    return json.loads(Path(path).read_text())


def coco_config(paths, **overrides):
    cfg = {"kind": "coco", "train_ann": paths["train_ann"], "train_images": paths["train_images"],
           "val_ann": paths["val_ann"], "val_images": paths["val_images"], "scale": [1333, 800],
           "flip": 0.5, "num_workers": 0}
    cfg.update(overrides)
    return cfg


@pytest.fixture
def coco_copy(synthetic_coco, tmp_path):
    """A private copy of the synthetic val split to break: (ann_file, image_dir)."""
    ann = tmp_path / "instances_val.json"
    shutil.copy(synthetic_coco["val_ann"], ann)
    shutil.copytree(synthetic_coco["val_images"], tmp_path / "val")
    return ann, tmp_path / "val"


def test_labels_are_contiguous_over_sorted_category_ids(synthetic_coco):
    data = load(synthetic_coco["val_ann"])
    dataset = COCODetection(synthetic_coco["val_ann"], synthetic_coco["val_images"])
    cat_ids = sorted(c["id"] for c in data["categories"])
    assert cat_ids == [1, 3, 5, 7]  # deliberately non-contiguous, as in real COCO
    assert dataset.label_to_cat_id == [0] + cat_ids
    assert dataset.cat_id_to_label == {1: 1, 3: 2, 5: 3, 7: 4}
    assert dataset.class_names == synthetic_coco["class_names"]


def test_test_mode_keeps_every_image_and_annotation(synthetic_coco):
    data = load(synthetic_coco["val_ann"])
    dataset = COCODetection(synthetic_coco["val_ann"], synthetic_coco["val_images"])
    assert dataset.image_ids == sorted(im["id"] for im in data["images"])
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert target["image_id"] == index
        anns = by_image.get(dataset.coco_image_id(index), [])
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["boxes"].tolist() == expected
        assert [dataset.label_to_cat_id[label] for label in target["labels"].tolist()] \
            == [a["category_id"] for a in anns]
        assert target["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64


def test_boxes_match_what_the_generator_drew(synthetic_coco):
    objects = load(synthetic_coco["manifest"])["objects"]
    dataset = COCODetection(synthetic_coco["train_ann"], synthetic_coco["train_images"])
    for index in range(len(dataset)):
        _, target = dataset[index]
        drawn = objects[f"{dataset.coco_image_id(index):06d}"]
        assert target["boxes"].tolist() == [o["box"] for o in drawn]
        assert target["labels"].tolist() == [o["label"] for o in drawn]


def test_train_mode_drops_crowd_regions(synthetic_coco):
    data = load(synthetic_coco["train_ann"])
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    assert crowd > 0  # the generator writes a few crowd regions
    train = COCODetection(synthetic_coco["train_ann"], synthetic_coco["train_images"], train=True)
    boxes = 0
    for index in range(len(train)):
        _, target = train[index]
        assert not target["iscrowd"].any()
        boxes += len(target["boxes"])
    assert boxes == len(data["annotations"]) - crowd


def test_train_mode_skips_images_without_usable_annotation(coco_copy):
    ann_file, image_dir = coco_copy
    data = load(ann_file)
    first, second = data["images"][0]["id"], data["images"][1]["id"]
    kept = [a for a in data["annotations"] if a["image_id"] not in (first, second)]
    crowd_only = dict(next(a for a in data["annotations"] if a["image_id"] == second),
                      iscrowd=1, id=10_000)
    tiny = dict(crowd_only, iscrowd=0, id=10_001, bbox=[3, 3, 0.5, 4])  # w < 1: unusable
    data["annotations"] = kept + [crowd_only, tiny]
    ann_file.write_text(json.dumps(data))
    train = COCODetection(ann_file, image_dir, train=True)
    assert first not in train.image_ids and second not in train.image_ids
    assert len(train) == len(data["images"]) - 2
    test_mode = COCODetection(ann_file, image_dir)
    assert len(test_mode) == len(data["images"])
    _, target = test_mode[test_mode.image_ids.index(second)]
    assert target["iscrowd"].tolist() == [True, False]
    assert test_mode[test_mode.image_ids.index(first)][1]["boxes"].shape == (0, 4)


def test_masks_decode_to_the_annotated_area_and_box(synthetic_coco):
    dataset = COCODetection(synthetic_coco["train_ann"], synthetic_coco["train_images"],
                            with_masks=True)
    kinds = set()
    for index in range(len(dataset)):
        _, target = dataset[index]
        anns = dataset.coco.imgToAnns.get(dataset.coco_image_id(index), [])
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(anns), 128, 128)
        for mask, ann, box in zip(masks, anns, target["boxes"]):
            kinds.add(type(ann["segmentation"]).__name__)
            area = int(mask.sum())
            assert abs(area - ann["area"]) <= 0.05 * ann["area"] + 2, (ann["id"], area)
            rows, cols = np.nonzero(mask.numpy())
            mask_box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert np.abs(np.array(mask_box) - box.numpy()).max() <= 1
    assert kinds == {"list", "dict"}  # polygons and crowd RLE both exercised


def test_flip_moves_masks_with_boxes(synthetic_coco):
    dataset = COCODetection(synthetic_coco["train_ann"], synthetic_coco["train_images"],
                            train=True, with_masks=True)
    image, target = dataset[0]
    flipped_image, flipped = hflip(image, target)
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    assert torch.equal(flipped_image, image.flip(-1))
    for mask, box in zip(flipped["masks"], flipped["boxes"]):
        cols = mask.any(0).nonzero().flatten()
        assert abs(float(cols.min()) - float(box[0])) <= 1
        assert abs(float(cols.max()) + 1 - float(box[2])) <= 1


def test_build_datasets_from_coco_config(synthetic_coco):
    train, test = build_datasets(coco_config(synthetic_coco), with_masks=True)
    assert train.train and train.with_masks and not test.train
    assert len(test) == len(load(synthetic_coco["val_ann"])["images"])
    assert train.transforms is None  # flips are the sampler's
    assert "masks" in train[0][1]


# --- bad input ------------------------------------------------------------------------

def _edit(ann_file, change):
    data = load(ann_file)
    change(data)
    ann_file.write_text(json.dumps(data))


@pytest.mark.parametrize("change, words", [
    (lambda d: d["annotations"][0].update(image_id=999_999), "image_id 999999 is not in"),
    (lambda d: d["annotations"][0].update(category_id=2), "category_id 2 is not in"),
    (lambda d: d["annotations"][0]["bbox"].__setitem__(2, -4), "negative box size"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox must be"),
    (lambda d: d.pop("images"), "not a COCO annotation file"),
    (lambda d: d["images"][0].pop("file_name"), "needs an integer 'id', a 'file_name'"),
    (lambda d: d.update(categories=[]), "defines no category"),
])
def test_bad_coco_annotations_name_the_file(coco_copy, change, words):
    ann_file, image_dir = coco_copy
    _edit(ann_file, change)
    with pytest.raises(DatasetError) as info:
        COCODetection(ann_file, image_dir)
    assert info.value.where == str(ann_file)
    assert words in str(info.value)


def test_invalid_json_names_the_file(coco_copy):
    ann_file, image_dir = coco_copy
    ann_file.write_text(ann_file.read_text()[:-10])
    with pytest.raises(DatasetError, match="not valid JSON") as info:
        COCODetection(ann_file, image_dir)
    assert info.value.where == str(ann_file)
    ann_file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="not valid JSON"):
        COCODetection(ann_file, image_dir)


def test_missing_images_and_files_are_named(coco_copy, tmp_path):
    ann_file, image_dir = coco_copy
    first = load(ann_file)["images"][0]["file_name"]
    (image_dir / first).unlink()
    with pytest.raises(DatasetError, match=f"1 missing, first: {first}") as info:
        COCODetection(ann_file, image_dir)
    assert info.value.where == str(ann_file)
    with pytest.raises(DatasetError, match="image folder does not exist") as info:
        COCODetection(ann_file, tmp_path / "nowhere")
    assert info.value.where == str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="annotation file does not exist"):
        COCODetection(tmp_path / "none.json", image_dir)


def test_masks_require_segmentations(coco_copy):
    ann_file, image_dir = coco_copy
    _edit(ann_file, lambda d: d["annotations"][0].pop("segmentation"))
    COCODetection(ann_file, image_dir)  # boxes only: fine
    with pytest.raises(DatasetError, match="no 'segmentation'"):
        COCODetection(ann_file, image_dir, with_masks=True)


@pytest.mark.parametrize("override, field, error", [
    ({"train_ann": None}, "dataset.train_ann", ConfigError),
    ({"val_ann": "/no/such.json"}, "dataset.val_ann", DatasetError),
    ({"val_images": "/no/such/folder"}, "dataset.val_images", DatasetError),
    ({"repeat": 3}, "dataset.repeat", ConfigError),
])
def test_validate_coco_config_names_the_field(synthetic_coco, override, field, error):
    validate_dataset_config(coco_config(synthetic_coco))
    with pytest.raises(error) as info:
        validate_dataset_config(coco_config(synthetic_coco, **override))
    assert type(info.value) is error
    assert info.value.where.split(" = ")[0] == field
