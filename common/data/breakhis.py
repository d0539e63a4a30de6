"""BreakHis: 700x460 PNG images of breast tumours at four magnifications, split by patient.

Layout (``data.root``, or its ``BreaKHis_v1`` folder):
``BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/<type>/<patient>/{40X,100X,200X,400X}/*.png``.

Labels are the class folders (``data.label: binary`` -> benign/malignant) or the tumour types
(``data.label: subtype`` -> the eight ``<type>`` folders, benign ones first). ``data.magnification``
keeps one magnification (e.g. ``40X``), a list of them, or all (null). The data set has no official
split: patients (the id after the last ``_`` of the patient folder, e.g. ``14-22549AB``) are split
into train/val/test by ``data.patient_val_fraction`` / ``data.test_fraction``, per class, seeded by
``data.split_seed``, so no patient is in two splits. ``groups`` are the patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.catalog import register_file_data_set
from common.data.errors import DataError
from common.data.folder import ImageFilesDataset, list_images, list_subfolders
from common.data.options import FileDataSetOptions, class_names_option
from common.data.partition import split_by_groups

NAME = "breakhis"
MAGNIFICATIONS: tuple[str, ...] = ("40X", "100X", "200X", "400X")
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")
BREAST = Path("histology_slides") / "breast"


def breast_folder(root: Path) -> Path:
    """``.../histology_slides/breast`` under ``root`` or ``root/BreaKHis_v1``."""
    for base in (root / "BreaKHis_v1", root):
        if (base / BREAST).is_dir():
            return base / BREAST
    raise DataError(f"BreakHis folder {root / 'BreaKHis_v1' / BREAST} does not exist; expected "
                    f"BreaKHis_v1/histology_slides/breast/{{benign,malignant}}/SOB/<type>/<patient>/<mag>/*.png "
                    f"under data.root {root}")


def magnifications(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``data.magnification`` as a tuple of folder names (null or ``all``: all four)."""
    if value in (None, "all"):
        return MAGNIFICATIONS
    chosen = tuple(str(v).upper() for v in (value if isinstance(value, (list, tuple)) else [value]))
    chosen = tuple(v if v.endswith("X") else v + "X" for v in chosen)
    unknown = [v for v in chosen if v not in MAGNIFICATIONS]
    if unknown:
        raise DataError(f"data.magnification {value!r} names {unknown}; expected one or more of "
                        f"{list(MAGNIFICATIONS)}, or null for all")
    return chosen


def patient_id(folder_name: str) -> str:
    """The patient of a patient folder (``SOB_B_A_14-22549AB`` -> ``14-22549AB``)."""
    return folder_name.rsplit("_", 1)[-1]


def scan(breast: Path, mags: tuple[str, ...]) -> tuple[list[Path], list[str], list[str], list[str]]:
    """All images at ``mags``: paths, class folder, tumour type and patient of each."""
    classes = list_subfolders(breast)
    if not classes:
        raise DataError(f"BreakHis folder {breast} has no class folders; expected benign/ and malignant/")
    paths: list[Path] = []
    kinds: list[str] = []
    types: list[str] = []
    patients: list[str] = []
    for cls in classes:
        sob = breast / cls / "SOB"
        if not sob.is_dir():
            raise DataError(f"BreakHis folder {sob} does not exist; expected SOB/<type>/<patient>/<mag>/*.png")
        for kind in list_subfolders(sob):
            for patient in list_subfolders(sob / kind):
                for mag in mags:
                    folder = sob / kind / patient / mag
                    if folder.is_dir():
                        files = list_images(folder, (".png",))
                        paths.extend(files)
                        kinds.extend([cls] * len(files))
                        types.extend([kind] * len(files))
                        patients.extend([patient_id(patient)] * len(files))
    if not paths:
        raise DataError(f"BreakHis folder {breast} holds no .png image at magnification(s) {list(mags)}; "
                        f"expected <class>/SOB/<type>/<patient>/<mag>/*.png")
    return paths, kinds, types, patients


def _names(values: list[str], expected: tuple[str, ...] | None, what: str, breast: Path) -> tuple[str, ...]:
    found = list(dict.fromkeys(values))
    if expected is None:
        return tuple(found)
    extra = sorted(set(found) - set(expected))
    if extra:
        raise DataError(f"BreakHis folder {breast} has {what} {extra} that data.class_names {list(expected)} "
                        f"does not list; expected only those classes")
    return expected


@dataclass(frozen=True, kw_only=True)
class BreakHisOptions(FileDataSetOptions):
    """``conf/data/breakhis.yaml``: the magnification(s), binary or subtype labels, the class names,
    the patient split (validation and test shares, its seed), and whether unreadable PNGs are skipped."""

    magnification: str | Sequence[str] | None
    label: str
    class_names: Sequence[str] | None
    patient_val_fraction: float
    test_fraction: float
    split_seed: int
    skip_corrupt: bool


def load(root: Path, options: BreakHisOptions, split: str, image_size: int) -> ImageFilesDataset:
    """The BreakHis ``split``."""
    if split not in SPLITS:
        raise DataError(f"data set {NAME!r} has no split {split!r}; its splits are {list(SPLITS)}")
    breast = breast_folder(root)
    label_kind = str(options.label)
    if label_kind not in ("binary", "subtype"):
        raise DataError(f"data.label is {label_kind!r}; expected 'binary' (benign/malignant) or 'subtype'")
    paths, kinds, types, patients = scan(breast, magnifications(options.magnification))
    values = kinds if label_kind == "binary" else types
    class_names = _names(values, class_names_option(options.class_names), "class folders" if label_kind == "binary"
                         else "tumour types", breast)
    index = {name: k for k, name in enumerate(class_names)}
    labels = np.array([index[v] for v in values], dtype=np.int64)
    group_ids = np.unique(np.asarray(patients), return_inverse=True)[1].astype(np.int64)
    val, test = float(options.patient_val_fraction), float(options.test_fraction)
    if split == "all":
        rows = np.arange(len(paths))
    else:
        if val < 0 or test < 0 or val + test >= 1:
            raise DataError(f"data.patient_val_fraction={val} and data.test_fraction={test} must be >= 0 and leave "
                            f"patients for training (sum < 1)")
        parts = split_by_groups(group_ids, labels, (1.0 - val - test, val, test), int(options.split_seed))
        rows = parts[SPLITS.index(split)]
        if len(rows) == 0:
            raise DataError(f"BreakHis split {split!r} under {breast} gets no patient (data.patient_val_fraction={val}, "
                            f"data.test_fraction={test}); expected at least one patient per split in use")
    return ImageFilesDataset([paths[i] for i in rows], labels[rows], class_names, image_size,
                             skip_corrupt=bool(options.skip_corrupt), groups=group_ids[rows])


def splits(options: BreakHisOptions) -> dict[str, str]:
    """Split names: train/val/test by patient (val only with data.patient_val_fraction > 0; ``all`` loads too)."""
    names = ["train", "test"] if float(options.patient_val_fraction) <= 0 else ["train", "val", "test"]
    return {s: s for s in names}


register_file_data_set(NAME, options=BreakHisOptions, splits=splits, load=load)
