"""PCam: HDF5 patches load lazily with their labels; malformed files fail naming file and key."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.data.errors import DataError
from common.data.pcam import PCamDataset
from common.data.registry import dataset_splits, load_dataset
from tests.data_fixtures import data_section, image, pcam_name, truncate, write_pcam

LABELS = [0, 1, 1, 0, 1]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for token, labels in (("train", LABELS), ("valid", [1, 0]), ("test", [0, 1, 0])):
        write_pcam(tmp_path, token, labels)
    return tmp_path


def cfg(root: Path, **options) -> dict:
    return data_section("pcam", root, **options)


def test_loads_shapes_labels_and_class_names(root: Path) -> None:
    ds = load_dataset(cfg(root), "train", 32)
    assert isinstance(ds, PCamDataset) and len(ds) == 5
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == LABELS
    assert ds.class_names == ("normal", "tumour")
    patch = ds.load_uint8(3)
    assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8
    tensor, label = ds[1]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and label == 1
    full = load_dataset(cfg(root), "train", 96)
    assert np.array_equal(full.load_uint8(2), image(2, 96, 96))  # native size: the stored pixels
    assert dataset_splits(cfg(root)) == ("train", "val", "test")
    assert len(load_dataset(cfg(root), "val", 32)) == 2


def test_reads_lazily_and_pickles_without_pixels(root: Path) -> None:
    ds = load_dataset(cfg(root), "train", 32)
    assert ds._images is None  # nothing but the labels read up front
    ds.load_uint8(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._images is None and np.array_equal(clone.load_uint8(4), ds.load_uint8(4))
    assert len(pickle.dumps(ds)) < 4096
    images, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == LABELS[:4]


def test_missing_root_names_data_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.root is not set"):
        load_dataset({**cfg(tmp_path), "root": None}, "train", 32)
    with pytest.raises(DataError, match=r"data\.root .*nowhere.* does not exist"):
        load_dataset(cfg(tmp_path / "nowhere"), "train", 32)


def test_an_unknown_or_a_missing_option_is_named(root: Path) -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.x_kee is not an option of data set 'pcam'"):
        load_dataset(cfg(root, x_kee="images"), "train", 32)
    without = {k: v for k, v in cfg(root).items() if k != "y_key"}
    with pytest.raises(ConfigError, match=r"data\.y_key is not set \(conf/data/pcam\.yaml"):
        load_dataset(without, "train", 32)


def test_missing_split_file_is_named(root: Path) -> None:
    (root / pcam_name("valid", "y")).unlink()
    with pytest.raises(DataError, match=r"camelyonpatch_level_2_split_valid_y\.h5 does not exist"):
        load_dataset(cfg(root), "val", 32)
    (root / pcam_name("test", "x")).rename(root / (pcam_name("test", "x") + ".gz"))
    with pytest.raises(DataError, match=r"split_test_x\.h5 does not exist .*gunzip"):
        load_dataset(cfg(root), "test", 32)
    with pytest.raises(DataError, match=r"no split 'holdout'"):
        load_dataset(cfg(root), "holdout", 32)


def test_wrong_key_names_file_and_key(tmp_path: Path) -> None:
    write_pcam(tmp_path, "train", LABELS, x_key="images")
    with pytest.raises(DataError, match=r"split_train_x\.h5 has no HDF5 data set under key 'x' .*'images'"):
        load_dataset(cfg(tmp_path), "train", 32)
    assert len(load_dataset(cfg(tmp_path, x_key="images"), "train", 32)) == 5


@pytest.mark.parametrize("variant, message", [
    ("grey", r"key 'x' has shape \(5, 16, 16\); expected \(N, 96, 96, 3\)"),
    ("float", r"key 'x' has dtype float32; expected uint8"),
    ("count", r"split_train_y\.h5 key 'y' has shape \(4, 1, 1, 1\); expected \(5, 1, 1, 1\)"),
    ("label", r"split_train_y\.h5 key 'y' index 2 has label 2, outside the class range 0\.\.1"),
])
def test_bad_shape_dtype_or_label_is_named(tmp_path: Path, variant: str, message: str) -> None:
    x_path, y_path = write_pcam(tmp_path, "train", LABELS, size=16,
                                x_dtype="float32" if variant == "float" else "uint8")
    if variant == "grey":
        with h5py.File(x_path, "w") as f:
            f.create_dataset("x", data=np.zeros((5, 16, 16), np.uint8))
    if variant in ("count", "label"):
        labels = np.array(LABELS[:4] if variant == "count" else [0, 1, 2, 0, 1], np.uint8)
        with h5py.File(y_path, "w") as f:
            f.create_dataset("y", data=labels.reshape(-1, 1, 1, 1))
    with pytest.raises(DataError, match=message):
        load_dataset(cfg(tmp_path), "train", 32)


def test_truncated_file_is_named(root: Path) -> None:
    truncate(root / pcam_name("train", "x"), 0.6)
    with pytest.raises(DataError, match=r"split_train_x\.h5 cannot be opened as HDF5"):
        load_dataset(cfg(root), "train", 32)


def test_unreadable_patch_names_file_key_and_index(tmp_path: Path) -> None:
    x_path, _ = write_pcam(tmp_path, "train", LABELS)
    with h5py.File(x_path, "w") as f:  # gzip chunks, so damaged bytes fail to inflate
        f.create_dataset("x", data=np.stack([image(i, 96, 96) for i in range(5)]),
                         chunks=(1, 96, 96, 3), compression="gzip")
        offset = f["x"].id.get_chunk_info(3).byte_offset
    ds = load_dataset(cfg(tmp_path), "train", 32)
    with open(x_path, "r+b") as handle:  # the header stays intact: the file opens, patch 3 does not read
        handle.seek(offset)
        handle.write(b"\xff" * 64)
    assert ds.load_uint8(2).shape == (32, 32, 3)
    with pytest.raises(DataError, match=r"split_train_x\.h5 key 'x' index 3 cannot be read"):
        ds.load_uint8(3)


def test_slide_groups_from_meta_csv(root: Path) -> None:
    assert load_dataset(cfg(root), "train", 32).groups is None
    (root / "camelyonpatch_level_2_split_train_meta.csv").write_text(
        ",coord_y,coord_x,tumor_patch,center_tumor_patch,wsi\n"
        + "".join(f"{i},0,0,False,False,slide_{i % 2}\n" for i in range(5)))
    assert load_dataset(cfg(root), "train", 32).groups.tolist() == [0, 1, 0, 1, 0]
