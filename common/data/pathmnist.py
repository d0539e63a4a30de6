"""PathMNIST (MedMNIST): ``pathmnist.npz`` (28 px) and ``pathmnist_{64,128,224}.npz``.

Keys ``{train,val,test}_images``: (N, S, S, 3) uint8 and ``{train,val,test}_labels``: (N, 1) with
the nine NCT-CRC classes (0-8). Images are memory-mapped (``common.data.npz``), never loaded whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data.base import PatchDataset
from common.data.catalog import register_file_data_set
from common.data.errors import DataError
from common.data.images import resize_square
from common.data.npz import npz_array
from common.data.options import FileDataSetOptions, class_names_option, resolve_split, split_names

NAME = "pathmnist"
SIZES: tuple[int, ...] = (28, 64, 128, 224)


def file_name(size: int) -> str:
    """The MedMNIST file of the given image size."""
    return "pathmnist.npz" if size == 28 else f"pathmnist_{size}.npz"


def choose_size(root: Path, size: Any, image_size: int) -> int:
    """``data.size``, or when null the smallest file present at least ``image_size`` (else the largest)."""
    if size is not None:
        if int(size) not in SIZES:
            raise DataError(f"data.size is {size}; PathMNIST comes in sizes {list(SIZES)}")
        return int(size)
    present = [s for s in SIZES if (root / file_name(s)).is_file()]
    if not present:
        raise DataError(f"no PathMNIST file in data.root {root}; expected one of "
                        f"{[file_name(s) for s in SIZES]}")
    return next((s for s in present if s >= image_size), present[-1])


class PathMNISTDataset(PatchDataset):
    """One PathMNIST split: labels in memory, images memory-mapped and resized when loaded."""

    def __init__(self, path: Path, split_key: str, image_size: int, source_size: int,
                 class_names: Sequence[str], cache_dir: str | None = None) -> None:
        self.path, self.split_key, self.cache_dir = Path(path), split_key, cache_dir
        self.source_size = int(source_size)
        self.class_names = tuple(class_names)
        self.image_size = int(image_size)
        images = self._open_images()
        self.labels = self._read_labels(len(images))

    def _open_images(self) -> np.ndarray:
        key = f"{self.split_key}_images"
        images = npz_array(self.path, key, self.cache_dir)
        s = self.source_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise DataError(f"PathMNIST file {self.path} key {key!r} has shape {images.shape}; expected "
                            f"(N, {s}, {s}, 3) for size {s} (is data.size right for this file?)")
        if images.dtype != np.uint8:
            raise DataError(f"PathMNIST file {self.path} key {key!r} has dtype {images.dtype}; expected uint8")
        self._images = images
        return images

    def _read_labels(self, count: int) -> np.ndarray:
        key = f"{self.split_key}_labels"
        raw = npz_array(self.path, key, self.cache_dir)
        if raw.shape not in ((count, 1), (count,)):
            raise DataError(f"PathMNIST file {self.path} key {key!r} has shape {raw.shape}; expected "
                            f"({count}, 1): one label per image of {self.split_key}_images")
        if raw.dtype.kind not in "biu":
            raise DataError(f"PathMNIST file {self.path} key {key!r} has dtype {raw.dtype}; expected "
                            f"integer labels")
        labels = np.asarray(raw).reshape(-1).astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.class_names)))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"PathMNIST file {self.path} key {key!r} index {i} has label {int(labels[i])}, "
                            f"outside the class range 0..{len(self.class_names) - 1}")
        return labels

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}  # reopened (mapped again) in the receiving process

    def load_uint8(self, index: int) -> np.ndarray:
        images = self._images if self._images is not None else self._open_images()
        return resize_square(np.asarray(images[index]), self.image_size)


@dataclass(frozen=True, kw_only=True)
class PathMNISTOptions(FileDataSetOptions):
    """``conf/data/pathmnist.yaml``: which file (image size), the class names (the files hold label
    numbers only), the split -> key prefix map, and where a compressed member is inflated."""

    size: int | None
    class_names: Sequence[str] | None
    splits: Mapping[str, str | None]
    cache_dir: str | None


def splits(options: PathMNISTOptions) -> dict[str, str]:
    """Split name -> key prefix in the npz file."""
    return split_names(options.splits)


def load(root: Path, options: PathMNISTOptions, split: str, image_size: int) -> PathMNISTDataset:
    """The PathMNIST ``split``."""
    key = resolve_split(split, splits(options), NAME)
    size = choose_size(root, options.size, image_size)
    path = root / file_name(size)
    if not path.is_file():
        raise DataError(f"PathMNIST file {path} does not exist; expected {file_name(size)} in data.root "
                        f"for data.size={size} (sizes: {list(SIZES)})")
    names = class_names_option(options.class_names)
    if names is None:
        raise DataError("data.class_names is not set for data set 'pathmnist'; its files hold label numbers only, "
                        "so list the nine classes in label order (conf/data/pathmnist.yaml)")
    return PathMNISTDataset(path, key, image_size, size, names, options.cache_dir)


register_file_data_set(NAME, options=PathMNISTOptions, splits=splits, load=load)
