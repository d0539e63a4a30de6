"""The hospital's validation gate on pseudo-labels (common/train/gate.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from common.config import compose_config, plain_config
from common.model import build_model
from common.train import LocalTrainer, TrainConfig
from common.train.config import train_config
from common.train.gate import PseudoLabelGateConfig, gate_reading
from common.train.selection import SelectionConfig


def test_the_reading_counts_only_confident_labelled_patches() -> None:
    labels = np.array([0, 1, 1, 2, -1])
    probs = np.array([[0.96, 0.02, 0.02],    # kept, right
                      [0.97, 0.02, 0.01],    # kept, wrong
                      [0.10, 0.80, 0.10],    # below the threshold
                      [0.00, 0.01, 0.99],    # kept, right
                      [0.99, 0.00, 0.01]])   # unlabelled: never counted
    reading = gate_reading(labels, probs, 0.95, step=7)
    assert (reading.kept, reading.correct, reading.patches, reading.step) == (3, 2, 4, 7)
    assert reading.precision == pytest.approx(2 / 3)
    assert math.isnan(gate_reading(labels, probs, 1.0, 0).precision)


def test_bad_gate_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_precision"):
        PseudoLabelGateConfig(min_precision=1.5)
    with pytest.raises(ValueError, match="check_every"):
        PseudoLabelGateConfig(check_every=0)
    with pytest.raises(ValueError, match="governs"):
        PseudoLabelGateConfig(governs="everything")
    with pytest.raises(ValueError, match="streams=separate"):
        TrainConfig(streams="mixed", pseudo_label_gate=PseudoLabelGateConfig(governs="unlabelled"))


def _trainer(tiny_cfg, validation, min_precision: float, governs: str = "pseudo_labels") -> LocalTrainer:
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=4, generated_batch_size=4, local_steps=3,
                      pseudo_label=SelectionConfig(mode="rule", warmup_steps=0, confidence_threshold=0.0,
                                                   centroid_distance=False),
                      pseudo_label_gate=PseudoLabelGateConfig(enabled=True, min_precision=min_precision,
                                                              min_accepted=1, check_every=2, governs=governs))
    return LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0, validation=validation)


def _batches(tiny_cfg):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, tiny_cfg.image_size, tiny_cfg.image_size, generator=g) * 2 - 1
    return [(images, torch.tensor([0, 1, 2, 3, -1, -1, -1, -1]))]


def _validation(tiny_cfg, trainer: LocalTrainer, right: bool) -> TensorDataset:
    """Validation patches labelled with the model's own predictions (right) or a different class (wrong)."""
    images = torch.rand(6, 3, tiny_cfg.image_size, tiny_cfg.image_size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    trainer.model.eval()
    with torch.no_grad():
        predicted = trainer.model.classify(images).argmax(dim=1)
    trainer.model.train()
    return TensorDataset(images, predicted if right else (predicted + 1) % 4)


@pytest.mark.parametrize("right", [True, False])
def test_pseudo_labels_teach_only_while_the_validation_precision_holds(tiny_cfg, right: bool) -> None:
    probe = _trainer(tiny_cfg, None, 0.9)
    validation = _validation(tiny_cfg, probe, right)
    trainer = _trainer(tiny_cfg, validation, 0.9)
    metrics = trainer.train_round(_batches(tiny_cfg), 1)  # one step: no weight has moved since the labels were made
    assert metrics.gate["gate/kept"] == 6.0  # threshold 0: every validation patch is kept
    assert metrics.gate["gate/precision"] == (1.0 if right else 0.0)
    assert metrics.gate["gate/open_fraction"] == (1.0 if right else 0.0)
    assert (metrics.pseudo_labelled > 0) == right  # a closed gate: no unlabelled patch got a pseudo-label


def test_without_validation_patches_the_gate_stays_closed(tiny_cfg) -> None:
    trainer = _trainer(tiny_cfg, None, 0.0)
    metrics = trainer.train_round(_batches(tiny_cfg), 3)
    assert metrics.gate == {"gate/open_fraction": 0.0} and metrics.pseudo_labelled == 0


def test_the_gate_checks_every_check_every_steps(tiny_cfg) -> None:
    probe = _trainer(tiny_cfg, None, 0.9)
    trainer = _trainer(tiny_cfg, _validation(tiny_cfg, probe, True), 0.0)
    checks: list[int] = []
    original = trainer.gate.check
    trainer.gate.check = lambda model, step: (checks.append(step), original(model, step))[1]
    trainer.train_round(_batches(tiny_cfg), 5)
    trainer.train_round(_batches(tiny_cfg), 1)
    assert checks == [0, 2, 4, 5]  # every 2 steps, and at the start of every round


def test_the_shipped_defaults_gate_fixmatch_style_pseudo_labels() -> None:
    cfg = train_config(plain_config(compose_config([]))["train"])
    assert cfg.pseudo_label_gate == PseudoLabelGateConfig(enabled=True)
    assert cfg.pseudo_label.enabled and not cfg.pseudo_label.centroid_distance
    assert cfg.pseudo_label.loss_over == "candidates" and cfg.pseudo_label.confidence_threshold == 0.95


@pytest.mark.parametrize("governs", ["pseudo_labels", "unlabelled"])
@pytest.mark.parametrize("right", [True, False])
def test_a_closed_gate_governing_the_unlabelled_patches_keeps_them_from_d(tiny_cfg, governs: str, right: bool) -> None:
    probe = _trainer(tiny_cfg, None, 0.9)
    trainer = _trainer(tiny_cfg, _validation(tiny_cfg, probe, right), 0.9, governs)
    seen: list[list[int]] = []
    discriminate = trainer.model.discriminate
    trainer.model.discriminate = lambda images, labels, *args: (  # type: ignore[method-assign]
        seen.append(labels.tolist()), discriminate(images, labels, *args))[1]
    metrics = trainer.train_round(_batches(tiny_cfg), 1)
    assert metrics.gate["gate/open_fraction"] == (1.0 if right else 0.0)
    real_rows = seen[0][: len(seen[0]) - 4]  # D/C's pass: the real rows, then the 4 generated images
    withheld = governs == "unlabelled" and not right
    assert real_rows == ([0, 1, 2, 3] if withheld else [0, 1, 2, 3, -1, -1, -1, -1])
