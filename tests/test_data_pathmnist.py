"""PathMNIST: .npz at every size, memory-mapped (stored or compressed), bad arrays named."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from common.data.errors import DataError
from common.data.npz import npz_array
from common.data.pathmnist import PathMNISTDataset
from common.data.registry import dataset_splits, load_dataset
from tests.data_fixtures import data_section, image, truncate, write_pathmnist


def cfg(root: Path, **options) -> dict:
    return data_section("pathmnist", root, **{"size": 28, **options})


@pytest.mark.parametrize("size, compressed", [(28, False), (28, True), (64, False), (128, True), (224, False)])
def test_every_size_loads(tmp_path: Path, size: int, compressed: bool) -> None:
    counts = {"train": 10, "val": 2, "test": 3} if size < 224 else {"train": 2, "val": 1, "test": 1}
    write_pathmnist(tmp_path, size, counts, compressed=compressed)
    ds = load_dataset(cfg(tmp_path, size=size), "train", 32)
    assert isinstance(ds, PathMNISTDataset) and len(ds) == counts["train"]
    assert ds.class_names == tuple(data_section("pathmnist", tmp_path)["class_names"]) and len(ds.class_names) == 9
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [i % 9 for i in range(counts["train"])]
    assert isinstance(ds._images, np.memmap)  # never loaded whole
    patch = ds.load_uint8(1)
    assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8
    assert len(load_dataset(cfg(tmp_path, size=size), "test", 32)) == counts["test"]
    same = load_dataset(cfg(tmp_path, size=size), "train", size).load_uint8(1)
    assert np.array_equal(same, image(1, size, size))


def test_size_null_picks_the_smallest_file_not_below_the_model_size(tmp_path: Path) -> None:
    write_pathmnist(tmp_path, 28)
    write_pathmnist(tmp_path, 64)
    assert load_dataset(cfg(tmp_path, size=None), "train", 32).source_size == 64
    assert load_dataset(cfg(tmp_path, size=None), "train", 28).source_size == 28
    assert load_dataset(cfg(tmp_path, size=None), "train", 96).source_size == 64  # largest present
    assert dataset_splits(cfg(tmp_path)) == ("train", "val", "test")


def test_pickles_without_pixels(tmp_path: Path) -> None:
    write_pathmnist(tmp_path, 64, compressed=True)
    ds = load_dataset(cfg(tmp_path, size=64), "train", 32)
    blob = pickle.dumps(ds)
    assert len(blob) < 4096
    assert np.array_equal(pickle.loads(blob).load_uint8(3), ds.load_uint8(3))


def test_missing_file_names_the_expected_file(tmp_path: Path) -> None:
    write_pathmnist(tmp_path, 28)
    with pytest.raises(DataError, match=r"pathmnist_128\.npz does not exist.*data\.size=128"):
        load_dataset(cfg(tmp_path, size=128), "train", 32)
    with pytest.raises(DataError, match=r"data\.size is 100"):
        load_dataset(cfg(tmp_path, size=100), "train", 32)


def test_missing_key_names_file_and_key(tmp_path: Path) -> None:
    write_pathmnist(tmp_path, 28, val_images=None)
    with pytest.raises(DataError, match=r"pathmnist\.npz has no array 'val_images' .*'train_images'"):
        load_dataset(cfg(tmp_path), "val", 32)


@pytest.mark.parametrize("replace, message", [
    ({"train_images": np.zeros((10, 64, 64, 3), np.uint8)},
     r"pathmnist\.npz key 'train_images' has shape \(10, 64, 64, 3\); expected \(N, 28, 28, 3\)"),
    ({"train_images": np.zeros((10, 28, 28, 3), np.float32)},
     r"pathmnist\.npz key 'train_images' has dtype float32; expected uint8"),
    ({"train_labels": np.zeros((9, 1), np.uint8)},
     r"pathmnist\.npz key 'train_labels' has shape \(9, 1\); expected \(10, 1\)"),
    ({"train_labels": np.array([[0], [1], [9], [2], [0], [0], [0], [0], [0], [0]], np.uint8)},
     r"pathmnist\.npz key 'train_labels' index 2 has label 9, outside the class range 0\.\.8"),
    ({"train_labels": np.zeros((10, 1), np.float32)},
     r"pathmnist\.npz key 'train_labels' has dtype float32; expected integer labels"),
])
def test_bad_arrays_are_named(tmp_path: Path, replace: dict, message: str) -> None:
    write_pathmnist(tmp_path, 28, {"train": 10, "val": 2, "test": 2}, **replace)
    with pytest.raises(DataError, match=message):
        load_dataset(cfg(tmp_path), "train", 32)


def test_truncated_npz_is_named(tmp_path: Path) -> None:
    path = write_pathmnist(tmp_path, 28)
    truncate(path, 0.7)
    with pytest.raises(DataError, match=r"pathmnist\.npz is not a readable \.npz archive"):
        load_dataset(cfg(tmp_path), "train", 32)


def test_npz_array_maps_stored_and_compressed_members(tmp_path: Path) -> None:
    data = np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3)
    np.savez(tmp_path / "a.npz", x=data, f=np.asfortranarray(data[0, :, :, 0]))
    np.savez_compressed(tmp_path / "b.npz", x=data)
    assert np.array_equal(npz_array(tmp_path / "a.npz", "x"), data)
    assert np.array_equal(npz_array(tmp_path / "a.npz", "f"), data[0, :, :, 0])
    assert np.array_equal(npz_array(tmp_path / "b.npz", "x", str(tmp_path)), data)
