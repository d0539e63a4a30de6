"""``fedvitgan data check``: counts per split and class on good data; exit 2 naming the file on bad."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.data_check import main
from tests.data_fixtures import (
    NCT_CLASSES,
    pcam_name,
    truncate,
    write_camelyon17,
    write_class_folders,
    write_pcam,
)


@pytest.fixture
def pcam_root(tmp_path: Path) -> Path:
    write_pcam(tmp_path, "train", [0, 1, 1, 0, 1], size=16)
    write_pcam(tmp_path, "valid", [1, 0], size=16)
    write_pcam(tmp_path, "test", [0, 0, 1], size=16)
    return tmp_path


def test_prints_counts_per_split_and_class(pcam_root: Path, capsys) -> None:
    assert main([str(pcam_root), "--dataset", "pcam"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "data set pcam" in out and "10 patches" in out
    assert lines[2].split() == ["class", "train", "val", "test"]
    assert lines[3].split() == ["normal", "2", "1", "2"]
    assert lines[4].split() == ["tumour", "3", "1", "1"]
    assert lines[5].split() == ["total", "5", "2", "3"]
    assert "all readable" in out


def test_one_split_and_option_overrides(tmp_path: Path, capsys) -> None:
    write_pcam(tmp_path, "train", [0, 1], size=16, x_key="images")
    assert main([str(tmp_path), "--dataset", "pcam", "--split", "train", "--set", "x_key=images"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["class", "train"]


def test_bad_data_exits_2_naming_the_file(pcam_root: Path, capsys) -> None:
    (pcam_root / pcam_name("valid", "x")).unlink()
    assert main([str(pcam_root), "--dataset", "pcam"]) == 2
    captured = capsys.readouterr()
    assert "split 'val'" in captured.err and "camelyonpatch_level_2_split_valid_x.h5 does not exist" in captured.err
    assert len(captured.err.strip().splitlines()) == 1  # one paragraph


def test_missing_root_exits_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nowhere"), "--dataset", "nct_crc"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_corrupt_image_fails_unless_skipped_and_warnings_are_printed(tmp_path: Path, capsys) -> None:
    write_class_folders(tmp_path / "NCT-CRC-HE-100K", {c: 2 for c in NCT_CLASSES}, size=8)
    write_class_folders(tmp_path / "CRC-VAL-HE-7K", {c: 1 for c in NCT_CLASSES}, size=8)
    bad = min((tmp_path / "NCT-CRC-HE-100K" / "TUM").iterdir())
    truncate(bad, 0.3)
    assert main([str(tmp_path), "--dataset", "nct_crc", "--decode", "all"]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main([str(tmp_path), "--dataset", "nct_crc", "--skip-corrupt"]) == 0
    out = capsys.readouterr().out
    assert f"skipped unreadable image {bad}" in out
    assert "TUM" in out and "no patient ids" in out


def test_missing_listed_patch_is_reported(tmp_path: Path, capsys) -> None:
    write_camelyon17(tmp_path, per_center=2, size=8)
    next((tmp_path / "patches").rglob("*.png")).unlink()
    assert main([str(tmp_path), "--dataset", "camelyon17", "--decode", "0"]) == 2
    assert "image files listed for this split do not exist" in capsys.readouterr().err


def test_help_and_usage_errors(capsys) -> None:
    assert main(["--help"]) == 0
    assert "--dataset" in capsys.readouterr().out
    assert main(["/data"]) == 2  # --dataset is required
    assert main(["/data", "--dataset", "mnist"]) == 2


def test_imagefolder_both_layouts_and_the_split_each_uses(tmp_path: Path, capsys) -> None:
    flat = tmp_path / "flat"
    write_class_folders(flat, {"tumour": 10, "benign": 5}, size=8, suffix=".png", nct_names=False)
    assert main([str(flat), "--dataset", "imagefolder"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"layout: class folders {flat}/<class>/<image>, no split folders")
    assert "20% of each class to test" in lines[1] and "data.split_seed=0" in lines[1]
    assert [line.split() for line in lines[3:7]] == [["class", "train", "test"], ["benign", "4", "1"],
                                                     ["tumour", "8", "2"], ["total", "12", "3"]]
    assert main([str(flat), "--dataset", "imagefolder", "--set", "test_fraction=0.5"]) == 0
    assert capsys.readouterr().out.splitlines()[5].split() == ["tumour", "5", "5"]

    split = tmp_path / "split"
    write_class_folders(split / "train", {"tumour": 3, "benign": 2}, size=8, suffix=".png", nct_names=False)
    write_class_folders(split / "test", {"tumour": 1, "benign": 1}, size=8, suffix=".png", nct_names=False)
    assert main([str(split), "--dataset", "imagefolder"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"layout: split folders {split}/<split>/<class>/<image> (train=train, test=test)"
    assert lines[5].split() == ["tumour", "3", "1"]


def test_fedvitgan_help_lists_every_command_and_data_goes_through_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import COMMANDS, USAGE
    from simulations.cli import main as fedvitgan

    assert fedvitgan(["--help"]) == 0
    listed = {line.split()[1] for line in USAGE.splitlines() if line.strip().startswith("fedvitgan ")}
    assert listed == set(COMMANDS)
    assert COMMANDS["data"] == ("simulations.data_check", "data_command")
    assert fedvitgan(["data"]) == 2 and fedvitgan(["data", "inspect"]) == 2
    assert "usage: fedvitgan data check" in capsys.readouterr().err
    assert fedvitgan(["data", "check", "--help"]) == 0
    assert "fedvitgan data check" in capsys.readouterr().out
