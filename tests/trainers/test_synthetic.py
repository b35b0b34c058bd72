"""The synthetic dataset generator and ``alwa-sweep make-synthetic``."""

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from alwa_sweep.cli import main
from trainers.data import VOC_CLASSES, VOCDetection
from trainers.data.synthetic import (CLASS_STYLES, make_synthetic, rasterize_polygon,
                                     rle_counts)
from trainers.errors import ConfigError, DatasetError


def tree_bytes(folder) -> dict:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("format", ["voc", "coco"])
def test_same_seed_same_bytes_other_seed_other_data(tmp_path, format):
    make_synthetic(tmp_path / "a", format=format, images=12, seed=5)
    make_synthetic(tmp_path / "b", format=format, images=12, seed=5)
    make_synthetic(tmp_path / "c", format=format, images=12, seed=6)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert len(a) > 12 and a == b
    # The split depends on the seed too (COCO puts images in train/ or val/): compare by name.
    a, c = ({Path(k).name: v for k, v in tree.items()} for tree in (a, c))
    assert a.keys() == c.keys()
    differing = [name for name in a if a[name] != c[name]]
    assert sum(name.endswith(".jpg") for name in differing) >= 10
    assert f"synthetic_{format}.json" in differing


def test_split_and_object_statistics(tmp_path):
    paths = make_synthetic(tmp_path, format="voc", images=200, seed=3)
    manifest = json.loads(Path(paths["manifest"]).read_text())
    splits = manifest["splits"]
    assert len(splits["test"]) == 50 and len(splits["trainval"]) == 150
    assert set(splits["test"]).isdisjoint(splits["trainval"])
    assert sorted(splits["train"] + splits["val"]) == splits["trainval"]
    counts = [len(objs) for objs in manifest["objects"].values()]
    assert min(counts) >= 1 and max(counts) <= 4
    objects = [o for objs in manifest["objects"].values() for o in objs]
    sides = np.array([max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) for o in objects])
    assert sides.min() >= 16 and sides.max() <= 60
    difficult = np.mean([o["difficult"] for o in objects])
    assert 0.04 < difficult < 0.2
    assert {o["class"] for o in objects} == set(VOC_CLASSES[:4]) == set(paths["class_names"])
    # The standard 20-class reader reads it, with the same labels.
    dataset = VOCDetection(paths["root"], paths["test_sets"])
    assert len(dataset) == 50


def test_class_styles_differ_in_both_shape_and_colour():
    shapes = [shape for shape, _ in CLASS_STYLES]
    colours = [colour for _, colour in CLASS_STYLES]
    assert len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)


def test_rasterized_polygon_has_the_shoelace_area():
    polygon = np.array([(10.0, 5.0), (90.0, 20.0), (60.0, 70.0), (15.0, 50.0)])
    x, y = polygon[:, 0], polygon[:, 1]
    exact = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    mask = rasterize_polygon(polygon, 100, 100)
    assert abs(int(mask.sum()) - exact) < 0.02 * exact
    square = rasterize_polygon(np.array([(2.0, 3.0), (7.0, 3.0), (7.0, 9.0), (2.0, 9.0)]), 12, 12)
    rows, cols = np.nonzero(square)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (2, 6, 3, 8)


def test_rle_counts_decode_with_pycocotools():
    rng = np.random.default_rng(0)
    for first_pixel in (0, 1):
        mask = rng.random((9, 7)) < 0.4
        mask[0, 0] = bool(first_pixel)
        counts = rle_counts(mask)
        assert sum(counts) == mask.size
        rle = mask_utils.frPyObjects({"counts": counts, "size": [9, 7]}, 9, 7)
        np.testing.assert_array_equal(mask_utils.decode(rle), mask.astype(np.uint8))


def test_reuses_a_complete_tree_and_regenerates_on_new_parameters(tmp_path):
    paths = make_synthetic(tmp_path, format="coco", images=8, seed=0)
    manifest = Path(paths["manifest"])
    stamp = manifest.stat().st_mtime_ns
    assert make_synthetic(tmp_path, format="coco", images=8, seed=0) == paths
    assert manifest.stat().st_mtime_ns == stamp  # nothing rewritten
    make_synthetic(tmp_path, format="coco", images=6, seed=0)
    jpegs = list((tmp_path / "train").glob("*.jpg")) + list((tmp_path / "val").glob("*.jpg"))
    assert len(jpegs) == 6  # the 8-image tree was removed, not mixed in
    # VOC and COCO trees can share an output folder.
    make_synthetic(tmp_path, format="voc", images=6, seed=0)
    assert make_synthetic(tmp_path, format="coco", images=6, seed=0)["train_ann"]


def test_refuses_to_overwrite_a_foreign_tree(tmp_path):
    foreign = tmp_path / "VOCdevkit" / "VOC2007"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not written by make-synthetic"):
        make_synthetic(tmp_path, format="voc", images=8)
    assert (foreign / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, field", [
    ({"format": "kitti"}, "format"), ({"images": 3}, "images"), ({"size": 32}, "size"),
    ({"num_classes": 9}, "num_classes"),
])
def test_bad_parameters(tmp_path, kwargs, field):
    with pytest.raises(ConfigError) as info:
        make_synthetic(tmp_path, **kwargs)
    assert info.value.where == field


def test_cli_writes_a_readable_tree(tmp_path, capsys):
    out = tmp_path / "data"
    rc = main(["make-synthetic", "--format", "voc", "--out", str(out), "--images", "8",
               "--seed", "1", "--size", "96"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "VOCdevkit") in printed and "2007/test" in printed
    dataset = VOCDetection(out / "VOCdevkit", ["2007/trainval", "2007/test"])
    assert len(dataset) == 8 and dataset[0][0].shape == (3, 96, 96)
    assert main(["make-synthetic", "--format", "coco", "--out", str(out), "--images", "5"]) == 0
    assert (out / "annotations" / "instances_val.json").is_file()
    with pytest.raises(SystemExit) as info:
        main(["make-synthetic", "--out", str(out), "--images", "2"])
    assert info.value.code == 2
    assert "--images" in capsys.readouterr().err
