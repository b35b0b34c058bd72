"""Small, learnable synthetic detection datasets in the real VOC and COCO layouts.

Each class is one solid colour AND one shape (red square, green circle, blue triangle,
yellow cross, ...) on a dark, mildly noisy background, 1-4 objects of 18-60 px per
128 px image with little overlap: a tiny CNN detector learns it within a few hundred CPU
iterations, and the real readers (``VOCDetection``, ``COCODetection``) read it unchanged,
so tests and demos run the same code path as the paper's datasets.

Output is a function of the parameters only (one random generator per image, seeded by
``(seed, image index)``; fixed JPEG quality), so a re-run writes identical bytes. A
manifest next to the data records the parameters and every object drawn; a second call
with the same parameters finds it and reuses the tree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from trainers.data.voc import VOC_CLASSES
from trainers.errors import ConfigError, DatasetError

GENERATOR = "alwa-sweep synthetic v1"

# (shape, RGB colour) per class, in class order: both differ between any two classes.
CLASS_STYLES = (
    ("square", (220, 40, 40)),      # red
    ("circle", (40, 200, 60)),      # green
    ("triangle", (50, 100, 240)),   # blue
    ("cross", (235, 215, 40)),      # yellow
    ("diamond", (215, 60, 215)),    # magenta
    ("star", (40, 215, 215)),       # cyan
    ("bar", (245, 140, 30)),        # orange
    ("ell", (240, 240, 240)),       # white
)
MAX_CLASSES = len(CLASS_STYLES)


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (x, y) of ``shape`` spanning exactly the unit square."""
    if shape in ("square", "bar"):
        return np.array([(0, 0), (1, 0), (1, 1), (0, 1)], dtype=np.float64)
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)], axis=1)
    if shape == "triangle":
        return np.array([(0.5, 0), (1, 1), (0, 1)], dtype=np.float64)
    if shape == "cross":
        a, b = 1 / 3, 2 / 3
        return np.array([(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1),
                         (a, b), (0, b), (0, a), (a, a)], dtype=np.float64)
    if shape == "diamond":
        return np.array([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)], dtype=np.float64)
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
        points -= points.min(axis=0)
        return points / points.max(axis=0)
    if shape == "ell":
        return np.array([(0, 0), (0.4, 0), (0.4, 0.6), (1, 0.6), (1, 1), (0, 1)],
                        dtype=np.float64)
    raise ValueError(f"unknown shape {shape!r}")


UNIT_POLYGONS = {shape: _unit_polygon(shape) for shape, _ in CLASS_STYLES}
ASPECT = {"bar": 0.45}  # height / width; other shapes are drawn in a square box


def rasterize_polygon(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centre lies inside ``polygon``.

    Crossing-number test, evaluated only over the polygon's bounding patch.
    """
    mask = np.zeros((height, width), dtype=bool)
    c0, r0 = np.floor(polygon.min(axis=0)).astype(int)
    c1, r1 = np.ceil(polygon.max(axis=0)).astype(int)
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, width), min(r1, height)
    if c1 <= c0 or r1 <= r0:
        return mask
    ys, xs = np.mgrid[r0:r1, c0:c1]
    px, py = xs.ravel() + 0.5, ys.ravel() + 0.5
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0[None, :] > py[:, None]) != (y1[None, :] > py[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0[None, :] + (py[:, None] - y0[None, :]) * (x1 - x0)[None, :] / (y1 - y0)[None, :]
    inside = (np.count_nonzero(crosses & (px[:, None] < x_at), axis=1) % 2) == 1
    mask[r0:r1, c0:c1] = inside.reshape(r1 - r0, c1 - c0)
    return mask


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a boolean mask (column-major, zeros first)."""
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


def _tight_box(mask: np.ndarray) -> list[int]:
    """Continuous 0-based box ``[x1, y1, x2, y2]`` around the mask's pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _overlaps_too_much(box, placed, limit=0.1) -> bool:
    """Intersection above ``limit`` of the smaller box's area, against any placed box."""
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]),
                          (other[2] - other[0]) * (other[3] - other[1]))
            if iw * ih > limit * smaller:
                return True
    return False


