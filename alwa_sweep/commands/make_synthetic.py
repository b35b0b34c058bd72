"""``alwa-sweep make-synthetic``: write a small learnable dataset in VOC or COCO layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from alwa_sweep.sweep_paths import check_writable
from trainers.data.synthetic import MAX_CLASSES, make_synthetic



def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("voc", "coco"), default="voc",
                        help="dataset layout (default: voc)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--images", type=_int_at_least(4), default=200,
                        help="number of images, split ~75/25 into train/test (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--size", type=_int_at_least(64), default=128,
                        help="image side in pixels (default: 128)")
    parser.add_argument("--num-classes", type=int, choices=range(1, MAX_CLASSES + 1), default=4,
                        metavar=f"1..{MAX_CLASSES}", help="number of classes (default: 4)")


def run(args) -> int:
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
