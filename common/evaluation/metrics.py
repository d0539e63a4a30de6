"""Classifier metrics: accuracy, balanced accuracy, macro-F1 and one-vs-rest AUROC.

``classification_metrics`` computes them from predictions. A hospital that evaluates for the
federation sends an ``EvaluationSummary`` instead: its confusion matrix and, per class, histograms
of that class's predicted probability over fixed bins for the patches of the class and for the
others (no single patch's prediction leaves the hospital). Summaries add up across hospitals, and
``summary_metrics`` turns the pooled summary into the metrics of the pooled predictions: exactly for
accuracy, balanced accuracy and macro-F1, and for AUROC exactly as if every probability were
rounded down to its bin (``score_bins`` bins over [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from common.model import UnifiedViTGAN

METRIC_NAMES: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties averaged."""
    n_pos = int(positive.sum())
    n_neg = int(len(positive) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    start = 0
    while start < len(scores):  # average ranks over runs of equal scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Metrics of predicted class probabilities ``probs`` (N, C) against integer ``labels`` (N,).

    Balanced accuracy and macro-F1 average over the classes present in ``labels``; AUROC is the
    macro mean of one-vs-rest AUROCs over those classes (NaN with fewer than two present).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, C) with N = {len(labels)}, got {probs.shape}")
    if len(labels) == 0:
        raise ValueError("no examples to evaluate")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got [{labels.min()}, {labels.max()}]")
    preds = probs.argmax(axis=1)
    present = np.unique(labels)
    recalls, f1s, aurocs = [], [], []
    for c in present:
        true_c, pred_c = labels == c, preds == c
        tp = float(np.sum(true_c & pred_c))
        recalls.append(tp / true_c.sum())
        denominator = true_c.sum() + pred_c.sum()
        f1s.append(2.0 * tp / denominator if denominator else 0.0)
        aurocs.append(binary_auroc(probs[:, c], true_c))
    return {
        "accuracy": float(np.mean(preds == labels)),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)),
        "auroc": float(np.mean(aurocs)) if len(present) > 1 else math.nan,
    }


@dataclass(frozen=True)
class EvaluationSummary:
    """What a hospital's held-out evaluation sends: counts only, no single patch's prediction.

    ``confusion[t, p]``: patches of true class t predicted as p. ``positive_scores[c, b]``: patches
    of class c whose probability of c falls in bin b; ``negative_scores[c, b]``: the same for the
    patches of every other class. Bin b of B covers ``[b / B, (b + 1) / B)`` (the last one includes 1).
    """

    confusion: np.ndarray
    positive_scores: np.ndarray
    negative_scores: np.ndarray

    def __post_init__(self) -> None:
        classes = self.confusion.shape[0]
        if self.confusion.shape != (classes, classes) or classes < 1:
            raise ValueError(f"confusion matrix must be square, got shape {self.confusion.shape}")
        for name in ("positive_scores", "negative_scores"):
            shape = getattr(self, name).shape
            if len(shape) != 2 or shape[0] != classes or shape[1] < 1:
                raise ValueError(f"{name} must be ({classes}, bins), got shape {shape}")
        if self.positive_scores.shape != self.negative_scores.shape:
            raise ValueError("positive and negative score histograms differ in shape")

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def bins(self) -> int:
        return int(self.positive_scores.shape[1])

    @property
    def examples(self) -> int:
        return int(self.confusion.sum())

    def __add__(self, other: EvaluationSummary) -> EvaluationSummary:
        if other.confusion.shape != self.confusion.shape or other.positive_scores.shape != self.positive_scores.shape:
            raise ValueError(f"cannot pool summaries of {self.num_classes} classes x {self.bins} bins and "
                             f"{other.num_classes} classes x {other.bins} bins")
        return EvaluationSummary(self.confusion + other.confusion, self.positive_scores + other.positive_scores,
                                 self.negative_scores + other.negative_scores)