def render_image(rng: np.random.Generator, size: int, class_names, with_crowd: bool,
                 difficult_rate: float):
    """One image (H, W, 3 uint8) and its objects (class, label, box, area, flags, and
    the polygon or crowd RLE for COCO); class ``k`` is drawn in ``CLASS_STYLES[k]``."""
    num_classes = len(class_names)
    background = rng.integers(25, 60, size=3)
    image = background + 6.0 * rng.standard_normal((size, size, 3), dtype=np.float32)
    scale = size / 128
    min_side, max_side = max(6, round(18 * scale)), max(8, round(60 * scale))
    objects, placed = [], []

    if with_crowd:  # a cluster of tiny same-class shapes, annotated as one crowd region
        label = int(rng.integers(num_classes))
        region_w, region_h = int(rng.integers(24, 41) * scale), int(rng.integers(16, 29) * scale)
        x, y = int(rng.integers(1, size - region_w)), int(rng.integers(1, size - region_h))
        shape, colour = CLASS_STYLES[label]
        union = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(4, 7))):
            side = max(4, round(int(rng.integers(5, 9)) * scale))
            ox = x + rng.uniform(0, max(region_w - side, 1))
            oy = y + rng.uniform(0, max(region_h - side, 1))
            union |= rasterize_polygon(UNIT_POLYGONS[shape] * side + (ox, oy), size, size)
        image[union] = colour
        box = _tight_box(union)
        placed.append(box)
        objects.append({"class": class_names[label], "label": label + 1, "box": box,
                        "area": int(union.sum()), "iscrowd": True, "difficult": False,
                        "polygon": None, "rle": rle_counts(union)})

    for _ in range(int(rng.integers(1, 5))):
        label = int(rng.integers(num_classes))
        shape, colour = CLASS_STYLES[label]
        for _attempt in range(30):
            w = int(rng.integers(min_side, max_side + 1))
            h = max(min_side // 2, round(w * ASPECT.get(shape, 1.0)))
            x, y = int(rng.integers(1, size - w)), int(rng.integers(1, size - h))
            if not _overlaps_too_much([x, y, x + w, y + h], placed):
                break
        else:
            continue  # no room left: fewer objects in this image
        polygon = UNIT_POLYGONS[shape] * (w, h) + (x, y)
        mask = rasterize_polygon(polygon, size, size)
        jitter = rng.integers(-12, 13, size=3)
        image[mask] = np.clip(np.asarray(colour) + jitter, 0, 255)
        box = _tight_box(mask)
        placed.append(box)
        objects.append({"class": class_names[label], "label": label + 1, "box": box,
                        "area": int(mask.sum()), "iscrowd": False,
                        "difficult": bool(rng.random() < difficult_rate),
                        "polygon": np.round(polygon, 2).ravel().tolist(), "rle": None})
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _voc_xml(image_name: str, size: int, objects) -> str:
    parts = ["<annotation>", "\t<folder>VOC2007</folder>", f"\t<filename>{image_name}</filename>",
             "\t<source><database>alwa-sweep synthetic</database></source>",
             f"\t<size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
             "\t<segmented>0</segmented>"]
    for obj in objects:
        x1, y1, x2, y2 = obj["box"]
        # VOC numbers pixels from 1 and its boxes include the last pixel.
        parts += ["\t<object>", f"\t\t<name>{obj['class']}</name>", "\t\t<pose>Unspecified</pose>",
                  "\t\t<truncated>0</truncated>",
                  f"\t\t<difficult>{int(obj['difficult'])}</difficult>",
                  f"\t\t<bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
                  f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>",
                  "\t</object>"]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _coco_json(names, image_objects, size, class_names, category_ids) -> dict:
    images, annotations = [], []
    for image_number, objects in zip(names, image_objects):
        image_id = int(image_number)
        images.append({"id": image_id, "file_name": f"{image_number}.jpg",
                       "width": size, "height": size})
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            segmentation = ({"counts": obj["rle"], "size": [size, size]} if obj["iscrowd"]
                            else [obj["polygon"]])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[obj["label"] - 1],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": obj["area"],
                                "iscrowd": int(obj["iscrowd"]), "segmentation": segmentation})
    categories = [{"id": cid, "name": name, "supercategory": "shape"}
                  for cid, name in zip(category_ids, class_names)]
    return {"info": {"description": GENERATOR}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}


