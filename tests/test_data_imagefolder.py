"""Generic class folders: any image format, names from folders, unreadable files named or skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.errors import DataError
from common.data.registry import dataset_splits, load_dataset
from tests.data_fixtures import data_section, image, save, write_class_folders


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_class_folders(tmp_path / "train", {"tumour": 3, "benign": 2}, size=40, suffix=".png", nct_names=False)
    write_class_folders(tmp_path / "test", {"tumour": 1, "benign": 1}, size=40, suffix=".jpg", nct_names=False)
    save(tmp_path / "train" / "tumour" / "wide.tif", image(9, 20, 50))
    (tmp_path / "train" / "tumour" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "tumour" / ".hidden.png").write_bytes(b"")
    return tmp_path


def cfg(root: Path, **options) -> dict:
    return data_section("imagefolder", root, **options)


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


# ---------------------------------------------------------------- ROOT/<class>/<image> (no split folders)
@pytest.fixture
def class_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flat")
    write_class_folders(folder, {"tumour": 10, "benign": 5, "stroma": 3}, size=16, suffix=".png", nct_names=False)
    return folder


def _split_paths(root: Path, **options) -> dict[str, list[str]]:
    return {s: load_dataset(cfg(root, **options), s, 8).paths for s in ("train", "test")}


def test_class_layout_holds_out_a_stratified_split_of_every_class(class_root: Path) -> None:
    train = load_dataset(cfg(class_root), "train", 8)
    test = load_dataset(cfg(class_root), "test", 8)
    assert train.class_names == test.class_names == ("benign", "stroma", "tumour")
    assert test.class_counts() == {"benign": 1, "stroma": 1, "tumour": 2}  # round(0.2 n), at least one
    assert train.class_counts() == {"benign": 4, "stroma": 2, "tumour": 8}
    assert not set(train.paths) & set(test.paths)
    assert sorted(train.paths + test.paths) == sorted(str(p) for p in class_root.rglob("*.png"))
    for ds in (train, test):  # labels follow the folder of each file
        assert all(Path(p).parent.name == ds.class_names[y] for p, y in zip(ds.paths, ds.labels))
    assert dataset_splits(cfg(class_root)) == ("train", "test")


def test_class_layout_split_is_the_same_for_a_seed_and_changes_with_it(class_root: Path) -> None:
    first = _split_paths(class_root)
    assert _split_paths(class_root) == first
    assert _split_paths(class_root, split_seed=0) == first
    seeds = [_split_paths(class_root, split_seed=s)["test"] for s in range(1, 6)]
    assert any(test != first["test"] for test in seeds)
    larger = _split_paths(class_root, test_fraction=0.5)
    assert len(larger["test"]) == 2 + 2 + 5


def test_adding_images_to_one_class_keeps_the_other_classes_split(class_root: Path) -> None:
    before = _split_paths(class_root)
    for k in range(99, 103):  # the first class in sorted order: a shared shuffle would move the others
        save(class_root / "benign" / f"img_{k}.png", image(k, 16, 16))
    after = _split_paths(class_root)
    for split in ("train", "test"):
        assert [p for p in after[split] if "/benign/" not in p] == [p for p in before[split] if "/benign/" not in p]


def test_class_layout_without_held_out_split_and_bad_fraction(class_root: Path) -> None:
    assert dataset_splits(cfg(class_root, test_fraction=0.0)) == ("train",)
    assert len(load_dataset(cfg(class_root, test_fraction=0.0), "train", 8)) == 18
    with pytest.raises(DataError, match=r"data\.test_fraction must be in \[0, 1\), got 1\.5"):
        load_dataset(cfg(class_root, test_fraction=1.5), "train", 8)
    with pytest.raises(DataError, match=r"has no split 'val'"):
        load_dataset(cfg(class_root), "val", 8)


def test_layout_auto_reads_split_folders_when_present_and_can_be_forced(root: Path, class_root: Path) -> None:
    from common.data.imagefolder import ImageFolderOptions, describe, layout
    from common.data.options import read_options

    def options(folder: Path, **more) -> ImageFolderOptions:
        return read_options(ImageFolderOptions, cfg(folder, **more))

    assert layout(options(root)) == "splits" and layout(options(class_root)) == "classes"
    assert "split folders" in describe(options(root)) and "20% of each class" in describe(options(class_root))
    with pytest.raises(DataError, match=r"split folder .*train \(split 'train'\) does not exist"):
        load_dataset(cfg(class_root, layout="splits"), "train", 8)
    with pytest.raises(DataError, match=r"test holds no image files.*data\.layout=classes"):
        load_dataset(cfg(root, layout="classes"), "train", 8)  # split folders read as classes
    with pytest.raises(DataError, match=r"data\.layout 'flat' is not known"):
        layout(options(root, layout="flat"))


def test_class_layout_error_says_how_the_root_was_read(tmp_path: Path) -> None:
    (tmp_path / "tumour").mkdir()
    (tmp_path / "tumour" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=r"tumour holds no image files.*class-folder layout <root>/<class>/<image>"):
        load_dataset(cfg(tmp_path), "train", 8)


def test_federation_class_names_come_from_the_folders_when_not_given(root: Path, class_root: Path) -> None:
    from common.config import ConfigError
    from common.data.registry import configured_class_names

    assert configured_class_names(cfg(class_root)) == ("benign", "stroma", "tumour")
    assert configured_class_names(cfg(root)) == ("benign", "tumour")
    assert configured_class_names(cfg(root, class_names=["tumour", "benign"])) == ("tumour", "benign")
    with pytest.raises(ConfigError, match=r"data\.class_names is not set, and the class folders cannot be read"):
        configured_class_names(cfg(root / "missing"))
