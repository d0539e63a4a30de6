"""NCT-CRC-HE-100K (training) and CRC-VAL-HE-7K (test): class folders of 224x224 TIFF patches.

Layout (``data.root``): ``<SET>/<CLASS>/<CLASS>-XXXXXXXX.tif`` with the nine classes ADI BACK DEB
LYM MUC MUS NORM STR TUM; the labels are the folder names (in ``data.class_names`` order when set,
else sorted, which gives the usual 0-8). The sets carry no patient ids, so any random split of
NCT-CRC-HE-100K puts one patient's patches in several parts: every data set built here says so in
its ``warnings``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.data.catalog import register_file_data_set
from common.data.errors import DataError
from common.data.folder import ImageFilesDataset, scan_class_folders
from common.data.options import class_names_option, resolve_split, split_names

NAME = "nct_crc"
CLASS_NAMES: tuple[str, ...] = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
DEFAULT_SPLITS: dict[str, str | None] = {"train": "NCT-CRC-HE-100K", "test": "CRC-VAL-HE-7K"}
SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
PATIENT_LEAK_WARNING = (
    "NCT-CRC-HE-100K has no patient ids: a random split of it (the iid, dirichlet or quantity "
    "partition, or a validation set carved from it) puts patches of one patient into several "
    "hospitals or splits, so scores on such splits are optimistic (patient leakage); report test "
    "scores on CRC-VAL-HE-7K, which comes from other patients."
)


def splits(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Split name -> folder under ``data.root``."""
    return split_names(cfg, DEFAULT_SPLITS)


def load(root: Path, cfg: Mapping[str, Any], split: str, image_size: int) -> ImageFilesDataset:
    """The NCT-CRC ``split`` (options: splits, class_names, skip_corrupt)."""
    folder = root / resolve_split(split, splits(cfg), NAME)
    if not folder.is_dir():
        raise DataError(f"NCT-CRC split folder {folder} (split {split!r}) does not exist; expected "
                        f"{folder.name}/<CLASS>/<CLASS>-XXXXXXXX.tif under data.root {root}")
    paths, labels, classes = scan_class_folders(folder, class_names_option(cfg), SUFFIXES)
    return ImageFilesDataset(paths, labels, classes, image_size,
                             skip_corrupt=bool(cfg.get("skip_corrupt", False)),
                             warnings=(PATIENT_LEAK_WARNING,))


register_file_data_set(NAME, splits=splits, load=load)