def _paths(out_dir: Path, format: str, class_names) -> dict:
    manifest = str(out_dir / f"synthetic_{format}.json")
    if format == "voc":
        return {"root": str(out_dir / "VOCdevkit"), "format": "voc",
                "train_sets": ["2007/trainval"], "test_sets": ["2007/test"],
                "class_names": list(class_names), "manifest": manifest}
    return {"train_ann": str(out_dir / "annotations" / "instances_train.json"),
            "train_images": str(out_dir / "train"),
            "val_ann": str(out_dir / "annotations" / "instances_val.json"),
            "val_images": str(out_dir / "val"),
            "format": "coco", "class_names": list(class_names), "manifest": manifest}


def _generated_dirs(out_dir: Path, format: str) -> list[Path]:
    if format == "voc":
        return [out_dir / "VOCdevkit" / "VOC2007"]
    return [out_dir / "annotations", out_dir / "train", out_dir / "val"]


MAX_IMAGES = 100_000
MAX_SIZE = 4096
MAX_SEED = 2**32 - 1
MAX_TOTAL_PIXELS = 2**31  # images x size^2: ~1 GB of JPEGs at most, minutes of writing


def check_total_pixels(images: int, size: int, fields=("images", "size")) -> None:
    """``images`` x ``size``² stays within :data:`MAX_TOTAL_PIXELS`."""
    total = images * size * size
    if total > MAX_TOTAL_PIXELS:
        raise ConfigError(fields[0], f"{images} images of {size}x{size} pixels are {total:,} pixels, "
                          f"over the limit of {MAX_TOTAL_PIXELS:,}.",
                          f"Use fewer images or a smaller {fields[1]} (a demo needs 200 of 128).")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_params(format, images, size, num_classes, seed=0):
    if format not in ("voc", "coco"):
        raise ConfigError("format", f"unknown value {format!r}.", "Use 'voc' or 'coco'.")
    if not _is_int(images) or not 4 <= images <= MAX_IMAGES:
        raise ConfigError("images", f"must be an integer in 4..{MAX_IMAGES} (both splits need "
                          f"images), got {images!r}.")
    if not _is_int(size) or not 64 <= size <= MAX_SIZE:
        raise ConfigError("size", f"must be an integer in 64..{MAX_SIZE} pixels, got {size!r}.")
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError("num_classes", f"must be an integer in 1..{MAX_CLASSES}, "
                          f"got {num_classes!r}.")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError("seed", f"must be an integer in 0..{MAX_SEED}, got {seed!r}.")
    check_total_pixels(images, size)


