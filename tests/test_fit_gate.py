"""train.fit_gate: the GAN's signals reach the classifier as it fits its labelled patches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from common.model import build_model
from common.privacy.budget import private_train_config
from common.privacy.config import PrivacyConfig
from common.train import LocalTrainer, TrainConfig
from common.train.adversarial_scale import AdversarialTrunkConfig
from common.train.fit_gate import FitGate, FitGateConfig
from common.train.selection import SelectionConfig


def test_the_share_opens_as_the_real_label_loss_falls_below_its_part_of_chance() -> None:
    gate = FitGate(FitGateConfig(threshold=0.25, momentum=0.0), num_classes=10)  # no averaging
    chance = math.log(10)
    assert gate.share == 0.0  # a fresh classifier is at chance: closed
    gate.observe(0.5 * chance)
    assert gate.share == 0.0  # twice the threshold: still closed
    gate.observe(0.375 * chance)
    assert gate.share == pytest.approx(0.5)  # half-way
    gate.observe(0.25 * chance)
    assert gate.share == pytest.approx(1.0)
    gate.observe(0.01)
    assert gate.share == 1.0  # never above 1
    gate.observe(float("nan"))  # a non-finite loss leaves the average alone
    assert gate.share == 1.0
    restored = FitGate(FitGateConfig(threshold=0.25, momentum=0.0), num_classes=10)
    restored.load_state_dict(gate.state_dict())
    assert restored.average_loss == gate.average_loss and restored.share == 1.0
    old = FitGate(FitGateConfig(threshold=0.25, momentum=0.0), num_classes=10)
    old.load_state_dict({})  # state saved before the gate existed: starts at chance
    assert old.share == 0.0


def test_the_average_moves_by_its_momentum_and_the_gate_is_off_at_zero() -> None:
    gate = FitGate(FitGateConfig(threshold=0.25, momentum=0.9), num_classes=4)
    for _ in range(10):
        gate.observe(0.0)
    assert gate.average_loss == pytest.approx(0.9 ** 10 * math.log(4))
    assert gate.share == pytest.approx(2.0 - 0.9 ** 10 / 0.25)
    off = FitGate(FitGateConfig(threshold=0.0), num_classes=4)
    off.observe(5.0)
    assert off.share == 1.0 and off.average_loss == math.log(4)


@pytest.mark.parametrize("bad", [dict(threshold=-0.1), dict(threshold=1.5), dict(momentum=1.0),
                                 dict(governs="trunk")])
def test_bad_settings_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="fit_gate"):
        FitGateConfig(**bad)


def _trainer(tiny_cfg, threshold: float, governs: str = "generated_and_adversarial", **train) -> LocalTrainer:
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=0, generated_batch_size=4,
                      fit_gate=FitGateConfig(threshold=threshold, governs=governs), **train)
    return LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0)


def test_a_closed_gate_keeps_d_out_of_the_trunk_and_generated_images_from_c(tiny_cfg) -> None:
    every_image = dict(selection=SelectionConfig(mode="all", warmup_steps=0))
    gated, ungated = _trainer(tiny_cfg, 0.25, **every_image), _trainer(tiny_cfg, 0.0, **every_image)
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    closed, open_ = gated.step(images, labels), ungated.step(images, labels)
    assert closed["fit_gate_share"] == 0.0 and "fit_gate_share" not in open_
    assert closed["selected"] == 0.0 and open_["selected"] == 4.0
    assert closed.get("cls_synthetic") is None and open_["cls_synthetic"] > 0
    # the closed gate's step is the step of a model whose trunk D's gradient does not reach and whose
    # classifier no generated image teaches
    without = _trainer(tiny_cfg, 0.0, selection=SelectionConfig(mode="none"),
                       adversarial_trunk=AdversarialTrunkConfig(scale=0.0))
    without.step(images, labels)
    reference = dict(without.model.named_parameters())
    for name, param in gated.model.named_parameters():
        torch.testing.assert_close(param, reference[name], msg=name)
    opened = dict(ungated.model.named_parameters())  # and the open gate's step is not that step
    assert any(not torch.equal(opened[name], param) for name, param in reference.items()
               if name.startswith("discriminator.trunk."))

def test_a_gate_on_generated_images_alone_lets_d_reach_the_trunk(tiny_cfg) -> None:
    gated = _trainer(tiny_cfg, 0.25, governs="generated", selection=SelectionConfig(mode="all", warmup_steps=0))
    without = _trainer(tiny_cfg, 0.0, selection=SelectionConfig(mode="none"))  # D in the trunk, no generated image
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    closed = gated.step(images, labels)
    without.step(images, labels)
    assert closed["fit_gate_share"] == 0.0 and closed["selected"] == 0.0
    reference = dict(without.model.named_parameters())
    for name, param in gated.model.named_parameters():
        torch.testing.assert_close(param, reference[name], msg=name)


def test_the_trainer_averages_its_own_real_label_loss_and_keeps_it_in_local_state(tiny_cfg) -> None:
    trainer = _trainer(tiny_cfg, 0.25)
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    steps = [trainer.step(images, torch.tensor([0, 1, 2, 3])) for _ in range(3)]
    expected = math.log(4)
    for step in steps:
        assert step["fit_gate_share"] == 0.0  # near chance: closed
        expected = 0.9 * expected + 0.1 * step["cls_real"]
    assert trainer.fit_gate.average_loss == pytest.approx(expected)
    fresh = _trainer(tiny_cfg, 0.25)
    fresh.load_state_dict(trainer.state_dict())
    assert fresh.fit_gate.average_loss == pytest.approx(expected)


def test_an_open_gate_scales_the_generated_images_loss_by_its_share(tiny_cfg) -> None:
    every_image = dict(selection=SelectionConfig(mode="all", warmup_steps=0),
                       weighting=dataclasses.replace(TrainConfig().weighting, enabled=False))
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    losses = {}
    for share_loss in (0.25, 0.375):  # average loss as a fraction of ln 4: share 1, then 0.5
        trainer = _trainer(tiny_cfg, 0.25, **every_image)
        trainer.fit_gate.average_loss = share_loss * math.log(4)
        losses[share_loss] = trainer.step(images, labels)
    assert losses[0.25]["fit_gate_share"] == 1.0 and losses[0.375]["fit_gate_share"] == pytest.approx(0.5)
    assert losses[0.375]["cls_synthetic"] == pytest.approx(0.5 * losses[0.25]["cls_synthetic"], rel=1e-5)


def test_dp_turns_the_gate_off() -> None:
    cfg = TrainConfig(batch_size=4, fit_gate=FitGateConfig(threshold=0.25))
    assert private_train_config(cfg, PrivacyConfig(enabled=True, scope="discriminator")).fit_gate.threshold == 0.0
    assert private_train_config(cfg, PrivacyConfig(enabled=True, scope="classifier")).fit_gate.threshold == 0.0
    assert private_train_config(cfg, PrivacyConfig(enabled=False)).fit_gate.threshold == 0.25
