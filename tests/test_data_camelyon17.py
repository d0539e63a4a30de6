"""Camelyon17-WILDS: metadata.csv + patches, official splits, hospitals as natural sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.errors import DataError
from common.data.registry import dataset_splits, load_dataset, load_real_site_data
from tests.data_fixtures import ALL_LABELS, data_section, image, truncate, write_camelyon17


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_camelyon17(tmp_path)  # 5 centres x 4 patches; last patch of centres 0, 3, 4 is id_val
    return tmp_path


def cfg(root: Path, **options) -> dict:
    return data_section("camelyon17", root, **{**ALL_LABELS, **options})


def test_loads_patches_with_labels_hospitals_and_patients(root: Path) -> None:
    ds = load_dataset(cfg(root), "all", 32)
    assert len(ds) == 20 and ds.class_names == ("normal", "tumour")
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 0, 1] * 5
    assert ds.hospitals.tolist() == [c for c in range(5) for _ in range(4)]
    assert ds.groups.tolist()[:4] == [0, 1, 0, 1]
    assert ds.paths[1].endswith("patches/patient_001_node_1/patch_patient_001_node_1_x_100_y_200.png")
    patch = ds.load_uint8(1)
    assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8
    assert np.array_equal(load_dataset(cfg(root), "all", 96).load_uint8(7), image(7, 96, 96))


def test_official_splits_hold_out_centres_1_and_2(root: Path) -> None:
    shipped = data_section("camelyon17", root)
    assert (shipped["val_center"], shipped["test_center"]) == (1, 2)  # the official WILDS hospitals
    assert dataset_splits(cfg(root)) == ("train", "id_val", "val", "test")
    hospitals = {s: sorted(set(load_dataset(cfg(root), s, 32).hospitals.tolist()))
                 for s in ("train", "id_val", "val", "test")}
    assert hospitals == {"train": [0, 3, 4], "id_val": [0, 3, 4], "val": [1], "test": [2]}
    assert len(load_dataset(cfg(root), "train", 32)) == 9
    assert len(load_dataset(cfg(root), "id_val", 32)) == 3
    five = load_dataset(cfg(root, val_center=None, test_center=None), "train", 32)
    assert sorted(set(five.hospitals.tolist())) == [0, 1, 2, 3, 4]


def test_natural_partition_is_one_hospital_per_site(root: Path) -> None:
    sites = [load_real_site_data(cfg(root), {"name": "natural"}, k, 3, 32, seed=0) for k in range(3)]
    for site, centre in zip(sites, (0, 3, 4)):
        assert set(site.train.hospitals.tolist()) == {centre} and len(site.train) == 3
        assert set(site.test.hospitals.tolist()) == {centre} and len(site.test) == 1
    with pytest.raises(DataError, match=r"3 hospitals \[0, 3, 4\].*federation\.num_sites=3"):
        load_real_site_data(cfg(root), {"name": "natural"}, 0, 5, 32, seed=0)
    # All five hospitals: centres 1 and 2 have no id_val rows in this copy, which is named.
    with pytest.raises(DataError, match=r"hospital\(s\) \[1, 2\] have no held-out patches"):
        load_real_site_data(cfg(root, val_center=None, test_center=None), {"name": "natural"}, 0, 5, 32, seed=0)


def test_missing_metadata_is_named(root: Path) -> None:
    (root / "metadata.csv").unlink()
    with pytest.raises(DataError, match=r"metadata\.csv does not exist"):
        load_dataset(cfg(root), "train", 32)


def test_missing_column_and_bad_row_are_named(root: Path) -> None:
    meta = root / "metadata.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0].replace("center", "hospital"), *lines[1:]]))
    with pytest.raises(DataError, match=r"metadata\.csv lacks column\(s\) \['center'\]"):
        load_dataset(cfg(root), "train", 32)
    meta.write_text("\n".join([lines[0], lines[1], "5,000,0,abc,1,0,0,0,0", *lines[2:]]))
    with pytest.raises(DataError, match=r"metadata\.csv line 3 is malformed"):
        load_dataset(cfg(root), "train", 32)


def test_label_outside_class_range_is_named(tmp_path: Path) -> None:
    write_camelyon17(tmp_path, bad_tumor=True)
    with pytest.raises(DataError, match=r"metadata\.csv line 3 \(row 1\) has tumor label 3, outside"):
        load_dataset(cfg(tmp_path), "train", 32)


def test_missing_or_truncated_patch_is_named(root: Path) -> None:
    ds = load_dataset(cfg(root), "train", 32)
    missing, broken = Path(ds.paths[0]), Path(ds.paths[1])
    missing.unlink()
    truncate(broken, 0.5)
    with pytest.raises(DataError, match=rf"image file {missing} does not exist"):
        ds.load_uint8(0)
    with pytest.raises(DataError, match=rf"image file {broken} cannot be read"):
        ds.load_uint8(1)
    kept = load_dataset(cfg(root, skip_corrupt=True), "train", 32)
    assert len(kept) == 7 and set(kept.skipped) == {str(missing), str(broken)}
    assert len(kept.hospitals) == 7
