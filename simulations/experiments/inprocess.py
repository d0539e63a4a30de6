"""Training one model in this process, with evaluation points along the way (the curves).

Used by the ``centralized`` setting (one hospital holding every hospital's patches) and the
``local`` setting (each hospital alone). The step is the same ``LocalTrainer`` step a hospital runs
in a federation, so a variant means the same thing in every setting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.data.base import PatchDataset
from common.data.sites import SiteData
from common.evaluation.metrics import classification_metrics, predict_probabilities
from common.model import UnifiedViTGAN, initial_model
from common.run_config import RunConfig
from common.seeds import batch_seed, site_seed
from common.train import LocalTrainer
from common.train.streams import training_batches

EVAL_BATCH = 256


@dataclass
class Predictions:
    """Labels and class probabilities of one model on one held-out set."""

    labels: np.ndarray
    probs: np.ndarray

    @staticmethod
    def pooled(parts: Sequence[Predictions]) -> Predictions:
        return Predictions(np.concatenate([p.labels for p in parts]), np.concatenate([p.probs for p in parts]))

    def metrics(self) -> dict[str, float]:
        return classification_metrics(self.labels, self.probs)


def predict(model: UnifiedViTGAN, dataset: PatchDataset, device: torch.device | str = "cpu") -> Predictions:
    """The model's class probabilities on every labelled patch of ``dataset``."""
    labels, probs = predict_probabilities(model, DataLoader(dataset, batch_size=EVAL_BATCH), device)
    keep = labels >= 0
    return Predictions(labels[keep], probs[keep])


@dataclass
class CurvePoint:
    """Held-out metrics after ``step`` local steps and ``seconds`` of training (evaluation excluded)."""

    step: int
    seconds: float
    val: float | None  # balanced accuracy on the validation split (None without one)
    test: float  # balanced accuracy on the test split

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": round(self.seconds, 3), "val_balanced_accuracy": self.val,
                "test_balanced_accuracy": self.test}


@dataclass
class TrainedSite:
    """One in-process training run: the trained trainer, its training log, its curve."""

    trainer: LocalTrainer
    seconds: float
    curve: list[CurvePoint] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)


def build_trainer(config: RunConfig, site: SiteData, seed: int) -> LocalTrainer:
    """A fresh model and trainer for ``config``'s model and train sections (weights seeded by ``seed``)."""
    model = initial_model(config.model, len(site.class_names), seed=seed)
    return LocalTrainer(model, config.train, seed=seed, class_names=site.class_names, device=config.device,
                        validation=site.val, labelled_examples=site.labelled_examples)


def train_sites(
    config: RunConfig,
    sites: Sequence[SiteData],
    steps: int,
    eval_every: int,
    seed: int,
    on_point: Callable[[CurvePoint], None] | None = None,
) -> list[TrainedSite]:
    """Train one model per site for ``steps`` steps, evaluating every ``eval_every`` steps.

    With several sites (the ``local`` setting) the models train side by side in chunks of
    ``eval_every`` steps, and each curve point pools every site's predictions on its own held-out
    patches; its ``seconds`` is the training time of all sites together on this machine.
    """
    trainers = [build_trainer(config, site, site_seed(seed, k)) for k, site in enumerate(sites)]
    batches = [training_batches(site.train, t.cfg, batch_seed(seed, k)) for k, (site, t) in enumerate(zip(sites, trainers))]
    trained = [TrainedSite(t, 0.0) for t in trainers]
    done = 0
    while done < steps:
        chunk = min(eval_every, steps - done)
        for entry, stream in zip(trained, batches):
            metrics = entry.trainer.train_round(stream, chunk)
            entry.seconds += metrics.seconds
            entry.rounds.append(metrics.as_flat_dict())
        done += chunk
        point = evaluate_point(sites, [t.trainer.model for t in trained], done, sum(t.seconds for t in trained))
        trained[0].curve.append(point)
        if on_point is not None:
            on_point(point)
    return trained


def evaluate_point(sites: Sequence[SiteData], models: Sequence[UnifiedViTGAN], step: int, seconds: float) -> CurvePoint:
    """Pooled validation and test balanced accuracy of each site's model on its own patches."""
    device = next(models[0].parameters()).device
    test = Predictions.pooled([predict(m, s.test, device) for m, s in zip(models, sites)])
    vals = [predict(m, s.val, device) for m, s in zip(models, sites) if s.val is not None]
    val = Predictions.pooled(vals).metrics()["balanced_accuracy"] if vals else None
    return CurvePoint(step, seconds, val, test.metrics()["balanced_accuracy"])


def final_metrics(sites: Sequence[SiteData], models: Sequence[UnifiedViTGAN]) -> dict[str, Any]:
    """Test metrics (pooled over sites), validation balanced accuracy and the pooled test predictions
    (under ``TEST_PREDICTIONS``), for results.json and predictions/."""
    device = next(models[0].parameters()).device
    return pooled_scores([predict(m, s.test, device) for m, s in zip(models, sites)],
                         [predict(m, s.val, device) for m, s in zip(models, sites) if s.val is not None])


#: The key of ``final_metrics``'s pooled test predictions: ``{"labels": [...], "predicted": [...]}``,
#: in the same patch order for every variant of a (setting, seed), so two variants can be paired.
TEST_PREDICTIONS = "test_predictions"


def pooled_scores(tests: Sequence[Predictions], vals: Sequence[Predictions]) -> dict[str, Any]:
    """The metrics of per-site test and validation predictions: test metrics pooled over sites, the
    validation balanced accuracy (None without validation patches) and the pooled test predictions."""
    test = Predictions.pooled(tests)
    metrics: dict[str, Any] = dict(test.metrics())
    metrics["val_balanced_accuracy"] = Predictions.pooled(list(vals)).metrics()["balanced_accuracy"] if vals else None
    metrics[TEST_PREDICTIONS] = {"labels": test.labels.astype(int).tolist(),
                                 "predicted": test.probs.argmax(axis=1).astype(int).tolist()}
    return metrics
