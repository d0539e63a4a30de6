"""Presets and the train section load from conf/, and bad keys are named."""

from __future__ import annotations

import pytest

from common.config import CONF_DIR, ConfigError, load_yaml
from common.model import model_preset
from common.train import TrainConfig, train_config


def test_default_train_yaml_matches_the_dataclass_defaults() -> None:
    assert train_config(load_yaml(CONF_DIR / "train" / "default.yaml")) == TrainConfig()


def test_unknown_key_is_named() -> None:
    section = load_yaml(CONF_DIR / "train" / "default.yaml")
    section["selection"]["confidence_treshold"] = 0.5
    with pytest.raises(ConfigError, match=r"train\.selection.*confidence_treshold"):
        train_config(section)


def test_out_of_range_value_is_named() -> None:
    section = load_yaml(CONF_DIR / "train" / "default.yaml")
    section["selection"]["distance_quantile"] = 1.5
    with pytest.raises(ConfigError, match="distance_quantile"):
        train_config(section)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        model_preset("huge")
