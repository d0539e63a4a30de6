"""Classifier metrics against hand-computed values, and the sample grid file."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from common.evaluation import class_grid, classification_metrics, save_generator_grid
from common.evaluation.metrics import binary_auroc
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