def score_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """The bin index of each probability in [0, 1] among ``bins`` equal bins."""
    return np.clip(np.floor(np.asarray(scores, dtype=np.float64) * bins), 0, bins - 1).astype(np.int64)


def summarise_predictions(labels: np.ndarray, probs: np.ndarray, bins: int) -> EvaluationSummary:
    """The ``EvaluationSummary`` of predicted probabilities ``probs`` (N, C) for ``labels`` (N,)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, C) with N = {len(labels)}, got {probs.shape}")
    if bins < 1:
        raise ValueError(f"score bins must be >= 1, got {bins}")
    classes = probs.shape[1]
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{labels.min()}, {labels.max()}]")
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, probs.argmax(axis=1)), 1)
    positive = np.zeros((classes, bins), dtype=np.int64)
    negative = np.zeros((classes, bins), dtype=np.int64)
    for c in range(classes):
        index = score_bins(probs[:, c], bins)
        mine = labels == c
        positive[c] = np.bincount(index[mine], minlength=bins)
        negative[c] = np.bincount(index[~mine], minlength=bins)
    return EvaluationSummary(confusion, positive, negative)


def histogram_auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUROC from binned scores: P(positive's bin > negative's bin) + half the ties (NaN if a side is empty)."""
    positive = np.asarray(positive, dtype=np.float64)
    negative = np.asarray(negative, dtype=np.float64)
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = np.cumsum(negative) - negative
    return float(np.sum(positive * (below + 0.5 * negative)) / (n_pos * n_neg))


def summary_metrics(summary: EvaluationSummary) -> dict[str, float]:
    """``classification_metrics`` of the predictions a (pooled) summary counts, plus ``examples``.

    Balanced accuracy and macro-F1 average over the classes present; AUROC is the macro mean of
    the binned one-vs-rest AUROCs of those classes (NaN with fewer than two present).
    """
    confusion = summary.confusion.astype(np.float64)
    total = confusion.sum()
    if total <= 0:
        raise ValueError("no examples to evaluate")
    hits = np.diag(confusion)
    actual, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = np.flatnonzero(actual > 0)
    recalls = hits[present] / actual[present]
    denominators = actual[present] + predicted[present]
    f1s = np.where(denominators > 0, 2.0 * hits[present] / np.maximum(denominators, 1.0), 0.0)
    aurocs = [histogram_auroc(summary.positive_scores[c], summary.negative_scores[c]) for c in present]
    return {
        "accuracy": float(hits.sum() / total),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)),
        "auroc": float(np.mean(aurocs)) if len(present) > 1 else math.nan,
        "examples": float(total),
    }


def pooled_metrics(summaries: Iterable[EvaluationSummary]) -> dict[str, float]:
    """The metrics of all hospitals' held-out patches together (their summaries added up)."""
    summaries = list(summaries)
    if not summaries:
        raise ValueError("no evaluation summaries to pool")
    pooled = summaries[0]
    for summary in summaries[1:]:
        pooled = pooled + summary
    return summary_metrics(pooled)


@torch.no_grad()
def predict_probabilities(
    model: UnifiedViTGAN, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities of the deployed classifier over ``batches``; returns (labels, probs)."""
    was_training = model.training
    model.eval()
    all_labels, all_probs = [], []
    try:
        for images, labels in batches:
            all_probs.append(torch.softmax(model.classify(images.to(device)), dim=1).float().cpu().numpy())
            all_labels.append(labels.cpu().numpy())
    finally:
        model.train(was_training)
    if not all_labels:
        raise ValueError("evaluation data loader yielded no batch")
    return np.concatenate(all_labels), np.concatenate(all_probs)


def evaluate_classifier(
    model: UnifiedViTGAN, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """``classification_metrics`` of the model's classifier on labelled ``batches``, plus ``examples``."""
    labels, probs = predict_probabilities(model, batches, device)
    keep = labels >= 0
    metrics = classification_metrics(labels[keep], probs[keep])
    metrics["examples"] = float(keep.sum())
    return metrics
