"""Image decoding, detection transforms on ``(image, target)`` pairs, the batch
collate, and the mmdetection 2.x keep-ratio scale rule.

Images stay at their original size here: torchvision's ``GeneralizedRCNNTransform``
(``min_size``/``max_size`` = the configured scale) resizes them inside the model and
maps the predictions back to original coordinates. ``keep_ratio_size`` documents what
that scale means, in mmdetection 2.x's words.
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


class Compose:
    """Apply transforms in order; each takes and returns ``(image, target)``."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self):
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Flip the image, its boxes and masks left-right with probability ``p``.

    Boxes follow mmdetection 2.x: ``x1' = W - x2``, ``x2' = W - x1`` (no -1), so a
    flip applied twice gives the original box back exactly.
    """

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image, target):
        # torch's RNG: seeded per DataLoader worker from the loader's generator.
        if self.p <= 0.0 or torch.rand(()) >= self.p:
            return image, target
        return hflip(image, target)

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


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


def keep_ratio_size(height: int, width: int, scale) -> tuple[int, int]:
    """The ``(height, width)`` mmdetection 2.x gives an image for ``scale`` with
    ``keep_ratio=True``.

    ``scale = (1000, 600)`` means: the long edge at most 1000 and the short edge at most
    600, aspect ratio kept; the factor is the largest that satisfies both, and sizes are
    rounded to the nearest pixel (mmcv ``rescale_size``). torchvision's
    ``GeneralizedRCNNTransform(min_size=600, max_size=1000)`` uses the same factor
    (it floors instead of rounding, so sizes can differ by one pixel).
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)