def make_synthetic(out_dir, format: str = "voc", images: int = 200, seed: int = 0,
                   size: int = 128, num_classes: int = 4) -> dict:
    """Write (or reuse) a synthetic dataset under ``out_dir``; returns its paths.

    VOC: ``out_dir/VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main}``, about
    75 % trainval (halved into train/val) and 25 % test, ~10 % of objects difficult.
    COCO: ``out_dir/annotations/instances_{train,val}.json`` and ``out_dir/{train,val}/``,
    polygon masks, a few crowd regions in RLE, non-contiguous category ids (1, 3, 5, ...,
    as real COCO has gaps). Class names are the first ``num_classes`` VOC classes.
    The manifest ``out_dir/synthetic_<format>.json`` holds every object drawn:
    ``box`` is the continuous 0-based ``[x1, y1, x2, y2]`` around its pixels.
    """
    _check_params(format, images, size, num_classes, seed)
    out_dir = Path(out_dir)
    class_names = list(VOC_CLASSES[:num_classes])
    paths = _paths(out_dir, format, class_names)
    params = {"generator": GENERATOR, "format": format, "images": images, "seed": seed,
              "size": size, "num_classes": num_classes}
    manifest_path = Path(paths["manifest"])

    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
            if not isinstance(previous, dict):
                raise ValueError("not an object")
        except (OSError, ValueError, RecursionError) as exc:
            raise DatasetError(str(manifest_path), f"is not a readable make-synthetic manifest "
                               f"({exc}).", "Delete it, or choose an empty output folder.") from None
        if previous.get("params") == params and all(
                Path(path).exists() for key, path in paths.items()
                if key not in ("format", "class_names", "train_sets", "test_sets")):
            return paths
        manifest_path.unlink()  # ours, with other parameters: regenerate from scratch
        for directory in _generated_dirs(out_dir, format):
            shutil.rmtree(directory, ignore_errors=True)
    else:
        for directory in _generated_dirs(out_dir, format):
            if directory.exists() and any(directory.iterdir()):
                raise DatasetError(str(directory), "exists and was not written by make-synthetic.",
                                   "Choose an empty output folder.")

    split_rng = np.random.default_rng([seed, images, 7919])
    order = split_rng.permutation(images)
    num_test = max(1, round(0.25 * images))
    names = [f"{i + 1:06d}" for i in range(images)]
    test = sorted(names[i] for i in order[:num_test])
    trainval = sorted(names[i] for i in order[num_test:])
    splits = {"trainval": trainval, "test": test,
              "train": trainval[: len(trainval) // 2], "val": trainval[len(trainval) // 2:]}

    if format == "voc":
        voc = out_dir / "VOCdevkit" / "VOC2007"
        image_dirs = {name: voc / "JPEGImages" for name in names}
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc / sub).mkdir(parents=True, exist_ok=True)
    else:
        split_of = {name: "train" for name in trainval} | {name: "val" for name in test}
        image_dirs = {name: out_dir / split_of[name] for name in names}
        for sub in ("annotations", "train", "val"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)

    all_objects = {}
    for index, name in enumerate(names):
        rng = np.random.default_rng([seed, index])
        with_crowd = format == "coco" and rng.random() < 0.1
        pixels, objects = render_image(rng, size, class_names, with_crowd,
                                       difficult_rate=0.1 if format == "voc" else 0.0)
        Image.fromarray(pixels).save(image_dirs[name] / f"{name}.jpg", format="JPEG",
                                     quality=92, subsampling=0)
        if format == "voc":
            (voc / "Annotations" / f"{name}.xml").write_text(_voc_xml(f"{name}.jpg", size, objects))
        all_objects[name] = objects

    if format == "voc":
        for split, members in splits.items():
            split_file = voc / "ImageSets" / "Main" / f"{split}.txt"
            split_file.write_text("".join(member + "\n" for member in members))
    else:
        category_ids = [1 + 2 * k for k in range(num_classes)]
        for split, members in (("train", trainval), ("val", test)):
            data = _coco_json(members, [all_objects[m] for m in members], size, class_names,
                              category_ids)
            with open(out_dir / "annotations" / f"instances_{split}.json", "w") as f:
                json.dump(data, f, separators=(",", ":"))

    # Written last: its presence means the tree is complete.
    manifest = {"params": params, "class_names": class_names, "splits": splits,
                "objects": {name: [{k: v for k, v in obj.items() if k not in ("polygon", "rle")}
                                   for obj in objects] for name, objects in all_objects.items()}}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return paths
