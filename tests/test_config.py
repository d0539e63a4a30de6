"""Presets and the train section load from conf/, and bad keys are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import common.config as config_module
from common.config import CONF_DIR, ConfigError, defaults_from_conf, load_yaml
from common.model import model_preset
from common.train import TrainConfig, train_config


def test_the_train_and_privacy_defaults_are_written_in_conf_alone() -> None:
    from common.privacy.config import PrivacyConfig, privacy_config

    for cls in (TrainConfig, PrivacyConfig):
        in_code = [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING]
        assert in_code == [], f"{cls.__name__} writes defaults in code: {in_code}"
    assert train_config(load_yaml(CONF_DIR / "train" / "default.yaml")) == TrainConfig()
    assert privacy_config(load_yaml(CONF_DIR / "privacy" / "default.yaml")) == PrivacyConfig()
    assert TrainConfig(batch_size=8) == dataclasses.replace(TrainConfig(), batch_size=8)


def test_a_dataclass_takes_its_defaults_from_its_conf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "section.yaml").write_text("size: 3\nnames: [a, b]\n")
    monkeypatch.setattr(config_module, "CONF_DIR", tmp_path)

    @dataclasses.dataclass(frozen=True)
    @defaults_from_conf("section.yaml")
    class Section:
        size: int
        names: list[str]

    assert Section() == Section(3, ["a", "b"]) and Section(size=5).names == ["a", "b"]
    first = Section()
    first.names.append("c")  # each instance gets its own copy of a mutable default
    assert Section().names == ["a", "b"]

    (tmp_path / "short.yaml").write_text("size: 3\n")

    @dataclasses.dataclass(frozen=True)
    @defaults_from_conf("short.yaml")
    class Short:
        size: int
        names: list[str]

    with pytest.raises(ConfigError, match=r"conf/short.yaml: missing required key 'names'"):
        Short()
    with pytest.raises(TypeError, match=r"Coded.size has a default in code; its default belongs in conf/section.yaml"):
        @defaults_from_conf("section.yaml")
        class Coded:
            size: int = 1


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


def test_federation_section_is_typed_and_every_key_comes_from_conf() -> None:
    from common.federation_config import federation_config

    section = load_yaml(CONF_DIR / "federation" / "default.yaml")
    fed = federation_config(section)
    assert (fed.wait_for_sites_s, fed.evaluate_batch_size, fed.local_state_keep_last) == (300.0, 256, 2)
    without = {k: v for k, v in section.items() if k != "wait_for_sites_s"}
    with pytest.raises(ConfigError, match=r"federation: missing required key 'wait_for_sites_s'"):
        federation_config(without)
    with pytest.raises(ConfigError, match=r"federation: unknown key\(s\) \['num_site'\]"):
        federation_config({**section, "num_site": 3})
    with pytest.raises(ConfigError, match=r"federation: min_sites must be an integer >= 1, got 0"):
        federation_config({**section, "min_sites": 0})
    with pytest.raises(ConfigError, match=r"federation: transport_dtype must be one of"):
        federation_config({**section, "transport_dtype": "int8"})


def test_every_partition_yaml_builds_its_typed_config() -> None:
    from common.data.config import PARTITIONS, partition_config

    built = {name: partition_config(load_yaml(CONF_DIR / "partition" / f"{name}.yaml")) for name in PARTITIONS}
    assert built["quantity"].alpha == 1.0 and built["dirichlet"].alpha == 0.5 and built["iid"].alpha is None


