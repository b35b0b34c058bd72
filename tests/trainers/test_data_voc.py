"""VOC reader, transforms, dataset config and loaders, on the synthetic VOC tree."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.data import (VOC_CLASSES, VOCDetection, build_datasets, hflip,
                           validate_dataset_config)
from trainers.data.synthetic import CLASS_STYLES
from trainers.errors import ConfigError, DatasetError


def manifest(paths):
    return json.loads(Path(paths["manifest"]).read_text())


def voc_config(paths, **overrides):
    cfg = {"kind": "voc", "root": paths["root"], "train_sets": paths["train_sets"],
           "test_sets": paths["test_sets"], "repeat": 1, "scale": [1000, 600], "flip": 0.5,
           "num_workers": 0}
    cfg.update(overrides)
    return cfg


@pytest.fixture
def voc_copy(synthetic_voc, tmp_path):
    """A private copy of the synthetic tree to break; returns its VOC2007 folder."""
    root = tmp_path / "VOCdevkit"
    shutil.copytree(synthetic_voc["root"], root)
    return root / "VOC2007"


# --- reading ------------------------------------------------------------------------

def test_test_set_holds_every_image_and_object_as_drawn(synthetic_voc):
    truth = manifest(synthetic_voc)
    dataset = VOCDetection(synthetic_voc["root"], [("2007", "test")])
    assert [a["image_id"] for a in dataset.annotations] == truth["splits"]["test"]
    assert len(dataset) == len(truth["splits"]["test"])
    for annotation in dataset.annotations:
        objects = truth["objects"][annotation["image_id"]]
        # The generator records continuous 0-based boxes; VOC XML numbers pixels from 1
        # and includes the last pixel, and mmdetection 2.x reads it without a -1.
        expected = np.array([[x1 + 1, y1 + 1, x2, y2] for x1, y1, x2, y2 in
                             (o["box"] for o in objects)], dtype=np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(annotation["boxes"], expected)
        assert annotation["labels"].tolist() == [VOC_CLASSES.index(o["class"]) + 1 for o in objects]
        assert annotation["difficult"].tolist() == [o["difficult"] for o in objects]
        assert (annotation["width"], annotation["height"]) == (128, 128)
        assert annotation["boxes"].dtype == np.float32 and annotation["labels"].dtype == np.int64


def test_sample_is_torchvision_detection_form(synthetic_voc):
    dataset = VOCDetection(synthetic_voc["root"], ["2007/test"])
    image, target = dataset[3]
    assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["image_id"] == 3
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64
    assert target["difficult"].dtype == torch.bool
    np.testing.assert_array_equal(target["boxes"].numpy(), dataset.annotations[3]["boxes"])


def test_pixels_at_box_centres_have_the_class_colour(synthetic_voc):
    dataset = VOCDetection(synthetic_voc["root"], ["2007/test"])
    checked = 0
    for index, annotation in enumerate(dataset.annotations[:12]):
        image, _ = dataset[index]
        boxes = annotation["boxes"]
        for k, (box, label) in enumerate(zip(boxes, annotation["labels"])):
            cx, cy = (box[0] - 1 + box[2]) / 2, (box[1] - 1 + box[3]) / 2
            later = boxes[k + 1:]  # later objects are painted over earlier ones
            if np.any((later[:, 0] - 1 <= cx) & (cx <= later[:, 2]) &
                      (later[:, 1] - 1 <= cy) & (cy <= later[:, 3])):
                continue
            pixel = image[:, int(cy), int(cx)].numpy() * 255
            colour = np.array(CLASS_STYLES[label - 1][1])
            assert np.abs(pixel - colour).max() < 40, (annotation["image_id"], label, pixel)
            checked += 1
    assert checked >= 10


def test_union_of_sets_and_repeat(synthetic_voc):
    truth = manifest(synthetic_voc)
    root = synthetic_voc["root"]
    union = VOCDetection(root, [("2007", "train"), ("2007", "val")])
    assert sorted(a["image_id"] for a in union.annotations) == truth["splits"]["trainval"]
    # An image listed by two sets counts once.
    overlapping = VOCDetection(root, ["2007/trainval", "2007/train"])
    assert len(overlapping) == len(truth["splits"]["trainval"])

    base = VOCDetection(root, ["2007/test"])
    repeated = VOCDetection(root, ["2007/test"], repeat=3)
    n = len(base)
    assert len(repeated) == 3 * n and len(repeated.annotations) == n
    _, first = repeated[2]
    _, again = repeated[2 * n + 2]
    assert again["image_id"] == first["image_id"] == 2
    assert torch.equal(again["boxes"], first["boxes"])


def test_train_mode_drops_difficult_objects_but_annotations_keep_them(synthetic_voc):
    root = synthetic_voc["root"]
    train = VOCDetection(root, ["2007/trainval"], train=True)
    test_mode = VOCDetection(root, ["2007/trainval"], train=False)
    total_difficult = 0
    for index, annotation in enumerate(train.annotations):
        _, target = train[index]
        keep = ~annotation["difficult"]
        total_difficult += int(annotation["difficult"].sum())
        np.testing.assert_array_equal(target["boxes"].numpy(), annotation["boxes"][keep])
        np.testing.assert_array_equal(target["labels"].numpy(), annotation["labels"][keep])
        assert not target["difficult"].any()
        _, full = test_mode[index]
        assert len(full["boxes"]) == len(annotation["boxes"])
    assert total_difficult > 0  # the synthetic tree marks ~10 % of objects difficult


def test_train_mode_skips_images_without_objects(voc_copy):
    xml = voc_copy / "Annotations" / "000002.xml"
    text = xml.read_text()
    xml.write_text(text[:text.index("\t<object>")] + "</annotation>\n")
    (voc_copy / "ImageSets" / "Main" / "few.txt").write_text("000001\n000002\n000003\n")
    root = voc_copy.parent
    assert [a["image_id"] for a in VOCDetection(root, ["2007/few"], train=True).annotations] \
        == ["000001", "000003"]
    test_mode = VOCDetection(root, ["2007/few"])
    assert len(test_mode) == 3 and test_mode[1][1]["boxes"].shape == (0, 4)


def test_size_falls_back_to_the_image_header(voc_copy):
    xml = voc_copy / "Annotations" / "000001.xml"
    text = xml.read_text()
    start, end = text.index("\t<size>"), text.index("</size>") + len("</size>")
    xml.write_text(text[:start] + text[end:])
    (voc_copy / "ImageSets" / "Main" / "one.txt").write_text("000001\n")
    annotation = VOCDetection(voc_copy.parent, ["2007/one"]).annotations[0]
    assert (annotation["width"], annotation["height"]) == (128, 128)


# --- bad input ------------------------------------------------------------------------

def _replace_in(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _first_box_tag(xml: Path, tag: str) -> str:
    text = xml.read_text()
    start = text.index(f"<{tag}>")
    return text[start:text.index(f"</{tag}>", start) + len(tag) + 3]


@pytest.mark.parametrize("breakage, bad_file, words", [
    ("missing_split", "ImageSets/Main/test.txt", "split file does not exist"),
    ("missing_xml", "Annotations/{id}.xml", "missing"),
    ("missing_jpeg", "JPEGImages/{id}.jpg", "missing"),
    ("malformed_xml", "Annotations/{id}.xml", "malformed XML"),
    ("unknown_class", "Annotations/{id}.xml", "unknown class 'unicorn'"),
    ("empty_box_x", "Annotations/{id}.xml", "empty box"),
    ("empty_box_y", "Annotations/{id}.xml", "empty box"),
    ("non_numeric", "Annotations/{id}.xml", "non-numeric <xmax>"),
])
def test_bad_voc_tree_names_the_file(voc_copy, breakage, bad_file, words):
    image_id = (voc_copy / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    target = voc_copy / bad_file.format(id=image_id)
    if breakage.startswith("missing"):
        target.unlink()
    elif breakage == "malformed_xml":
        target.write_text(target.read_text()[:-30])
    elif breakage == "unknown_class":
        text = target.read_text()
        name = text[text.index("<name>"):text.index("</name>") + 7]
        _replace_in(target, name, "<name>unicorn</name>")
    elif breakage == "empty_box_x":
        _replace_in(target, _first_box_tag(target, "xmax"),
                    "<xmax>" + _first_box_tag(target, "xmin")[6:-7] + "</xmax>")
    elif breakage == "empty_box_y":
        _replace_in(target, _first_box_tag(target, "ymax"), "<ymax>0</ymax>")
    elif breakage == "non_numeric":
        _replace_in(target, _first_box_tag(target, "xmax"), "<xmax>wide</xmax>")
    with pytest.raises(DatasetError) as info:
        VOCDetection(voc_copy.parent, ["2007/test"])
    assert info.value.where == str(target)
    assert words in str(info.value)


def test_missing_root_and_year_name_the_folder(tmp_path, voc_copy):
    with pytest.raises(DatasetError, match="VOCdevkit folder does not exist") as info:
        VOCDetection(tmp_path / "nowhere", ["2007/test"])
    assert info.value.where == str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="folder does not exist") as info:
        VOCDetection(voc_copy.parent, ["2012/trainval"])
    assert info.value.where == str(voc_copy.parent / "VOC2012")


def test_undecodable_jpeg_names_the_file(voc_copy):
    image_id = (voc_copy / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    jpeg = voc_copy / "JPEGImages" / f"{image_id}.jpg"
    jpeg.write_bytes(b"not a jpeg at all")
    dataset = VOCDetection(voc_copy.parent, ["2007/test"])
    with pytest.raises(DatasetError, match="cannot decode") as info:
        dataset[0]
    assert info.value.where == str(jpeg)


# --- transforms ---------------------------------------------------------------------

def test_flip_boxes_and_masks_by_hand():
    image = torch.arange(2 * 3 * 10, dtype=torch.float32).reshape(2, 3, 10)
    masks = torch.zeros((1, 3, 10), dtype=torch.uint8)
    masks[0, 1, 2:5] = 1  # columns 2, 3, 4 -> 5, 6, 7 after the flip
    target = {"boxes": torch.tensor([[2.0, 0.0, 5.0, 3.0], [0.0, 1.0, 10.0, 2.0]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    flipped_image, flipped = hflip(image, target)
    # mmdetection 2.x: x1' = W - x2, x2' = W - x1 with W = 10, no -1.
    assert flipped["boxes"].tolist() == [[5.0, 0.0, 8.0, 3.0], [0.0, 1.0, 10.0, 2.0]]
    assert flipped["masks"][0, 1].nonzero().flatten().tolist() == [5, 6, 7]
    assert flipped_image[1, 2, 0] == image[1, 2, 9]
    assert torch.equal(flipped["labels"], target["labels"])
    assert target["boxes"][0, 0] == 2.0  # the input target is not modified


# --- config, build, loader ------------------------------------------------------------

def test_build_datasets_from_config(synthetic_voc):
    truth = manifest(synthetic_voc)
    train, test = build_datasets(voc_config(synthetic_voc, repeat=2))
    assert train.train and not test.train
    assert len(train) == 2 * len(truth["splits"]["trainval"])
    assert len(test) == len(truth["splits"]["test"])
    assert train.transforms is None and test.transforms is None  # flips are the sampler's
    assert train.class_names == list(VOC_CLASSES)
    small_train, _ = build_datasets(voc_config(synthetic_voc, flip=0.0,
                                               class_names=synthetic_voc["class_names"]))
    assert small_train.transforms is None
    assert small_train.class_names == synthetic_voc["class_names"]
    with pytest.raises(ConfigError, match="Mask R-CNN"):
        build_datasets(voc_config(synthetic_voc), with_masks=True)


@pytest.mark.parametrize("override, field, error", [
    ({"kind": "pascal"}, "dataset.kind", ConfigError),
    ({"root": None}, "dataset.root", ConfigError),
    ({"root": "/no/such/VOCdevkit"}, "dataset.root", DatasetError),
    ({"train_sets": "2007/trainval"}, "dataset.train_sets", ConfigError),
    ({"train_sets": ["2007-trainval"]}, "dataset.train_sets[0]", ConfigError),
    ({"test_sets": ["2007/test", "2012/val"]}, "dataset.test_sets[1]", DatasetError),
    ({"repeat": 0}, "dataset.repeat", ConfigError),
    ({"scale": [1000]}, "dataset.scale", ConfigError),
    ({"flip": 2}, "dataset.flip", ConfigError),
    ({"num_workers": -1}, "dataset.num_workers", ConfigError),
    ({"class_names": ["a", "a"]}, "dataset.class_names", ConfigError),
    ({"roots": "x"}, "dataset.roots", ConfigError),
])
def test_validate_dataset_config_names_the_field(synthetic_voc, override, field, error):
    with pytest.raises(error) as info:
        validate_dataset_config(voc_config(synthetic_voc, **override))
    assert type(info.value) is error
    assert info.value.where.split(" = ")[0] == field


def test_validate_accepts_the_good_config(synthetic_voc):
    validate_dataset_config(voc_config(synthetic_voc))
