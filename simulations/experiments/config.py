"""The ``experiment`` config section (``conf/experiment/*.yaml``) as a typed, validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.config import dataclass_from_mapping, defaults_from_conf

# Each module registers its procedures (simulations/experiments/procedures.py); a new one is imported here.
from simulations.experiments import reference_rows, standard  # noqa: F401
from simulations.experiments.paired import PairedIntervalConfig
from simulations.experiments.procedures import Procedure, procedure
from simulations.experiments.two_stage import TwoStageConfig
from simulations.experiments.variants import SETTINGS, load_variant


@dataclass(frozen=True)
@defaults_from_conf("experiments.yaml", "experiment.generator_quality")
class GeneratorQualityConfig:
    """``experiment.generator_quality``: generated patches per class compared with real ones."""

    enabled: bool
    samples_per_class: int


def variant_procedure(variant: str) -> Procedure:
    """The registered procedure variant ``variant`` names; ``ValueError`` naming its file otherwise."""
    try:
        return procedure(load_variant(variant).procedure)
    except KeyError as error:
        raise ValueError(f"variant {variant!r} (conf/variants/{variant}.yaml): {error.args[0]}") from error


@dataclass(frozen=True)
@defaults_from_conf("experiments.yaml", "experiment")
class ExperimentConfig:
    """Which (variant, setting, seed) runs, with what budget, and how often they are evaluated."""

    name: str
    variants: tuple[str, ...]
    settings: tuple[str, ...]
    setting_variants: dict[str, list[str]]  # setting -> the variants it runs (of variants)
    seeds: tuple[int, ...]
    steps: int  # local steps per hospital, every variant alike (split over rounds when federated)
    eval_every: int  # steps between evaluation points of the curves
    rounds: int  # federated rounds (steps must be a multiple)
    threads: int | None  # torch CPU threads per run (null: torch's default; 1 with several workers)
    workers: int  # runs of the centralized and local settings trained side by side, one process each
    training_seed_offset: int  # added to the seed of initial weights and batch order only (data unchanged)
    last_evaluations: int  # the privacy table's mean over each run's last this many evaluation points
    two_stage: TwoStageConfig
    generator_quality: GeneratorQualityConfig
    paired_interval: PairedIntervalConfig  # the report's per-seed intervals against plain

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
        if isinstance(self.last_evaluations, bool) or not isinstance(self.last_evaluations, int) or self.last_evaluations < 1:
            raise ValueError(f"last_evaluations must be an integer >= 1, got {self.last_evaluations!r}")
        federated = {v: variant_procedure(v) for v in self.variants_for("federated")} if "federated" in self.settings else {}
        not_federated = [v for v, proc in federated.items() if not proc.federated]
        if not_federated:
            kinds = sorted({federated[v].name for v in not_federated})
            raise ValueError(f"{not_federated} (procedure {', '.join(kinds)}: reference rows and two-stage runs) have "
                             "no federated form: they run in the centralized and local settings only (leave them out "
                             "of experiment.setting_variants.federated)")
        if self.training_seed_offset and "federated" in self.settings:
            raise ValueError("training_seed_offset applies to the centralized and local settings only (a federated "
                             "simulation seeds its hospitals from the run's seed)")
        if not self.jobs():
            raise ValueError(f"no run to do: experiment.setting_variants leaves none of the variants {list(self.variants)} "
                             f"in the settings {list(self.settings)} (it lists {self.setting_variants}); add them there "
                             f"(e.g. experiment.setting_variants.{self.settings[0]}=[{','.join(self.variants)}])")
        if "federated" in self.settings and (self.rounds < 1 or self.steps % self.rounds):
            raise ValueError(f"steps ({self.steps}) must be a multiple of rounds ({self.rounds}) for the federated setting")

    def variants_for(self, setting: str) -> list[str]:
        """The variants that run in ``setting``: ``variants``, or those of them its ``setting_variants`` lists."""
        if setting not in self.setting_variants:
            return list(self.variants)
        return [v for v in self.variants if v in self.setting_variants[setting]]

    def settings_left_empty(self) -> list[str]:
        """The settings ``setting_variants`` leaves without any of ``variants`` (they run nothing)."""
        return [s for s in self.settings if not self.variants_for(s)]

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
        variant_procedure(name)  # an unknown procedure fails here, naming the variant's file
    return cfg
