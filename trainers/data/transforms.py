"""Image decoding, the horizontal flip of an ``(image, target)`` pair, and the batch collate.

Images stay at their original size here: torchvision's ``GeneralizedRCNNTransform``
(``min_size``/``max_size`` = the configured scale) resizes them inside the model and
maps the predictions back to original coordinates. Which images are flipped is the
sampler's decision (``trainers.sampling``).
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from trainers.errors import DatasetError


def load_image(path) -> torch.Tensor:
    """Decode an image file to a float32 RGB tensor, CHW, values in [0, 1]."""
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as exc:
        raise DatasetError(str(path), f"cannot decode the image ({exc}).",
                           "Replace the file with the dataset's original copy.") from exc
    return image.to(torch.float32).div_(255.0)


def hflip(image: torch.Tensor, target: dict):
    """Flip a CHW image and its target left-right (always)."""
    width = image.shape[-1]
    image = image.flip(-1)
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0] = width - target["boxes"][:, 2]
    boxes[:, 2] = width - target["boxes"][:, 0]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image, target


def collate_fn(batch):
    """Keep images of different sizes apart: ``(tuple(images), tuple(targets))``."""
    images, targets = zip(*batch)
    return tuple(images), tuple(targets)
