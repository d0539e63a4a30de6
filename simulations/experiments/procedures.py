"""The registry of experiment procedures: how one (variant, setting, seed) job is trained and scored.

A variant file names its procedure (``procedure: <name>``, default ``standard``). A procedure is a
function of a :class:`Job` returning a :class:`JobResult`, registered once by its module::

    register_procedure(Procedure("my_procedure", run=run_my_procedure, federated=False))

``simulations/experiments/config.py`` imports every module that registers one (``standard``,
``two_stage``, and the reference rows ``logistic_regression`` and ``small_cnn``), so an experiment's
variants are checked against all of them before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.data.sites import SiteData, pool_sites
from common.model import UnifiedViTGAN
from common.registry import Registry
from common.run_config import RunConfig
from simulations.experiments.inprocess import CurvePoint, TrainedSite, final_metrics


@dataclass(frozen=True)
class Job:
    """One (variant, setting, seed): its run config (the composed dict a federation sends, and the
    same typed), and its hospitals' data."""

    run: dict[str, Any]
    config: RunConfig
    experiment: Any  # simulations.experiments.config.ExperimentConfig
    setting: str  # centralized | local | federated
    seed: int
    sites: list[SiteData]
    folder: Path  # the federated run's own folder (<experiment folder>/<setting>-<variant>-seed<seed>)
    show: Callable[[CurvePoint], None]

    @property
    def eval_sites(self) -> list[SiteData]:
        """What is trained and scored in this setting: the pooled hospitals (centralized) or each one."""
        return [pool_sites(self.sites)] if self.setting == "centralized" else list(self.sites)


@dataclass
class JobResult:
    """What a procedure reports: pooled test metrics, the curve, training seconds, and what it scored on."""

    metrics: dict[str, Any]  # final_metrics: the test metrics, val_balanced_accuracy, TEST_PREDICTIONS
    curve: list[CurvePoint]
    seconds: float
    eval_sites: Sequence[SiteData]
    #: The trained models per scored site (in-process procedures), for the generator-quality scores.
    models: list[UnifiedViTGAN] = field(default_factory=list)
    #: Extra keys for the job's results.json entry (e.g. epsilon, last_round, two_stage).
    entry: dict[str, Any] = field(default_factory=dict)


def in_process_result(eval_sites: Sequence[SiteData], trained: Sequence[TrainedSite], entry: dict[str, Any]) -> JobResult:
    """The result of sites trained in this process: their models' pooled test metrics, the first
    site's curve, and the training seconds of all of them."""
    models = [t.trainer.model for t in trained]
    return JobResult(final_metrics(eval_sites, models), trained[0].curve, sum(t.seconds for t in trained), eval_sites,
                     models, entry)


@dataclass(frozen=True)
class Procedure:
    """One ``procedure`` a variant can name."""

    name: str
    run: Callable[[Job], JobResult]
    #: It has a federated form (else the federated setting is refused at start).
    federated: bool = False
    #: It trains something other than the ViT (a reference row: never private, no generator).
    reference: bool = False


PROCEDURES: Registry[Procedure] = Registry("procedure")


def register_procedure(proc: Procedure) -> Procedure:
    """Add ``proc`` under its name (a name registered twice is a programming error)."""
    return PROCEDURES.add(proc.name, proc)


def procedure(name: str) -> Procedure:
    """The registered procedure ``name``; ``KeyError`` naming the known ones otherwise."""
    return PROCEDURES[name]


def procedure_names() -> list[str]:
    return sorted(PROCEDURES)
