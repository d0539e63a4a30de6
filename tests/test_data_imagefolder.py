"""Generic class folders: any image format, names from folders, unreadable files named or skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.errors import DataError
from common.data.registry import dataset_splits, load_dataset
from tests.data_fixtures import image, save, write_class_folders


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_class_folders(tmp_path / "train", {"tumour": 3, "benign": 2}, size=40, suffix=".png", nct_names=False)
    write_class_folders(tmp_path / "test", {"tumour": 1, "benign": 1}, size=40, suffix=".jpg", nct_names=False)
    save(tmp_path / "train" / "tumour" / "wide.tif", image(9, 20, 50))
    (tmp_path / "train" / "tumour" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "tumour" / ".hidden.png").write_bytes(b"")
    return tmp_path


def cfg(root: Path, **options) -> dict:
    return {"name": "imagefolder", "root": str(root), **options}


def test_loads_png_jpg_tif_with_sorted_folder_classes(root: Path) -> None:
    ds = load_dataset(cfg(root), "train", 24)
    assert ds.class_names == ("benign", "tumour")
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert ds.labels.dtype == np.int64
    for i in range(len(ds)):
        patch = ds.load_uint8(i)
        assert patch.shape == (24, 24, 3) and patch.dtype == np.uint8
    test = load_dataset(cfg(root), "test", 24)
    assert len(test) == 2 and test.class_names == ("benign", "tumour")
    assert dataset_splits(cfg(root)) == ("train", "test")


def test_root_itself_as_a_split(root: Path) -> None:
    ds = load_dataset(cfg(root / "test", splits={"train": ".", "test": None}), "train", 16)
    assert len(ds) == 2
    assert dataset_splits(cfg(root, splits={"test": None})) == ("train",)


def test_configured_class_names_fix_the_order_and_must_match(root: Path) -> None:
    ds = load_dataset(cfg(root, class_names=["tumour", "benign"]), "train", 16)
    assert ds.class_names == ("tumour", "benign") and ds.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert all("/tumour/" in p for p in ds.paths[:4])
    with pytest.raises(DataError, match=r"train has class folders \['benign', 'tumour'\]; expected exactly"):
        load_dataset(cfg(root, class_names=["tumour", "normal"]), "train", 16)


def test_missing_split_folder_and_root_are_named(root: Path) -> None:
    with pytest.raises(DataError, match=r"split folder .*validation \(split 'val'\) does not exist"):
        load_dataset(cfg(root, splits={"val": "validation"}), "val", 16)
    with pytest.raises(DataError, match=r"data\.root .*missing for data set .* does not exist"):
        load_dataset(cfg(root / "missing"), "train", 16)


def test_unreadable_image_is_an_error_unless_skip_corrupt(root: Path) -> None:
    bad = root / "train" / "benign" / "img_1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    ds = load_dataset(cfg(root), "train", 16)
    with pytest.raises(DataError, match=rf"image file {bad} cannot be read"):
        ds.load_uint8(1)
    kept = load_dataset(cfg(root, skip_corrupt=True), "train", 16)
    assert len(kept) == 5 and kept.skipped == [str(bad)] and kept.labels.tolist() == [0, 1, 1, 1, 1]
