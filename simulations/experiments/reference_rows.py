"""Reference rows of an experiment table: what a user would try instead of the ViT.

Both learn from exactly the labelled training patches the ViT variants get (the same seed fixes
the same hospitals, labels and validation patches) and are scored on the same held-out patches:

- ``logistic_regression``: scikit-learn's multinomial logistic regression on raw pixels at the
  model's image size (scaled to [0, 1]); the floor a user reaches in a minute.
- ``small_cnn``: timm's ResNet-18, trained from scratch as a plain classifier with the plain
  baseline's optimiser, schedule, batch size, label-safe augmentation and step budget.

They run in the centralized and local settings (a federated reference would be a method of its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.data.base import PatchDataset, PatchSubset
from common.data.sites import SiteData
from common.run_config import RunConfig
from common.seeds import batch_seed, site_seed
from common.train import TrainConfig
from common.train.augment import diff_augment
from common.train.config import learning_rate_factor
from common.train.streams import training_batches
from simulations.experiments.inprocess import CurvePoint, Predictions, evaluate_point, pooled_scores
from simulations.experiments.procedures import Job, JobResult, Procedure, register_procedure


class PlainClassifier(nn.Module):
    """A timm image classifier behind the ``classify`` call the evaluation code uses."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


def labelled_part(dataset: PatchDataset) -> PatchDataset:
    """The labelled patches of a training set (unlabelled ones carry label -1)."""
    rows = np.flatnonzero(np.asarray(dataset.labels) >= 0)
    if rows.size == 0:
        raise ValueError("a reference row needs labelled training patches; this hospital has none")
    return PatchSubset(dataset, rows)


def _pixels(dataset: PatchDataset) -> tuple[np.ndarray, np.ndarray]:
    """Every patch as a flat row of pixels in [0, 1], and its label."""
    images = np.stack([dataset.load_uint8(i) for i in range(len(dataset))]).reshape(len(dataset), -1)
    return images.astype(np.float32) / 255.0, np.asarray(dataset.labels, dtype=np.int64)


def train_logistic_regression(sites: Sequence[SiteData], seed: int) -> tuple[dict[str, Any], list[CurvePoint], float]:
    """Fit one logistic regression per site on its labelled pixels; pooled test metrics, curve, seconds."""
    from sklearn.linear_model import LogisticRegression

    def scored(model: LogisticRegression, dataset: PatchDataset, num_classes: int) -> Predictions:
        pixels, labels = _pixels(dataset)
        keep = labels >= 0
        probs = np.zeros((int(keep.sum()), num_classes))
        probs[:, model.classes_] = model.predict_proba(pixels[keep])  # a class without labels gets 0
        return Predictions(labels[keep], probs)

    tests, vals, seconds = [], [], 0.0
    for k, site in enumerate(sites):
        x, y = _pixels(labelled_part(site.train))
        started = time.perf_counter()
        model = LogisticRegression(max_iter=2000, random_state=site_seed(seed, k)).fit(x, y)
        seconds += time.perf_counter() - started
        tests.append(scored(model, site.test, site.train.num_classes))
        if site.val is not None:
            vals.append(scored(model, site.val, site.train.num_classes))
    metrics = pooled_scores(tests, vals)
    curve = [CurvePoint(0, seconds, metrics["val_balanced_accuracy"], metrics["balanced_accuracy"])]
    return metrics, curve, seconds


def build_small_cnn(num_classes: int, seed: int) -> PlainClassifier:
    """ResNet-18 from scratch (no weights are ever downloaded), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PlainClassifier(timm.create_model("resnet18", pretrained=False, num_classes=num_classes))


def train_small_cnn(config: RunConfig, sites: Sequence[SiteData], steps: int, eval_every: int, seed: int,
                    on_point: Callable[[CurvePoint], None] | None = None
                    ) -> tuple[dict[str, Any], list[CurvePoint], float]:
    """Train one ResNet-18 per site on its labelled patches for ``steps`` steps (the run's plain
    optimiser settings, batch size, schedule and label-safe augmentation); pooled test metrics,
    curve and training seconds."""
    cfg: TrainConfig = config.train
    device = torch.device(config.device)
    models, optimizers, streams, rngs = [], [], [], []
    for k, site in enumerate(sites):
        model = build_small_cnn(site.train.num_classes, site_seed(seed, k)).to(device)
        models.append(model)
        optimizers.append(torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr_discriminator,
                                            betas=cfg.optim.trunk_betas,
                                            weight_decay=cfg.optim.discriminator_weight_decay))
        streams.append(training_batches(labelled_part(site.train), cfg, batch_seed(seed, k)))
        rngs.append(torch.Generator().manual_seed(site_seed(seed, k)))
    curve: list[CurvePoint] = []
    seconds, done = 0.0, 0
    while done < steps:
        chunk = min(eval_every, steps - done)
        started = time.perf_counter()
        for model, optimizer, stream, rng in zip(models, optimizers, streams, rngs):
            model.train()
            for step in range(done, done + chunk):
                for group in optimizer.param_groups:
                    group["lr"] = cfg.optim.lr_discriminator * learning_rate_factor(cfg.optim, step)
                images, labels = next(stream)
                keep = labels >= 0
                images = diff_augment(images[keep].to(device), cfg.classifier_augment, rng)
                loss = F.cross_entropy(model.classify(images), labels[keep].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        seconds += time.perf_counter() - started
        done += chunk
        point = evaluate_point(sites, models, done, seconds)  # type: ignore[arg-type]
        curve.append(point)
        if on_point is not None:
            on_point(point)
    from simulations.experiments.inprocess import final_metrics

    return final_metrics(sites, models), curve, seconds  # type: ignore[arg-type]


def run_logistic_regression(job: Job) -> JobResult:
    """The ``logistic_regression`` reference row (centralized and local only)."""
    metrics, curve, seconds = train_logistic_regression(job.eval_sites, job.seed)
    return JobResult(metrics, curve, seconds, job.eval_sites)


def run_small_cnn(job: Job) -> JobResult:
    """The ``small_cnn`` reference row (centralized and local only)."""
    exp = job.experiment
    metrics, curve, seconds = train_small_cnn(job.config, job.eval_sites, exp.steps, exp.eval_every, job.seed, job.show)
    return JobResult(metrics, curve, seconds, job.eval_sites)


register_procedure(Procedure("logistic_regression", run=run_logistic_regression, reference=True))
register_procedure(Procedure("small_cnn", run=run_small_cnn, reference=True))
