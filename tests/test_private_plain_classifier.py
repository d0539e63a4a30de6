"""DP-SGD for the plain classifier (train.method=supervised): what each scope lets learn, what is
counted, and a method without a private step refused before anything is released."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.config import ConfigError, compose_config, plain_config
from common.model import ModelConfig, build_model
from common.privacy.accounting import build_plan
from common.privacy.budget import private_train_config
from common.privacy.config import PrivacyConfig, check_private_method
from common.privacy.report import _coverage
from common.privacy.wiring import DPTraining
from common.run_config import run_config
from common.train import LocalTrainer, TrainConfig


def _trainer(tiny_cfg: ModelConfig, scope: str, sigma: float = 1.0, clip: float = 0.5, method: str = "supervised",
             freeze_trunk: bool = False) -> tuple[LocalTrainer, DPTraining]:
    model = build_model(tiny_cfg, 4, seed=0)
    pcfg = PrivacyConfig(enabled=True, scope=scope, noise_multiplier=sigma, max_grad_norm=clip,
                         freeze_trunk=freeze_trunk)
    plan = build_plan(pcfg, num_examples=40, num_labelled=20, batch_size=4, steps_per_round=3, planned_rounds=1)
    dp = DPTraining(model, plan, seed=1)
    cfg = private_train_config(dataclasses.replace(TrainConfig(batch_size=4), method=method), pcfg)
    return LocalTrainer(model, cfg, seed=0, privacy=dp), dp


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(5, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, -1, 3, 2])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("scope", ["classifier", "discriminator"])
def test_a_private_supervised_step_counts_one_dp_step_and_never_touches_the_generator(tiny_cfg: ModelConfig,
                                                                                       scope: str) -> None:
    trainer, dp = _trainer(tiny_cfg, scope)
    model = trainer.model
    generator, head, trunk = (_snapshot(m) for m in (model.generator, model.classifier, model.discriminator.trunk))
    real, labels = _batch()
    for _ in range(2):
        step = trainer.step(real, labels)
    assert dp.steps_total == 2 and trainer.global_step == 2
    assert dp.history == [(1.0, dp.plan.sample_rate, 2)]
    assert _changed(generator, model.generator) == set()
    assert _changed(head, model.classifier)  # the head learns in both scopes
    assert _changed(trunk, model.discriminator.trunk)  # the trunk too (privately only in scope=discriminator)
    assert "selected" in step and not any(k.startswith("adv") for k in step)


def test_scope_discriminator_moves_the_trunk_only_through_the_private_gradient(tiny_cfg: ModelConfig) -> None:
    """With clipping at a tiny norm and no noise, every parameter's step is bounded by the clipped sum:
    nothing reaches the trunk outside the clipped per-sample gradients. In scope=classifier the trunk
    learns from the unclipped loss, so the same tiny norm does not hold it back."""
    moved = {}
    for scope in ("classifier", "discriminator"):
        trainer, dp = _trainer(tiny_cfg, scope, sigma=1.0, clip=1e-6)
        dp.plan = dataclasses.replace(dp.plan, noise_multiplier=0.0)
        dp.noise.std = 0.0
        trunk = _snapshot(trainer.model.discriminator.trunk)
        grads: list[float] = []
        real, labels = _batch()
        trainer.zero_discriminator_grads()
        original = trainer.step_discriminator

        def record(weights_learned: bool, _original=original, _grads=grads, _trainer=trainer) -> None:  # noqa: ANN001
            trunk_params = _trainer.model.discriminator.trunk.parameters()
            _grads.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in trunk_params if p.grad is not None))))
            _original(weights_learned=weights_learned)

        trainer.step_discriminator = record  # type: ignore[method-assign]
        trainer.step(real, labels)
        moved[scope] = grads[0]
        assert _changed(trunk, trainer.model.discriminator.trunk) or scope == "discriminator"
    assert moved["discriminator"] <= 1e-6 * 5 / 4 * (1 + 1e-3)  # <= (sum of clipped norms) / B
    assert moved["classifier"] > 1e-3


@pytest.mark.parametrize("method", ["supervised", "unified"])
def test_a_frozen_trunk_never_moves_and_the_noise_covers_the_heads_alone(tiny_cfg: ModelConfig, method: str) -> None:
    trainer, dp = _trainer(tiny_cfg, "discriminator", method=method, freeze_trunk=True)
    model = trainer.model
    trunk, head = _snapshot(model.discriminator.trunk), _snapshot(model.classifier)
    real, labels = _batch()
    for _ in range(2):
        trainer.step(real, labels)
    assert dp.steps_total == 2
    assert _changed(trunk, model.discriminator.trunk) == set()
    assert _changed(head, model.classifier)
    assert dp.names and not any(n.startswith("discriminator.trunk.") for n in dp.names)
    covered = sum(p.numel() for n, p in dp.adapter.named_parameters() if n in dp.names)
    assert covered < sum(p.numel() for p in model.discriminator.trunk.parameters()) / 10
    # The same hospital's model under a plan without the switch trains its trunk privately again.
    _, again = _trainer(tiny_cfg, "discriminator")
    assert any(n.startswith("discriminator.trunk.") for n in again.names)


def test_a_frozen_trunk_is_refused_outside_the_end_to_end_scope_and_said_in_the_report() -> None:
    with pytest.raises(ValueError, match="freeze_trunk needs scope=discriminator"):
        PrivacyConfig(enabled=True, scope="classifier", freeze_trunk=True)
    frozen = _coverage(PrivacyConfig(enabled=True, scope="discriminator", freeze_trunk=True))
    trained = _coverage(PrivacyConfig(enabled=True, scope="discriminator"))
    assert frozen["covered"]["discriminator"].startswith("the trunk is frozen at its initial weights")
    assert "frozen" not in trained["covered"]["discriminator"]
    assert frozen["end_to_end_guarantee"] and frozen["covered_groups"] == trained["covered_groups"]


def test_a_method_without_a_private_step_is_refused_at_start_and_at_the_hospital() -> None:
    check_private_method("supervised", PrivacyConfig(enabled=True))
    check_private_method("semi_supervised", PrivacyConfig(enabled=False))
    with pytest.raises(ConfigError, match=r"train\.method=semi_supervised: DP-SGD is implemented for train\.method "
                                          r"unified and supervised only"):
        check_private_method("semi_supervised", PrivacyConfig(enabled=True))
    run = plain_config(compose_config(["train.method=semi_supervised", "privacy.enabled=true"]))
    with pytest.raises(ConfigError, match="semi_supervised"):
        run_config(run)  # what the coordinator builds once, before any round
    assert run_config(plain_config(compose_config(["train.method=supervised", "privacy.enabled=true"])))
