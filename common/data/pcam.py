"""PatchCamelyon (PCam): 96x96 patches in HDF5, read lazily one patch at a time.

Layout (``data.root``): ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (and optionally
``..._meta.csv``). Key ``x``: (N, 96, 96, 3) uint8; key ``y``: (N, 1, 1, 1) with 0/1 (tumour tissue
in the centre 32x32 region). Only the labels (N bytes) are read up front; each patch is read from
the file when it is loaded, so memory stays bounded whatever the file size. The file is opened once
per process (DataLoader workers reopen it).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.data.base import PatchDataset
from common.data.catalog import register_file_data_set
from common.data.errors import DataError
from common.data.images import resize_square
from common.data.options import FileDataSetOptions, class_names_option, resolve_split, split_names

NAME = "pcam"
FILE_PATTERN = "camelyonpatch_level_2_split_{split}_{part}"


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        gz = path.with_name(path.name + ".gz")
        hint = f" ({gz.name} is there: decompress it with gunzip first)" if gz.is_file() else ""
        raise DataError(f"PCam file {path} does not exist{hint}; expected the HDF5 file "
                        f"{path.name} in data.root")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"PCam file {path} cannot be opened as HDF5 ({error}); expected a complete, "
                        f"uncompressed HDF5 file (truncated download, or still gzipped?)") from error


def _dataset(file: h5py.File, key: str, path: Path) -> h5py.Dataset:
    item = file.get(key)
    if not isinstance(item, h5py.Dataset):
        raise DataError(f"PCam file {path} has no HDF5 data set under key {key!r} (keys found: "
                        f"{sorted(file.keys())}); expected key {key!r} (set data.x_key / data.y_key if "
                        f"your copy names it otherwise)")
    return item


def _check_images(x: h5py.Dataset, path: Path, key: str) -> None:
    shape = x.shape
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[0] < 1:
        raise DataError(f"PCam file {path} key {key!r} has shape {shape}; expected (N, 96, 96, 3) "
                        f"patches (N >= 1, square, RGB)")
    if x.dtype != np.uint8:
        raise DataError(f"PCam file {path} key {key!r} has dtype {x.dtype}; expected uint8 pixels")


def _read_labels(y: h5py.Dataset, path: Path, key: str, count: int, num_classes: int) -> np.ndarray:
    shape = y.shape
    if len(shape) < 1 or shape[0] != count or int(np.prod(shape[1:], dtype=np.int64)) != 1:
        raise DataError(f"PCam file {path} key {key!r} has shape {shape}; expected ({count}, 1, 1, 1): "
                        f"one label per patch of the x file")
    if y.dtype.kind not in "biu":
        raise DataError(f"PCam file {path} key {key!r} has dtype {y.dtype}; expected integer labels 0/1")
    try:
        labels = np.asarray(y[...]).reshape(-1).astype(np.int64)
    except OSError as error:
        raise DataError(f"PCam file {path} key {key!r} cannot be read ({error}); expected {count} "
                        f"labels (truncated or damaged file?)") from error
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"PCam file {path} key {key!r} index {i} has label {int(labels[i])}, outside the "
                        f"class range 0..{num_classes - 1}; {len(bad)} label(s) out of range in all")
    return labels


class PCamDataset(PatchDataset):
    """One PCam split: labels in memory, patches read from HDF5 on demand and resized."""

    def __init__(
        self,
        x_path: Path,
        y_path: Path,
        image_size: int,
        class_names: Sequence[str],
        x_key: str,
        y_key: str,
        meta_path: Path | None = None,
    ) -> None:
        self.x_path, self.y_path, self.x_key = Path(x_path), Path(y_path), x_key
        self.class_names = tuple(class_names)
        self.image_size = int(image_size)
        self.meta_path = meta_path
        with _open_h5(self.x_path) as xf:
            x = _dataset(xf, x_key, self.x_path)
            _check_images(x, self.x_path, x_key)
            self.patch_size = int(x.shape[1])
            count = int(x.shape[0])
        with _open_h5(self.y_path) as yf:
            y = _dataset(yf, y_key, self.y_path)
            self.labels = _read_labels(y, self.y_path, y_key, count, len(self.class_names))
        self._file: h5py.File | None = None
        self._images: h5py.Dataset | None = None
        self._pid = -1
        self._groups: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_file=None, _images=None, _pid=-1)
        return state

    def _x(self) -> h5py.Dataset:
        if self._images is None or self._pid != os.getpid():
            self._file = _open_h5(self.x_path)
            self._images = self._file[self.x_key]
            self._pid = os.getpid()
        return self._images

    def load_uint8(self, index: int) -> np.ndarray:
        try:
            patch = self._x()[index]
        except (OSError, ValueError) as error:
            raise DataError(f"PCam file {self.x_path} key {self.x_key!r} index {index} cannot be read "
                            f"({error}); expected a ({self.patch_size}, {self.patch_size}, 3) uint8 patch "
                            f"(truncated or damaged file?)") from error
        return resize_square(patch, self.image_size)

    @property  # type: ignore[override]
    def groups(self) -> np.ndarray | None:
        """Slide (``wsi``) id per patch from the split's ``_meta.csv``, when that file is present."""
        if self._groups is None and self.meta_path is not None and self.meta_path.is_file():
            with open(self.meta_path, newline="") as handle:
                reader = csv.DictReader(handle)
                if "wsi" not in (reader.fieldnames or []):
                    raise DataError(f"PCam file {self.meta_path} has columns {reader.fieldnames}; expected "
                                    f"a 'wsi' column (the slide of each patch)")
                slides = [row["wsi"] for row in reader]
            if len(slides) != len(self.labels):
                raise DataError(f"PCam file {self.meta_path} has {len(slides)} rows; expected "
                                f"{len(self.labels)}, one per patch of {self.x_path.name}")
            self._groups = np.unique(np.asarray(slides), return_inverse=True)[1].astype(np.int64)
        return self._groups


def split_files(root: Path, token: str) -> tuple[Path, Path, Path]:
    """The x, y and meta files of the split whose file token is ``token``."""
    base = FILE_PATTERN.format(split=token, part="{part}")
    return (root / (base.format(part="x") + ".h5"), root / (base.format(part="y") + ".h5"),
            root / (base.format(part="meta") + ".csv"))


@dataclass(frozen=True, kw_only=True)
class PCamOptions(FileDataSetOptions):
    """``conf/data/pcam.yaml``: the class names (PCam's files carry 0/1 only), the split -> file token
    map, and the HDF5 keys of the patches and the labels."""

    class_names: Sequence[str] | None
    splits: Mapping[str, str | None]
    x_key: str
    y_key: str


def splits(options: PCamOptions) -> dict[str, str]:
    """Split name -> file token (``data.splits``)."""
    return split_names(options.splits)


def load(root: Path, options: PCamOptions, split: str, image_size: int) -> PCamDataset:
    """The PCam ``split`` under ``root``."""
    token = resolve_split(split, splits(options), NAME)
    x_path, y_path, meta = split_files(root, token)
    names = class_names_option(options.class_names)
    if names is None:
        raise DataError("data.class_names is not set for data set 'pcam'; its files carry the labels 0/1 only, "
                        "so list the two classes (conf/data/pcam.yaml: [normal, tumour])")
    return PCamDataset(x_path, y_path, image_size, names, str(options.x_key), str(options.y_key), meta)


register_file_data_set(NAME, options=PCamOptions, splits=splits, load=load)
