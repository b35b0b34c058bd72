"""``alwa-sweep make-synthetic``: write a small learnable dataset in VOC or COCO layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from alwa_sweep.sweep_paths import check_writable
from alwa_sweep.commands.argcheck import int_in, one_paragraph_errors
from trainers.data.synthetic import (MAX_CLASSES, MAX_IMAGES, MAX_SEED, MAX_SIZE,
                                     check_total_pixels, make_synthetic)
from trainers.errors import ConfigError



def add_arguments(parser: argparse.ArgumentParser) -> None:
    one_paragraph_errors(parser)
    parser.add_argument("--format", choices=("voc", "coco"), default="voc",
                        help="dataset layout (default: voc)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--images", type=int_in(4, MAX_IMAGES, example=200), default=200,
                        help=f"number of images, 4..{MAX_IMAGES}, split ~75/25 into train/test "
                             "(default: 200)")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED, example=0), default=0,
                        help=f"random seed, 0..{MAX_SEED} (default: 0)")
    parser.add_argument("--size", type=int_in(64, MAX_SIZE, example=128), default=128,
                        help=f"image side in pixels, 64..{MAX_SIZE} (default: 128)")
    parser.add_argument("--num-classes", type=int_in(1, MAX_CLASSES, example=4), default=4,
                        metavar=f"1..{MAX_CLASSES}", help="number of classes (default: 4)")


def run(args) -> int:
    if not str(args.out).strip():
        raise ConfigError("--out", "is empty.", "Pass the folder to write the dataset to.")
    check_total_pixels(args.images, args.size, fields=("--images", "--size"))
    check_writable(Path(args.out), "--out")
    paths = make_synthetic(args.out, format=args.format, images=args.images, seed=args.seed,
                           size=args.size, num_classes=args.num_classes)
    print(f"synthetic {args.format} dataset ({args.images} images, "
          f"classes: {', '.join(paths['class_names'])}) in {args.out}")
    print("dataset config:")
    print(f"  kind: {paths['format']}")
    if paths["format"] == "voc":
        print(f"  root: {paths['root']}")
        print(f"  train_sets: {paths['train_sets']}")
        print(f"  test_sets: {paths['test_sets']}")
    else:
        for key in ("train_ann", "train_images", "val_ann", "val_images"):
            print(f"  {key}: {paths[key]}")
    return 0
