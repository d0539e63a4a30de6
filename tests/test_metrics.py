"""Classifier metrics against hand-computed values, pooled metrics from hospitals' evaluation
summaries against the metrics of the pooled predictions, and the sample grid file."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from common.evaluation import (
    EvaluationSummary,
    class_grid,
    classification_metrics,
    pooled_metrics,
    save_generator_grid,
    summarise_predictions,
    summary_metrics,
)
from common.evaluation.metrics import binary_auroc, score_bins
from common.model import build_model


def test_metrics_on_a_hand_worked_example() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([
        [0.8, 0.1, 0.1],  # 0 -> 0
        [0.6, 0.3, 0.1],  # 0 -> 0
        [0.2, 0.7, 0.1],  # 0 -> 1
        [0.1, 0.8, 0.1],  # 1 -> 1
        [0.5, 0.4, 0.1],  # 1 -> 0
        [0.1, 0.1, 0.8],  # 2 -> 2
    ])
    m = classification_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1 per class: 0: tp2 fp1 fn1 -> 2/3; 1: tp1 fp1 fn1 -> 1/2; 2: 1.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # AUROC class 0: positives .8 .6 .2 vs negatives .1 .5 .1 -> pairs won 3+3+2 of 9 = 8/9.
    # class 1: positives .8 .4 vs .1 .3 .7 .1 -> 4 + 3 = 7 of 8; class 2: 1.
    assert m["auroc"] == pytest.approx((8 / 9 + 7 / 8 + 1) / 3)


def test_auroc_counts_ties_as_half() -> None:
    assert binary_auroc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    assert math.isnan(binary_auroc(np.array([0.1, 0.2]), np.array([True, True])))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(np.array([0, 3]), np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics(np.array([0, 1]), np.ones(2))


def test_sample_grid_is_a_png_with_one_row_per_class(tmp_path, tiny_cfg) -> None:
    model = build_model(tiny_cfg, num_classes=3, seed=0)
    path = save_generator_grid(model, ["a", "b", "c"], tmp_path / "grid.png", per_class=4)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    with pytest.raises(ValueError, match="classes=2"):
        class_grid(np.zeros((3, 2, 8, 8, 3), np.uint8), ["a", "b"], tmp_path / "x.png")


def test_row_r_of_a_sample_grid_holds_images_generated_for_class_r(tmp_path, tiny_cfg, monkeypatch) -> None:
    """A generator whose image is a flat grey level set by the class: each grid row must be its class."""
    model = build_model(tiny_cfg, num_classes=3, seed=0)

    def generate(labels, generator=None):  # noqa: ANN001, ANN202 - stands in for UnifiedViTGAN.generate
        level = labels.float().view(-1, 1, 1, 1) / 2.0 * 2.0 - 1.0  # class 0 -> -1, 1 -> 0, 2 -> +1
        return level.expand(-1, 3, 32, 32).clone()

    monkeypatch.setattr(model, "generate", generate)
    captured = {}
    import common.evaluation.grids as grids

    monkeypatch.setattr(grids, "class_grid", lambda images, names, path, title="": captured.setdefault("images", images))
    save_generator_grid(model, ["a", "b", "c"], tmp_path / "grid.png", per_class=4)
    images = captured["images"]
    assert images.shape == (3, 4, 32, 32, 3)
    for row, expected in enumerate((0, 128, 255)):
        assert np.all(np.abs(images[row].astype(int) - expected) <= 1), row


def _site(rng: np.random.Generator, counts: list[int], skill: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ``counts`` per class and probabilities that favour the true class by ``skill``."""
    labels = np.repeat(np.arange(len(counts)), counts)
    logits = rng.normal(size=(len(labels), len(counts))) + skill * np.eye(len(counts))[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


def test_pooled_metrics_equal_the_metrics_of_the_pooled_predictions_under_label_skew() -> None:
    rng = np.random.default_rng(0)
    sites = [_site(rng, [90, 10, 0, 5], 2.0), _site(rng, [0, 40, 0, 0], 1.0),  # the second has one class
             _site(rng, [3, 0, 60, 20], 0.5)]
    bins = 1000
    summaries = [summarise_predictions(labels, probs, bins) for labels, probs in sites]
    pooled = pooled_metrics(summaries)
    labels = np.concatenate([s[0] for s in sites])
    probs = np.concatenate([s[1] for s in sites])
    exact = classification_metrics(labels, probs)
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert pooled[name] == pytest.approx(exact[name], rel=1e-12), name
    assert pooled["examples"] == len(labels)
    # AUROC: exactly the rank AUROC of the probabilities rounded down to their bins ...
    binned = score_bins(probs, bins).astype(np.float64)
    present = np.unique(labels)
    assert pooled["auroc"] == pytest.approx(np.mean([binary_auroc(binned[:, c], labels == c) for c in present]),
                                            rel=1e-12)
    # ... and within the binning's resolution of the exact AUROC.
    assert abs(pooled["auroc"] - exact["auroc"]) < 1e-4
    # The single-class site alone has no AUROC, yet its patches count in the pooled one.
    assert math.isnan(summary_metrics(summaries[1])["auroc"])
    assert summary_metrics(summaries[1])["balanced_accuracy"] == pytest.approx(
        classification_metrics(*sites[1])["balanced_accuracy"])


def test_pooled_balanced_accuracy_is_not_the_mean_of_the_sites() -> None:
    # Site A: 90 class-0 patches right, 10 class-1 wrong; site B: 10 class-1 right.
    a = EvaluationSummary(np.array([[90, 0], [10, 0]]), np.zeros((2, 4), np.int64), np.zeros((2, 4), np.int64))
    b = EvaluationSummary(np.array([[0, 0], [0, 10]]), np.zeros((2, 4), np.int64), np.zeros((2, 4), np.int64))
    per_site = [summary_metrics(a)["balanced_accuracy"], summary_metrics(b)["balanced_accuracy"]]
    assert per_site == [0.5, 1.0]  # weighted by examples: (100 * 0.5 + 10 * 1.0) / 110 = 0.545
    assert pooled_metrics([a, b])["balanced_accuracy"] == pytest.approx(0.75)
    assert pooled_metrics([a, b])["accuracy"] == pytest.approx(100 / 110)


def test_summaries_of_different_shapes_are_not_pooled() -> None:
    a = summarise_predictions(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), 10)
    b = summarise_predictions(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), 20)
    with pytest.raises(ValueError, match="cannot pool"):
        pooled_metrics([a, b])
    assert a.positive_scores[0].tolist() == [0] * 9 + [1] and a.negative_scores[0, 2] == 1
