"""NCT-CRC-HE-100K (training) and CRC-VAL-HE-7K (test): class folders of 224x224 TIFF patches.

Layout (``data.root``): ``<SET>/<CLASS>/<CLASS>-XXXXXXXX.tif`` with the nine classes ADI BACK DEB
LYM MUC MUS NORM STR TUM; the labels are the folder names (in ``data.class_names`` order when set,
else sorted, which gives the usual 0-8). The sets carry no patient ids, so any random split of
NCT-CRC-HE-100K puts one patient's patches in several parts: every data set built here says so in
its ``warnings``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.data.catalog import register_file_data_set
from common.data.errors import DataError
from common.data.folder import ImageFilesDataset, scan_class_folders
from common.data.options import FileDataSetOptions, class_names_option, resolve_split, split_names

NAME = "nct_crc"
SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
PATIENT_LEAK_WARNING = (
    "NCT-CRC-HE-100K has no patient ids: a random split of it (the iid, dirichlet or quantity "
    "partition, or a validation set carved from it) puts patches of one patient into several "
    "hospitals or splits, so scores on such splits are optimistic (patient leakage); report test "
    "scores on CRC-VAL-HE-7K, which comes from other patients."
)


@dataclass(frozen=True, kw_only=True)
class NctCrcOptions(FileDataSetOptions):
    """``conf/data/nct_crc.yaml``: the class folders in label order, the split -> folder map, and
    whether unreadable TIFFs are skipped."""

    class_names: Sequence[str] | None
    splits: Mapping[str, str | None]
    skip_corrupt: bool


def splits(options: NctCrcOptions) -> dict[str, str]:
    """Split name -> folder under ``data.root``."""
    return split_names(options.splits)


def load(root: Path, options: NctCrcOptions, split: str, image_size: int) -> ImageFilesDataset:
    """The NCT-CRC ``split``."""
    folder = root / resolve_split(split, splits(options), NAME)
    if not folder.is_dir():
        raise DataError(f"NCT-CRC split folder {folder} (split {split!r}) does not exist; expected "
                        f"{folder.name}/<CLASS>/<CLASS>-XXXXXXXX.tif under data.root {root}")
    paths, labels, classes = scan_class_folders(folder, class_names_option(options.class_names), SUFFIXES)
    return ImageFilesDataset(paths, labels, classes, image_size, skip_corrupt=bool(options.skip_corrupt),
                             warnings=(PATIENT_LEAK_WARNING,))


register_file_data_set(NAME, options=NctCrcOptions, splits=splits, load=load)
