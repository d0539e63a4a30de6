"""Generic class folders, in either of the two layouts users have (any RGB size).

- ``classes``: ``<root>/<class>/<image>``, the torchvision ``ImageFolder`` layout. There are no split
  folders, so a held-out split is drawn per class: ``data.test_fraction`` of each class (seeded by
  ``data.split_seed`` and the class name, so adding images to one class leaves the others' split as
  it was) goes to ``test``, the rest to ``train``.
- ``splits``: ``<root>/<split>/<class>/<image>``, one sub-folder per split (``data.splits``; ``.``
  means the root itself).

``data.layout: auto`` (the default) reads the split layout when a configured split folder exists
under the root, else the class layout. Class names are the folder names, sorted, or
``data.class_names`` (which the folders must match).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import ConfigError
from common.data.catalog import named_class_names, register_file_data_set
from common.data.errors import DataError
from common.data.folder import ImageFilesDataset, list_subfolders, scan_class_folders
from common.data.options import FileDataSetOptions, class_names_option, data_root, resolve_split, split_names

NAME = "imagefolder"
LAYOUTS: tuple[str, ...] = ("auto", "classes", "splits")
_HOLDOUT_TAG = 29  # stream tag of the held-out split's seeded rngs


@dataclass(frozen=True, kw_only=True)
class ImageFolderOptions(FileDataSetOptions):
    """``conf/data/imagefolder.yaml``: the layout, the class names (null: the folder names), the class
    layout's held-out share and its seed, the split layout's split -> folder map, and whether
    unreadable images are skipped."""

    layout: str
    class_names: Sequence[str] | None
    test_fraction: float
    split_seed: int | None
    splits: Mapping[str, str | None]
    skip_corrupt: bool


def _configured_splits(options: ImageFolderOptions) -> dict[str, str]:
    return split_names(options.splits)


def layout(options: ImageFolderOptions) -> str:
    """``classes`` or ``splits``: ``data.layout``, or for ``auto`` what ``data.root`` holds."""
    wanted = str(options.layout or "auto")
    if wanted not in LAYOUTS:
        raise DataError(f"data.layout {wanted!r} is not known; choose one of {list(LAYOUTS)}")
    if wanted != "auto":
        return wanted
    root = data_root(options)
    found = any((root / folder).is_dir() for folder in _configured_splits(options).values())
    return "splits" if found else "classes"


def _holdout(options: ImageFolderOptions) -> tuple[float, int]:
    fraction = float(options.test_fraction)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.test_fraction must be in [0, 1), got {fraction}")
    return fraction, int(options.split_seed or 0)


def splits(options: ImageFolderOptions) -> dict[str, str]:
    """Split name -> sub-folder of ``data.root`` (``.`` for both held-out splits of the class layout)."""
    if layout(options) == "splits":
        return _configured_splits(options)
    fraction, _ = _holdout(options)
    return {"train": ".", "test": "."} if fraction > 0 else {"train": "."}


def stratified_holdout(labels: np.ndarray, class_names: Sequence[str], fraction: float, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays: ``round(fraction * n)`` of each class's ``n`` items to test.

    A class with at least two items keeps at least one on each side when ``fraction`` > 0; a
    class with one item trains on it. Each class is shuffled by its own rng, seeded by ``seed`` and
    the class name, so the split of one class does not depend on the others.
    """
    labels = np.asarray(labels, dtype=np.int64)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for k, name in enumerate(class_names):
        rows = np.flatnonzero(labels == k)
        n = len(rows)
        take = int(round(fraction * n))
        if fraction > 0 and n >= 2:
            take = min(max(take, 1), n - 1)
        elif n < 2:
            take = 0
        rng = np.random.default_rng([seed, _HOLDOUT_TAG, zlib.crc32(str(name).encode())])
        shuffled = rng.permutation(rows)
        test.append(shuffled[:take])
        train.append(shuffled[take:])
    empty = np.zeros(0, np.int64)
    return (np.sort(np.concatenate(train)) if train else empty, np.sort(np.concatenate(test)) if test else empty)


