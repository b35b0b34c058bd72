"""Pre-launch checks of a dataset's image files (the annotations are checked when read).

``check_dataset_images(dataset)`` opens every image of a built ``VOCDetection`` or
``COCODetection`` and raises :class:`~trainers.errors.DatasetError` naming the first
bad file: empty (0 bytes), not an image PIL can identify, a JPEG cut short (no
end-of-image marker near its end), a size that differs from the annotation's, or (with
``decode=True``) pixel data that does not decode. Reading headers costs about 0.1 ms per
image (VOC 2007+2012 trainval and test: ~2 s); the full decode is for small sets.

Why the end-of-image test is sound: inside a JPEG's entropy-coded data every 0xFF byte is
followed by 0x00 (byte stuffing), so the marker ``FF D9`` only appears where a segment
ends; a file cut anywhere in its scan data has none in its last kilobyte (an embedded
EXIF thumbnail sits at the start of the file).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from trainers.errors import DatasetError

_EOI = b"\xff\xd9"
_TAIL = 1024
_HINT = "Replace the file with the dataset's original copy."


def check_image_file(path, *, expected_size: tuple[int, int] | None = None,
                     decode: bool = False, annotation: str | None = None) -> tuple[int, int]:
    """``(width, height)`` of one image file, checked; DatasetError naming it otherwise.

    ``expected_size``: the ``(width, height)`` its annotation gives (``annotation`` names
    where that came from, for the message).
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise DatasetError(str(path), f"cannot be read ({exc.strerror or exc}).", _HINT) from None
    if size == 0:
        raise DatasetError(str(path), "is empty (0 bytes).", _HINT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                kind = image.format
                if decode:
                    image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(str(path), f"is too large to decode safely ({exc}).", _HINT) from None
    except UnidentifiedImageError:
        raise DatasetError(str(path), f"is not an image file ({size} bytes; PIL cannot identify "
                           "its format).", _HINT) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated data, bad header fields
        raise DatasetError(str(path), f"cannot be decoded ({exc}).", _HINT) from None
    if width <= 0 or height <= 0:
        raise DatasetError(str(path), f"has an empty size {width}x{height}.", _HINT)
    if kind == "JPEG" and not _has_jpeg_end(path, size):
        raise DatasetError(str(path), f"is a truncated JPEG ({size} bytes, no end-of-image "
                           "marker): the download or copy was cut short.", _HINT)
    if expected_size is not None and tuple(expected_size) != (width, height):
        source = f" in {annotation}" if annotation else ""
        raise DatasetError(str(path), f"is {width}x{height} pixels but its annotation{source} "
                           f"says {expected_size[0]}x{expected_size[1]}.",
                           "The image and its annotation do not belong together; replace one.")
    return width, height


def _has_jpeg_end(path: Path, size: int) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, size - _TAIL))
        return _EOI in handle.read()


def check_dataset_images(dataset, *, decode: bool = False, check_size: bool = True) -> int:
    """Check every image of a ``VOCDetection`` or ``COCODetection``; returns how many.

    ``check_size`` compares each header with the annotation's width/height (VOC
    ``<size>``, COCO ``images[].width/height``).
    """
    count = 0
    for path, expected, source in _images_of(dataset):
        check_image_file(path, expected_size=expected if check_size else None,
                         decode=decode, annotation=source)
        count += 1
    return count


def _images_of(dataset):
    if hasattr(dataset, "image_paths") and hasattr(dataset, "annotations"):  # VOCDetection
        for path, annotation in zip(dataset.image_paths, dataset.annotations):
            xml = path.parent.parent / "Annotations" / f"{annotation['image_id']}.xml"
            yield path, (annotation["width"], annotation["height"]), str(xml)
    elif hasattr(dataset, "_records") and hasattr(dataset, "image_dir"):  # COCODetection
        for image_id, record in zip(dataset.image_ids, dataset._records):
            yield (dataset.image_dir / record["file_name"], (record["width"], record["height"]),
                   f"{dataset.ann_file} (image id {image_id})")
    else:
        raise TypeError(f"check_dataset_images: unsupported dataset {type(dataset).__name__}")
