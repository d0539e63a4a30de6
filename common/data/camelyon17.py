"""Camelyon17-WILDS: 96x96 PNG patches from five hospitals, listed in ``metadata.csv``.

Layout (``data.root``): ``metadata.csv`` (columns patient, node, x_coord, y_coord, tumor, slide,
center, split; a leading unnamed index column is allowed) and
``patches/patient_{ppp}_node_{n}/patch_patient_{ppp}_node_{n}_x_{x}_y_{y}.png``.

``center`` (0-4) is the hospital: the natural federated split. The official WILDS splits are exposed
as split names: ``train`` (csv split 0) and ``id_val`` (csv split 1) of the centres that are neither
the validation nor the test hospital, ``val`` (all of ``data.val_center``, officially centre 1) and
``test`` (all of ``data.test_center``, officially centre 2). Setting both to null puts all five
hospitals into train/id_val. ``groups`` are patients, ``hospitals`` are centres.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.catalog import register_file_data_set
from common.data.errors import DataError
from common.data.folder import ImageFilesDataset
from common.data.options import FileDataSetOptions, class_names_option

NAME = "camelyon17"
COLUMNS: tuple[str, ...] = ("patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split")
SPLITS: tuple[str, ...] = ("train", "id_val", "val", "test", "all")


def patch_path(root: Path, patient: int, node: int, x: int, y: int) -> Path:
    """Where WILDS stores the patch of a metadata row."""
    folder = f"patient_{patient:03d}_node_{node}"
    return root / "patches" / folder / f"patch_{folder}_x_{x}_y_{y}.png"


def read_metadata(path: Path) -> dict[str, np.ndarray]:
    """The metadata columns as int64 arrays; ``DataError`` naming the file, row and column if malformed."""
    if not path.is_file():
        raise DataError(f"Camelyon17-WILDS file {path} does not exist; expected metadata.csv with columns "
                        f"{', '.join(COLUMNS)} in data.root")
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(f"Camelyon17-WILDS file {path} is empty; expected a header {', '.join(COLUMNS)}")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(f"Camelyon17-WILDS file {path} lacks column(s) {missing} (header: {header}); "
                            f"expected columns {', '.join(COLUMNS)}")
        where = [header.index(c) for c in COLUMNS]
        rows: list[list[int]] = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append([int(float(row[i])) for i in where])
            except (ValueError, IndexError) as error:
                raise DataError(f"Camelyon17-WILDS file {path} line {line} is malformed ({row!r}); expected "
                                f"integer values for {', '.join(COLUMNS)}") from error
    table = np.asarray(rows, dtype=np.int64).reshape(-1, len(COLUMNS))
    return {c: table[:, k] for k, c in enumerate(COLUMNS)}


def split_mask(meta: Mapping[str, np.ndarray], split: str, val_center: int | None,
               test_center: int | None) -> np.ndarray:
    """Rows of the named split (see the module docstring)."""
    center, csv_split = meta["center"], meta["split"]
    held = np.isin(center, [c for c in (val_center, test_center) if c is not None])
    if split == "train":
        return ~held & (csv_split == 0)
    if split == "id_val":
        return ~held & (csv_split == 1)
    if split == "val":
        return center == val_center if val_center is not None else np.zeros(len(center), bool)
    if split == "test":
        return center == test_center if test_center is not None else np.zeros(len(center), bool)
    if split == "all":
        return np.ones(len(center), bool)
    raise DataError(f"data set {NAME!r} has no split {split!r}; its splits are {list(SPLITS)}")


@dataclass(frozen=True, kw_only=True)
class Camelyon17Options(FileDataSetOptions):
    """``conf/data/camelyon17.yaml``: the class names of the csv's tumor column, the validation and
    test hospitals (null: kept in train / id_val), and whether unreadable PNGs are skipped."""

    class_names: Sequence[str] | None
    val_center: int | None
    test_center: int | None
    skip_corrupt: bool


def splits(options: Camelyon17Options) -> dict[str, str]:
    """The official WILDS split names (``all``, every row, is loadable too)."""
    return {s: s for s in SPLITS if s != "all"}


def _center(value: int | None) -> int | None:
    return None if value is None else int(value)


def load(root: Path, options: Camelyon17Options, split: str, image_size: int) -> ImageFilesDataset:
    """The Camelyon17-WILDS ``split``."""
    meta_path = root / "metadata.csv"
    meta = read_metadata(meta_path)
    if not (root / "patches").is_dir():
        raise DataError(f"Camelyon17-WILDS folder {root / 'patches'} does not exist; expected the patches "
                        f"listed in {meta_path} under patches/patient_<ppp>_node_<n>/")
    class_names = class_names_option(options.class_names)
    if class_names is None:
        raise DataError("data.class_names is not set for data set 'camelyon17'; its csv holds 0/1 in the tumor "
                        "column, so list the two classes (conf/data/camelyon17.yaml: [normal, tumour])")
    bad = np.flatnonzero((meta["tumor"] < 0) | (meta["tumor"] >= len(class_names)))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"Camelyon17-WILDS file {meta_path} line {i + 2} (row {i}) has tumor label "
                        f"{int(meta['tumor'][i])}, outside the class range 0..{len(class_names) - 1}")
    mask = split_mask(meta, split, _center(options.val_center), _center(options.test_center))
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        raise DataError(f"Camelyon17-WILDS file {meta_path} lists no patch for split {split!r} (with "
                        f"data.val_center={options.val_center}, "
                        f"data.test_center={options.test_center}); expected rows "
                        f"for it (is metadata.csv complete?)")
    paths = [patch_path(root, int(meta["patient"][i]), int(meta["node"][i]), int(meta["x_coord"][i]),
                        int(meta["y_coord"][i])) for i in rows]
    return ImageFilesDataset(paths, meta["tumor"][rows], class_names, image_size,
                             skip_corrupt=bool(options.skip_corrupt),
                             hospitals=meta["center"][rows].copy(), groups=meta["patient"][rows].copy())


register_file_data_set(NAME, options=Camelyon17Options, splits=splits, load=load)
