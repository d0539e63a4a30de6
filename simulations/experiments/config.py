"""The ``experiment`` config section (``conf/experiment/*.yaml``) as a typed, validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config import ConfigError, dataclass_from_mapping
from simulations.experiments.two_stage import TwoStageConfig
from simulations.experiments.variants import REFERENCE_PROCEDURES, SETTINGS, load_variant


@dataclass(frozen=True)
class GeneratorQualityConfig:
    """``experiment.generator_quality``: generated patches per class compared with real ones."""

    enabled: bool = True
    samples_per_class: int = 100


@dataclass(frozen=True)
class ExperimentConfig:
    """Which (variant, setting, seed) runs, with what budget, and how often they are evaluated."""

    name: str = "experiment"
    variants: tuple[str, ...] = ("plain", "unified")
    settings: tuple[str, ...] = ("centralized",)
    setting_variants: dict[str, list[str]] = field(default_factory=dict)  # setting -> the variants it runs (of variants)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 1000  # local steps per hospital, every variant alike (split over rounds when federated)
    eval_every: int = 250  # steps between evaluation points of the curves
    rounds: int = 5  # federated rounds (steps must be a multiple)
    threads: int | None = None  # torch CPU threads per run (null: torch's default; 1 with several workers)
    workers: int = 1  # runs of the centralized and local settings trained side by side, one process each
    two_stage: TwoStageConfig = field(default_factory=TwoStageConfig)
    generator_quality: GeneratorQualityConfig = field(default_factory=GeneratorQualityConfig)

    def __post_init__(self) -> None:
        for name in ("variants", "settings", "seeds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "setting_variants", {str(k): list(v) for k, v in dict(self.setting_variants).items()})
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown:
            raise ValueError(f"settings {unknown} are not known; choose from {list(SETTINGS)}")
        if not self.variants or not self.settings or not self.seeds:
            raise ValueError("variants, settings and seeds must each name at least one")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {list(self.seeds)}")
        for setting in self.setting_variants:
            if setting not in SETTINGS:
                raise ValueError(f"setting_variants names an unknown setting {setting!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError("steps and eval_every must be >= 1")
        federated_references = [v for v in self.variants_for("federated")
                                 if load_variant(v).procedure in REFERENCE_PROCEDURES] if "federated" in self.settings else []
        if federated_references:
            raise ValueError(f"{federated_references} are reference rows: they run in the centralized and local settings "
                             "only (leave them out of experiment.setting_variants.federated)")
        if "federated" in self.settings and (self.rounds < 1 or self.steps % self.rounds):
            raise ValueError(f"steps ({self.steps}) must be a multiple of rounds ({self.rounds}) for the federated setting")

    def variants_for(self, setting: str) -> list[str]:
        """The variants that run in ``setting``: ``variants``, or those of them its ``setting_variants`` lists."""
        if setting not in self.setting_variants:
            return list(self.variants)
        return [v for v in self.variants if v in self.setting_variants[setting]]

    def jobs(self) -> list[tuple[str, str, int]]:
        """Every (setting, variant, seed) to run, in running order."""
        return [(s, v, seed) for s in self.settings for v in self.variants_for(s) for seed in self.seeds]


def experiment_config(section: Any) -> ExperimentConfig:
    """Build and check the ``experiment`` section; every variant named must exist."""
    cfg = dataclass_from_mapping(ExperimentConfig, section, "experiment")
    for names in cfg.setting_variants.values():
        for name in names:
            load_variant(name)  # a misspelt name fails here, naming the variants that exist
    for name in cfg.variants:
        variant = load_variant(name)
        if variant.procedure == "two_stage" and any(
                s == "federated" for s in cfg.settings if name in cfg.variants_for(s)):
            raise ConfigError(f"experiment: variant {name!r} (two_stage) has no federated form; "
                              "leave it out of setting_variants.federated")
    return cfg
