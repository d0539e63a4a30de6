"""Classifier metrics: accuracy, balanced accuracy, macro-F1 and one-vs-rest AUROC.

The one place these figures are computed; clients, server and scripts all call ``classification_metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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
