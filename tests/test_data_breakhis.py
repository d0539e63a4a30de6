"""BreakHis: nested folders, magnification filter, patient-level split, patient-group sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.breakhis import patient_id
from common.data.errors import DataError
from common.data.registry import dataset_splits, load_dataset, load_real_site_data
from tests.data_fixtures import ALL_LABELS, data_section, write_breakhis

# write_breakhis: 2 classes x 2 types x 2 patients x 2 magnifications (40X, 100X) x 2 images.


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_breakhis(tmp_path)
    return tmp_path


def cfg(root: Path, **options) -> dict:
    return data_section("breakhis", root, **{"test_fraction": 0.5, **ALL_LABELS, **options})


def patients(ds) -> set[str]:
    """Patient ids of a loaded split, or of a site's subset of one."""
    paths = ds.paths if hasattr(ds, "paths") else [ds.base.paths[i] for i in ds.indices]
    return {patient_id(Path(p).parents[1].name) for p in paths}


def test_loads_binary_labels_at_one_magnification(root: Path) -> None:
    ds = load_dataset(cfg(root, magnification="40X"), "all", 32)
    assert len(ds) == 16 and all("/40X/" in p for p in ds.paths)
    assert ds.class_names == ("benign", "malignant")
    assert ds.labels.dtype == np.int64 and ds.class_counts() == {"benign": 8, "malignant": 8}
    assert all(("/benign/" in p) == (label == 0) for p, label in zip(ds.paths, ds.labels))
    patch = ds.load_uint8(0)  # 70x46 source: centre-cropped, then resized
    assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8
    assert len(load_dataset(cfg(root, magnification=None), "all", 32)) == 32
    assert len(load_dataset(cfg(root, magnification=["40X", "100"]), "all", 32)) == 32


def test_subtype_labels_come_from_the_type_folders(root: Path) -> None:
    ds = load_dataset(cfg(root, label="subtype", class_names=None), "all", 32)  # null: the type folders
    assert ds.class_names == ("adenosis", "fibroadenoma", "ductal_carcinoma", "lobular_carcinoma")
    assert set(ds.class_counts().values()) == {4}


def test_split_is_by_patient_seeded_and_stratified(root: Path) -> None:
    train = load_dataset(cfg(root), "train", 32)
    test = load_dataset(cfg(root), "test", 32)
    assert not patients(train) & patients(test)
    assert len(train) + len(test) == 16
    assert set(test.labels.tolist()) == {0, 1} and set(train.labels.tolist()) == {0, 1}
    again = load_dataset(cfg(root), "test", 32)
    assert again.paths == test.paths
    other = [load_dataset(cfg(root, split_seed=s), "test", 32).paths for s in range(1, 6)]
    assert any(p != test.paths for p in other)
    assert dataset_splits(cfg(root)) == ("train", "test")
    assert dataset_splits(cfg(root, patient_val_fraction=0.25, test_fraction=0.25)) == ("train", "val", "test")


def test_natural_partition_gives_sites_disjoint_patients(root: Path) -> None:
    sites = [load_real_site_data(cfg(root, test_fraction=0.25), {"name": "natural"}, k, 2, 32, seed=3)
             for k in range(2)]
    assert not patients(sites[0].train) & patients(sites[1].train)
    assert len(sites[0].train) + len(sites[1].train) == len(load_dataset(cfg(root, test_fraction=0.25), "train", 32))


def test_missing_layout_and_bad_options_are_named(root: Path) -> None:
    inner = root / "BreaKHis_v1" / "histology_slides"
    with pytest.raises(DataError, match=r"BreaKHis_v1/histology_slides/breast does not exist"):
        load_dataset(cfg(inner), "train", 32)
    with pytest.raises(DataError, match=r"data\.magnification '50X' names \['50X'\]"):
        load_dataset(cfg(root, magnification="50X"), "train", 32)
    with pytest.raises(DataError, match=r"holds no \.png image at magnification\(s\) \['400X'\]"):
        load_dataset(cfg(root, magnification="400X"), "train", 32)


def test_corrupt_png_fails_by_default_and_is_skipped_on_request(root: Path) -> None:
    ds = load_dataset(cfg(root), "all", 32)
    Path(ds.paths[3]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=rf"image file {ds.paths[3]} cannot be read"):
        ds.load_uint8(3)
    kept = load_dataset(cfg(root, skip_corrupt=True), "all", 32)
    assert len(kept) == 15 and kept.skipped == [ds.paths[3]] and len(kept.groups) == 15
