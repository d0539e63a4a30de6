"""NCT-CRC-HE-100K / CRC-VAL-HE-7K: class folders of TIFFs, the leakage warning, bad files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.errors import DataError
from common.data.folder import ImageFilesDataset
from common.data.registry import dataset_splits, load_dataset
from tests.data_fixtures import NCT_CLASSES, data_section, truncate, write_class_folders

TRAIN, TEST = "NCT-CRC-HE-100K", "CRC-VAL-HE-7K"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_class_folders(tmp_path / TRAIN, {c: 2 for c in NCT_CLASSES}, size=24)
    write_class_folders(tmp_path / TEST, {c: 1 for c in NCT_CLASSES}, size=24)
    return tmp_path


def cfg(root: Path, **options) -> dict:
    return data_section("nct_crc", root, **options)


def test_loads_tiff_folders_with_folder_labels(root: Path) -> None:
    ds = load_dataset(cfg(root), "train", 32)
    assert isinstance(ds, ImageFilesDataset) and len(ds) == 18
    assert ds.class_names == NCT_CLASSES  # from the folders, sorted = the usual 0-8
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [k for k in range(9) for _ in range(2)]
    assert Path(ds.paths[0]).name.startswith("ADI-") and ds.paths[0].endswith(".tif")
    patch = ds.load_uint8(5)
    assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8
    test = load_dataset(cfg(root), "test", 32)
    assert len(test) == 9 and test.class_counts() == dict.fromkeys(NCT_CLASSES, 1)
    assert dataset_splits(cfg(root)) == ("train", "test")


def test_warns_about_patient_leakage(root: Path) -> None:
    ds = load_dataset(cfg(root), "train", 32)
    assert any("no patient ids" in w and "leak" in w for w in ds.warnings)


def test_class_names_from_config_must_match_folders(root: Path) -> None:
    with pytest.raises(DataError, match=rf"{TRAIN} has class folders .*missing: \['TUMOUR'\].*unexpected: \['TUM'\]"):
        load_dataset(cfg(root, class_names=[*NCT_CLASSES[:-1], "TUMOUR"]), "train", 32)
    order = list(reversed(NCT_CLASSES))
    assert load_dataset(cfg(root, class_names=order), "train", 32).class_names == tuple(order)


def test_missing_split_folder_is_named(root: Path) -> None:
    (root / TEST).rename(root / "elsewhere")
    with pytest.raises(DataError, match=rf"split folder .*{TEST} \(split 'test'\) does not exist"):
        load_dataset(cfg(root), "test", 32)


def test_empty_class_folder_is_named(root: Path) -> None:
    for f in (root / TRAIN / "MUC").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder .*MUC holds no image files"):
        load_dataset(cfg(root), "train", 32)


def test_truncated_tiff_fails_by_default_naming_the_file(root: Path) -> None:
    victim = min((root / TRAIN / "LYM").iterdir())
    truncate(victim, 0.3)
    ds = load_dataset(cfg(root), "train", 32)
    index = ds.paths.index(str(victim))
    with pytest.raises(DataError, match=rf"image file {victim} cannot be read.*data\.skip_corrupt=true"):
        ds.load_uint8(index)


def test_unreadable_file_is_reported_and_skipped_with_skip_corrupt(root: Path, caplog) -> None:
    victim = sorted((root / TRAIN / "STR").iterdir())[1]
    victim.write_bytes(b"not a tiff at all")
    ds = load_dataset(cfg(root, skip_corrupt=True), "train", 32)
    assert len(ds) == 17 and str(victim) not in ds.paths and ds.skipped == [str(victim)]
    assert ds.class_counts()["STR"] == 1
    assert any(str(victim) in w for w in ds.warnings)
    assert str(victim) in caplog.text
    assert all(ds.load_uint8(i).shape == (32, 32, 3) for i in range(len(ds)))


def test_grey_tiff_is_read_as_rgb(root: Path) -> None:
    path = min((root / TRAIN / "ADI").iterdir())
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(path)
    patch = load_dataset(cfg(root), "train", 16).load_uint8(0)
    assert patch.shape == (16, 16, 3) and int(patch.min()) == int(patch.max()) == 128
