"""Image files and sizes: decode one file to RGB uint8, and resize a patch to the model's size.

Every loader resizes through ``resize_square``, so all data sets reach the model the same way:
a non-square image is centre-cropped to a square first (tissue keeps its aspect ratio), then
shrunk by a whole factor with PIL's ``reduce`` (the exact area average, e.g. 96 -> 32 px) or else
resized with PIL's bilinear filter, which widens its support when shrinking (so downscaled patches
do not alias).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.data.errors import DataError

#: File name suffixes read as images by the folder layouts (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_image(path: Path) -> np.ndarray:
    """The file at ``path`` decoded as an (H, W, 3) uint8 RGB array.

    Raises ``DataError`` naming the file when it is missing, truncated or not a readable image.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            if image.mode != "RGB":
                image = image.convert("RGB")
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError as error:
        raise DataError(f"image file {path} does not exist; expected an RGB image there (is the data "
                        f"root complete, and was it copied without errors?)") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"image file {path} cannot be read ({error}); expected a complete RGB "
                        f"PNG/JPEG/TIFF image. Replace the file, or set data.skip_corrupt=true to "
                        f"report and skip unreadable images") from error
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise DataError(f"image file {path} decodes to shape {array.shape}; expected (H, W, 3) RGB")
    return array


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """The largest centred square of an (H, W, C) array."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) uint8 patch as (size, size, 3) uint8: centre-cropped to a square, then resized."""
    square = center_crop_square(image)
    if square.shape[0] == size and square.shape[1] == size:
        return np.array(square, dtype=np.uint8)  # a writable copy (the source may be a read-only map)
    pil = Image.fromarray(np.ascontiguousarray(square))
    side = square.shape[0]
    if side > size and side % size == 0:
        resized = pil.reduce(side // size)  # exact area average for a whole factor (e.g. 96 -> 32), fast
    else:
        resized = pil.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)
