"""Presets and the train section load from conf/, and bad keys are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import common.config as config_module
from common.config import CONF_DIR, DERIVED_FROM, ConfigError, dataclass_from_mapping, defaults_from_conf, derived_field, load_yaml
from common.model import ModelConfig, model_preset
from common.train import TrainConfig, train_config


def _code_defaults(cls: type) -> list[str]:
    """Fields of ``cls`` with a default written in code (a derived field, set from another section, aside)."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING and DERIVED_FROM not in f.metadata]


def test_the_train_and_privacy_defaults_are_written_in_conf_alone() -> None:
    from common.privacy.config import PrivacyConfig, privacy_config

    for cls in (TrainConfig, PrivacyConfig):
        assert _code_defaults(cls) == [], f"{cls.__name__} writes defaults in code: {_code_defaults(cls)}"
    assert train_config(load_yaml(CONF_DIR / "train" / "default.yaml")) == TrainConfig()
    assert privacy_config(load_yaml(CONF_DIR / "privacy" / "default.yaml")) == PrivacyConfig()
    assert TrainConfig(batch_size=8) == dataclasses.replace(TrainConfig(), batch_size=8)


def test_every_section_dataclass_takes_its_defaults_from_its_own_section_of_conf() -> None:
    from client.site_cache import CacheConfig
    from common.progress import ConsoleConfig
    from common.train.adversarial_scale import AdversarialTrunkConfig
    from common.train.augment import AugmentConfig
    from common.train.config import OptimConfig, SemiSupervisedConfig
    from common.train.gate import PseudoLabelGateConfig
    from common.train.selection import SelectionConfig
    from common.train.weighting import WeightingConfig
    from simulations.experiments.config import ExperimentConfig, GeneratorQualityConfig
    from simulations.experiments.two_stage import TwoStageConfig

    train = "train/default.yaml"
    sections = {OptimConfig: (train, "optim"), SemiSupervisedConfig: (train, "semi_supervised"),
                SelectionConfig: (train, "selection"), PseudoLabelGateConfig: (train, "pseudo_label_gate"),
                AdversarialTrunkConfig: (train, "adversarial_trunk"), WeightingConfig: (train, "weighting"),
                AugmentConfig: (train, "augment"), CacheConfig: ("config.yaml", "client"),
                ConsoleConfig: ("config.yaml", "console"),
                ExperimentConfig: ("experiments.yaml", "experiment"),
                TwoStageConfig: ("experiments.yaml", "experiment.two_stage"),
                GeneratorQualityConfig: ("experiments.yaml", "experiment.generator_quality")}
    for cls, (path, section) in sections.items():
        assert _code_defaults(cls) == [], f"{cls.__name__} writes defaults in code: {_code_defaults(cls)}"
        assert cls() == dataclass_from_mapping(cls, load_yaml(CONF_DIR / path, section), section), cls.__name__
    # The pseudo-labels and the classifier's view share a class with another section, and keep their own values.
    shipped = TrainConfig()
    assert shipped.pseudo_label.confidence_threshold != SelectionConfig().confidence_threshold
    assert shipped.classifier_augment.cutout != AugmentConfig().cutout
    # The symmetries follow data.symmetries: the one field a builder sets from another section.
    assert [f.name for f in dataclasses.fields(AugmentConfig) if DERIVED_FROM in f.metadata] == ["symmetries"]
    assert train_config(load_yaml(CONF_DIR / "train" / "default.yaml"), symmetries="none").augment.symmetries == "none"


def test_model_sizes_live_in_the_presets_alone() -> None:
    fields = dataclasses.fields(ModelConfig)
    # trunk_prior, classifier_grid, classifier_centre and classifier_whitening are not sizes: null, 0 or
    # false in every preset, absent from models recorded before them
    extras = ("trunk_prior", "classifier_grid", "classifier_centre", "classifier_whitening")
    assert [(f.name, f.default) for f in fields if f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING] == [("trunk_prior", None), ("classifier_grid", 0),  # type: ignore[misc]
                                                                ("classifier_centre", False),
                                                                ("classifier_whitening", False)]
    with pytest.raises(ConfigError, match=r"model: missing required key 'name'"):
        dataclass_from_mapping(ModelConfig, {}, "model")
    for preset in ("tiny", "small", "base"):
        assert set(extras) <= set(load_yaml(CONF_DIR / "model" / f"{preset}.yaml"))
    recorded = {k: v for k, v in dataclasses.asdict(model_preset("tiny")).items() if k not in extras}
    old = dataclass_from_mapping(ModelConfig, recorded, "model")
    assert old.trunk_prior is None and old.classifier_grid == 0 and old.classifier_centre is False
    assert old.classifier_whitening is False


def test_the_aggregation_bounds_come_from_conf(tmp_path: Path) -> None:
    from server.strategy import AggregationConfig

    section = load_yaml(CONF_DIR / "federation" / "default.yaml", "aggregation")
    assert _code_defaults(AggregationConfig) == []
    assert AggregationConfig.from_config(section).clip_update_norm == section["clip_update_norm"]
    without = {k: v for k, v in section.items() if k != "max_weight_share"}
    with pytest.raises(ConfigError, match=r"federation\.aggregation: missing required key\(s\) \['max_weight_share'\]"):
        AggregationConfig.from_config(without)


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

    (tmp_path / "nested.yaml").write_text("outer:\n  inner:\n    size: 4\n    names: [x]\nother: ${now:%H}\n")

    @dataclasses.dataclass(frozen=True)
    @defaults_from_conf("nested.yaml", "outer.inner")
    class Inner:
        size: int
        names: list[str]
        mode: str = derived_field("d4", "data.symmetries")

    assert Inner() == Inner(4, ["x"], "d4")  # the section alone is resolved: Hydra's ${now:...} elsewhere is no error

    @dataclasses.dataclass(frozen=True)
    @defaults_from_conf("nested.yaml", "outer.absent")
    class Absent:
        size: int

    with pytest.raises(ConfigError, match=r"nested.yaml \(outer.absent\): the file has no section 'outer.absent'"):
        Absent()


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


