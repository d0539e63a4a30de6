"""Generic class folders: ``<root>/<split>/<class>/*.{png,jpg,tif}`` (any RGB size).

Each split is a sub-folder of ``data.root`` (``data.splits``; ``.`` means the root itself). The
class names are the folder names, sorted, or ``data.class_names`` (which the folders must match).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.data.errors import DataError
from common.data.folder import ImageFilesDataset, scan_class_folders
from common.data.options import class_names_option, resolve_split, split_names

NAME = "imagefolder"
DEFAULT_SPLITS: dict[str, str | None] = {"train": "train", "test": "test"}


def splits(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Split name -> sub-folder of ``data.root``."""
    return split_names(cfg, DEFAULT_SPLITS)


def load(root: Path, cfg: Mapping[str, Any], split: str, image_size: int) -> ImageFilesDataset:
    """The ``split`` folder of a class-folder data set (options: splits, class_names, skip_corrupt)."""
    folder = (root / resolve_split(split, splits(cfg), NAME)).resolve()
    if not folder.is_dir():
        raise DataError(f"split folder {folder} (split {split!r}) does not exist; expected "
                        f"<class>/<image> sub-folders there (set data.splits.{split} to the folder's "
                        f"name under data.root, or '.' for data.root itself)")
    paths, labels, classes = scan_class_folders(folder, class_names_option(cfg))
    return ImageFilesDataset(paths, labels, classes, image_size,
                             skip_corrupt=bool(cfg.get("skip_corrupt", False)))
