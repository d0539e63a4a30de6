"""The ``two_stage`` baseline: train the conditional GAN, generate and select a set, train a classifier.

The usual way generative augmentation is done, and what the unified model claims to improve on:
  1. for ``gan_fraction`` of the step budget, the unified step trains G, D and the auxiliary
     classifier head with no generated image reaching the classifier (``selection.mode=none``);
  2. G generates ``generated_per_class`` images of every class; the same selection rule the unified
     model uses (confidence of the stage-1 classifier, distance to the real class centroid) keeps some;
  3. a fresh trunk + head (the ``classifier_variant``'s config, the plain baseline by default) trains
     on the real labelled patches plus the kept generated ones for the rest of the budget.
Curve points come from stage 3; their steps and seconds include stage 1. A learning-rate schedule
restarts for each stage and spans that stage's steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.config import defaults_from_conf
from common.data.base import ArrayPatches, ConcatPatches, PatchSubset, tensor_to_uint8
from common.data.sites import SiteData
from common.run_config import run_config
from common.seeds import site_seed
from common.train import LocalTrainer
from simulations.experiments.inprocess import CurvePoint, TrainedSite, train_sites
from simulations.experiments.procedures import Job, JobResult, Procedure, in_process_result, register_procedure
from simulations.experiments.variants import apply_overrides, load_variant


@dataclass(frozen=True)
@defaults_from_conf("experiments.yaml", "experiment.two_stage")
class TwoStageConfig:
    """``experiment.two_stage``."""

    gan_fraction: float
    generated_per_class: int
    classifier_variant: str


@torch.no_grad()
def selected_synthetic_set(trainer: LocalTrainer, per_class: int, seed: int) -> tuple[ArrayPatches, dict[str, float]]:
    """Generate ``per_class`` images of each class and keep those the trainer's selection rule keeps."""
    model = trainer.model
    model.eval()
    rng = torch.Generator().manual_seed(seed)
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    images = torch.cat([model.generate(chunk.to(trainer.device), rng).cpu() for chunk in labels.split(256)])
    kept = []
    for start in range(0, len(labels), 256):
        chunk, y = images[start:start + 256].to(trainer.device), labels[start:start + 256]
        trunk = model.trunk(chunk)
        probs = F.softmax(model.classifier(trunk), dim=1)
        kept.append(trainer.selector.select(trunk.features, probs, y, max(trainer.global_step, trainer.cfg.selection.warmup_steps)))
    model.train()
    keep = torch.cat(kept)
    rates = {name: float(keep[labels == c].float().mean()) for c, name in enumerate(trainer.class_names)}
    return ArrayPatches(tensor_to_uint8(images[keep]), labels[keep].numpy(), trainer.class_names), rates


def train_two_stage(run: dict[str, Any], sites: Sequence[SiteData], steps: int, eval_every: int, seed: int,
                    cfg: TwoStageConfig, on_point: Callable[[CurvePoint], None] | None = None
                    ) -> tuple[list[TrainedSite], dict[str, Any]]:
    """Stages 1-3 for every site; returns stage 3's trained sites and what stages 1-2 did."""
    gan_steps = int(round(steps * cfg.gan_fraction))
    if not 0 < gan_steps < steps:
        raise ValueError(f"experiment.two_stage.gan_fraction={cfg.gan_fraction} leaves no steps for one of the stages")
    gan_run = apply_overrides(run, ["train.selection.mode=none", "train.pseudo_label.mode=none",
                                    f"train.optim.schedule_steps={gan_steps}"], "two_stage stage 1")
    stage_one = train_sites(run_config(gan_run), sites, gan_steps, gan_steps, seed)
    gan_seconds = sum(t.seconds for t in stage_one)
    augmented, info = [], {"gan_steps": gan_steps, "gan_seconds": gan_seconds, "kept": [], "acceptance": []}
    for k, (site, trained) in enumerate(zip(sites, stage_one)):
        synthetic, rates = selected_synthetic_set(trained.trainer, cfg.generated_per_class, site_seed(seed, k))
        labelled = PatchSubset(site.train, np.flatnonzero(site.train.labels >= 0))
        parts = [labelled, synthetic] if len(synthetic) else [labelled]
        augmented.append(SiteData(site.name, ConcatPatches(parts), site.test, site.val))
        info["kept"].append(len(synthetic))
        info["acceptance"].append(rates)
    classifier_run = apply_overrides(run, [*load_variant(cfg.classifier_variant).overrides,
                                           f"train.optim.schedule_steps={steps - gan_steps}"], "two_stage stage 3")

    def shifted(point: CurvePoint) -> None:
        point.step += gan_steps
        point.seconds += gan_seconds
        if on_point is not None:
            on_point(point)

    stage_three = train_sites(run_config(classifier_run), augmented, steps - gan_steps, eval_every, seed, on_point=shifted)
    stage_three[0].seconds += gan_seconds
    return stage_three, info



def run_two_stage(job: Job) -> JobResult:
    """The ``two_stage`` procedure (centralized and local only)."""
    exp, eval_sites = job.experiment, job.eval_sites
    trained, info = train_two_stage(job.run, eval_sites, exp.steps, exp.eval_every, job.seed, exp.two_stage,
                                    on_point=job.show)
    return in_process_result(eval_sites, trained, {"two_stage": info})


register_procedure(Procedure("two_stage", run=run_two_stage))