def _scan_root_classes(root: Path, options: ImageFolderOptions) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    try:
        return scan_class_folders(root, class_names_option(options.class_names))
    except DataError as error:
        if str(options.layout or "auto") != "auto":
            raise DataError(f"{error} (read as the class-folder layout <root>/<class>/<image>: "
                            f"data.layout=classes)") from error
        folders = ", ".join(f"{f}/" for f in _configured_splits(options).values())
        raise DataError(f"{error} (read as the class-folder layout <root>/<class>/<image>, because {root} has "
                        f"none of the split folders {folders}; name your split folders in data.splits, or "
                        f"set data.layout)") from error


def load(root: Path, options: ImageFolderOptions, split: str, image_size: int) -> ImageFilesDataset:
    """The ``split`` of a class-folder data set."""
    skip_corrupt = bool(options.skip_corrupt)
    if layout(options) == "classes":
        resolve_split(split, splits(options), NAME)
        paths, labels, classes = _scan_root_classes(root, options)
        fraction, seed = _holdout(options)
        train, test = stratified_holdout(labels, classes, fraction, seed)
        rows = test if split == "test" else train
        return ImageFilesDataset([paths[i] for i in rows], labels[rows], classes, image_size,
                                 skip_corrupt=skip_corrupt)
    folder = (root / resolve_split(split, splits(options), NAME)).resolve()
    if not folder.is_dir():
        raise DataError(f"split folder {folder} (split {split!r}) does not exist; expected "
                        f"<class>/<image> sub-folders there (set data.splits.{split} to the folder's "
                        f"name under data.root, or '.' for data.root itself)")
    paths, labels, classes = scan_class_folders(folder, class_names_option(options.class_names))
    return ImageFilesDataset(paths, labels, classes, image_size, skip_corrupt=skip_corrupt)


def default_class_names(options: ImageFolderOptions) -> tuple[str, ...]:
    """The class names the data at ``data.root`` give: ``data.class_names``, else the sorted folder
    names (of the root, or of the training split's folder). Lists folders only; reads no image."""
    given = class_names_option(options.class_names)
    if given:
        return given
    root = data_root(options)
    if layout(options) == "classes":
        folder = root
    else:
        folder = (root / resolve_split(options.train_split, splits(options), NAME)).resolve()
    if not folder.is_dir():
        raise DataError(f"class folder root {folder} does not exist; expected one sub-folder per class")
    names = tuple(list_subfolders(folder))
    if len(names) < 2:
        raise DataError(f"{folder} has {len(names)} class folder(s) {list(names)}; expected one sub-folder per "
                        f"class, at least two")
    return names


def folder_class_names(options: ImageFolderOptions) -> tuple[str, ...]:
    """The classes known before the federation starts: ``data.class_names``, else the class folders
    under ``data.root`` when it is readable here (``ConfigError`` saying to list them otherwise)."""
    if options.class_names:
        return named_class_names(options)
    try:
        return default_class_names(options)
    except DataError as error:
        raise ConfigError(f"data.class_names is not set, and the class folders cannot be read here to name "
                          f"the classes: {error}. List the classes (in label order) as data.class_names") from error


def describe(options: ImageFolderOptions) -> str:
    """One line saying which layout and which train/test split the data set gives."""
    root = data_root(options)
    if layout(options) == "classes":
        fraction, seed = _holdout(options)
        held_out = (f"held-out split drawn per class: {fraction:.0%} of each class to test (data.test_fraction="
                    f"{fraction:g}), seeded by data.split_seed={seed}" if fraction > 0 else
                    "no held-out split (data.test_fraction=0): every image trains")
        return f"layout: class folders {root}/<class>/<image>, no split folders; {held_out}"
    named = ", ".join(f"{split}={folder}" for split, folder in splits(options).items())
    return f"layout: split folders {root}/<split>/<class>/<image> ({named})"


register_file_data_set(NAME, options=ImageFolderOptions, splits=splits, load=load, class_names=folder_class_names,
                       describe=describe)
