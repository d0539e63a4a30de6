"""data.symmetries: each data set declares its label-safe flips and rotations; every view follows it."""

from __future__ import annotations

import copy

import pytest

from common.config import CONF_DIR, ConfigError, load_yaml
from common.data.config import data_config
from common.train import run_train_config

DATA_FILES = sorted((CONF_DIR / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.stem)
def test_every_data_set_declares_its_symmetries(path) -> None:
    section = load_yaml(path)
    data_config(section)  # the whole file composes (no duplicate or malformed key)
    assert section["symmetries"] in ("d4", "flips", "none")


def test_histology_sets_default_to_all_square_symmetries() -> None:
    for path in DATA_FILES:  # every shipped set is histology, synthetic H&E or (imagefolder) a histology folder
        assert load_yaml(path)["symmetries"] == "d4", path.name


def _run(symmetries: str) -> dict:
    return {"train": load_yaml(CONF_DIR / "train" / "default.yaml"),
            "data": {**load_yaml(CONF_DIR / "data" / "imagefolder.yaml"), "symmetries": symmetries}}


@pytest.mark.parametrize("symmetries", ["d4", "flips", "none"])
def test_every_augmentation_view_follows_the_data_set(symmetries: str) -> None:
    cfg = run_train_config(_run(symmetries))
    assert cfg.augment.symmetries == symmetries  # D's view and FixMatch's strong view
    assert cfg.classifier_augment.symmetries == symmetries  # the classifier's / weak view


def test_a_bad_or_missing_declaration_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="data.symmetries"):
        data_config({**load_yaml(CONF_DIR / "data" / "synthetic.yaml"), "symmetries": "rot90"})
    run = _run("none")
    del run["data"]["symmetries"]
    with pytest.raises(ConfigError, match="data.symmetries"):
        run_train_config(copy.deepcopy(run))


def test_the_old_switch_is_gone() -> None:
    run = _run("d4")
    run["train"]["augment"]["flip_rotate"] = False
    with pytest.raises(ConfigError, match="flip_rotate"):
        run_train_config(run)
