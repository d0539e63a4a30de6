"""train.adversarial_trunk: how much of D's adversarial gradient reaches the shared trunk."""

from __future__ import annotations

import math

import pytest
import torch

from common.model import build_model
from common.train import LocalTrainer, TrainConfig
from common.train.adversarial_scale import AdversarialTrunkConfig, AdversarialTrunkScale, ramp_up
from common.train.config import OptimConfig


def _grads(tiny_cfg, scale: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Gradients of sum(D's score) w.r.t. the trunk and to psi/E, at ``scale``, same model and batch."""
    model = build_model(tiny_cfg, 4, seed=0)
    images = torch.randn(6, 3, tiny_cfg.image_size, tiny_cfg.image_size, generator=torch.Generator().manual_seed(1))
    out = model.discriminate(images, torch.tensor([0, 1, 2, 3, -1, -1]), trunk_gradient_scale=scale)
    (out.score.sum() + 0.0 * out.logits.sum()).backward()
    trunk = {n: p.grad.clone() for n, p in model.discriminator.trunk.named_parameters() if p.grad is not None}
    heads = {n: p.grad.clone() for n, p in model.discriminator.named_parameters()
             if not n.startswith("trunk.") and p.grad is not None}
    return trunk, heads


def test_the_scale_multiplies_the_trunks_adversarial_gradient_and_leaves_the_heads_alone(tiny_cfg) -> None:
    full_trunk, full_heads = _grads(tiny_cfg, 1.0)
    part_trunk, part_heads = _grads(tiny_cfg, 0.25)
    none_trunk, none_heads = _grads(tiny_cfg, 0.0)
    assert full_trunk and any(g.abs().sum() > 0 for g in full_trunk.values())
    for name, grad in full_trunk.items():
        torch.testing.assert_close(part_trunk[name], 0.25 * grad, msg=name)
        assert name not in none_trunk or none_trunk[name].abs().sum() == 0, name
    for heads in (part_heads, none_heads):  # psi and the class projection learn as before
        assert heads.keys() == full_heads.keys() and heads
        for name, grad in full_heads.items():
            torch.testing.assert_close(heads[name], grad, msg=name)


def test_the_forward_pass_does_not_depend_on_the_scale(tiny_cfg) -> None:
    model = build_model(tiny_cfg, 4, seed=0)
    images = torch.randn(3, 3, tiny_cfg.image_size, tiny_cfg.image_size)
    labels = torch.tensor([0, 1, -1])
    with torch.no_grad():
        a, b = model.discriminate(images, labels), model.discriminate(images, labels, trunk_gradient_scale=0.1)
    torch.testing.assert_close(a.score, b.score)
    torch.testing.assert_close(a.logits, b.logits)


def test_adaptive_scale_falls_while_d_wins_and_recovers_when_it_stops() -> None:
    cfg = AdversarialTrunkConfig(scale=1.0, adaptive=True, target=0.6, rate=0.1, min_scale=0.01, momentum=0.0)
    scale = AdversarialTrunkScale(cfg)
    assert scale.value == 1.0
    for _ in range(10):
        scale.observe(torch.ones(8))  # every real patch on D's real side: D wins outright
    assert scale.value == pytest.approx(math.exp(-1.0))
    for _ in range(100):
        scale.observe(torch.ones(8))
    assert scale.value == pytest.approx(0.01)  # bounded below
    for _ in range(5):
        scale.observe(torch.tensor([1.0, -1.0, 1.0, -1.0]))  # signal 0 < target: D no longer wins
    assert scale.value == pytest.approx(0.01 * math.exp(0.5))
    restored = AdversarialTrunkScale(cfg)
    restored.load_state_dict(scale.state_dict())
    assert restored.value == pytest.approx(scale.value) and restored.signal == scale.signal


def test_a_fixed_scale_never_moves() -> None:
    scale = AdversarialTrunkScale(AdversarialTrunkConfig(scale=0.3))
    for _ in range(20):
        scale.observe(torch.ones(4))
    assert scale.value == 0.3


def test_the_trainer_keeps_the_adaptive_scale_in_its_local_state(tiny_cfg) -> None:
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=0, generated_batch_size=4,
                      adversarial_trunk=AdversarialTrunkConfig(adaptive=True, rate=0.05))
    trainer = LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0)
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    for _ in range(3):
        step = trainer.step(images, torch.tensor([0, 1, 2, 3]))
    assert "adversarial_trunk_scale" in step
    state = trainer.state_dict()
    assert float(state["adversarial_scale.log_scale"]) == pytest.approx(math.log(trainer.adversarial_scale.value))
    fresh = LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0)
    fresh.load_state_dict(state)
    assert fresh.adversarial_scale.value == pytest.approx(trainer.adversarial_scale.value)
    assert fresh.adversarial_scale.value < 1.0 or trainer.adversarial_scale.signal <= cfg.adversarial_trunk.target


def test_the_ramp_rises_from_almost_nothing_to_the_scale_and_stays_there() -> None:
    scale = AdversarialTrunkScale(AdversarialTrunkConfig(scale=0.5, ramp_fraction=0.25), schedule_steps=400)
    assert scale.ramp_steps == 100
    values = [scale.at(step) for step in range(0, 120)]
    assert values[0] == pytest.approx(0.5 * math.exp(-5.0))
    assert values[50] == pytest.approx(0.5 * math.exp(-5.0 * 0.25))
    assert all(a < b for a, b in zip(values[:100], values[1:101]))  # rises every step of the ramp
    assert values[100:] == [0.5] * 20
    assert ramp_up(7, 0) == 1.0  # no ramp
    off = AdversarialTrunkScale(AdversarialTrunkConfig(scale=0.5), schedule_steps=400)
    assert off.ramp_steps == 0 and off.at(0) == 0.5


def test_the_trainer_ramps_the_scale_over_the_whole_run_not_each_round(tiny_cfg) -> None:
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=0, generated_batch_size=4, local_steps=2,
                      optim=OptimConfig(schedule_steps=8), adversarial_trunk=AdversarialTrunkConfig(ramp_fraction=0.5))
    trainer = LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0)
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    batches = [(images, torch.tensor([0, 1, 2, 3]))]
    scales = []
    for _ in range(3):  # three rounds of two steps, a fresh trainer state each round as at a hospital
        state = trainer.state_dict()
        trainer = LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0)
        trainer.load_state_dict(state)
        trainer.train_round(batches, progress=lambda i, n, losses: scales.append(losses["adversarial_trunk_scale"]))
    assert scales == pytest.approx([ramp_up(step, 4) for step in range(6)])
    assert scales[:4] == sorted(scales[:4]) and scales[0] < 0.01 and scales[4:] == [1.0, 1.0]


def test_a_ramp_without_a_run_length_is_refused() -> None:
    with pytest.raises(ValueError, match="schedule_steps"):
        AdversarialTrunkScale(AdversarialTrunkConfig(ramp_fraction=0.25), schedule_steps=None)


@pytest.mark.parametrize("bad", [dict(scale=1.5), dict(scale=-0.1), dict(adaptive=True, min_scale=0.0),
                                 dict(target=1.0), dict(momentum=1.0), dict(ramp_fraction=1.5),
                                 dict(ramp_passes=-1.0)])
def test_bad_settings_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="adversarial_trunk"):
        AdversarialTrunkConfig(**bad)


def test_the_ramp_in_passes_is_long_for_many_labels_and_short_for_few() -> None:
    cfg = AdversarialTrunkConfig(ramp_passes=10)
    few = AdversarialTrunkScale(cfg, steps_per_pass=2.0)  # 64 labelled patches, 32 a step
    many = AdversarialTrunkScale(cfg, steps_per_pass=40.0)  # 1,280 labelled patches
    assert few.ramp_pass_steps == 20 and many.ramp_pass_steps == 400
    assert few.at(10) == pytest.approx(math.exp(-5.0 * 0.25)) and few.at(20) == 1.0
    assert many.at(10) == pytest.approx(math.exp(-5.0 * (1 - 10 / 400) ** 2)) and many.at(200) < 0.3
    assert AdversarialTrunkScale(cfg).at(0) == 1.0  # no count of labelled patches: no ramp (and a warning)
    assert not cfg.passes_everything


def test_the_trainer_counts_passes_over_its_own_labelled_patches(tiny_cfg) -> None:
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=0, generated_batch_size=4,
                      adversarial_trunk=AdversarialTrunkConfig(ramp_passes=2))
    trainer = LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0, labelled_examples=16)
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    scales = [trainer.step(images, torch.tensor([0, 1, 2, 3]))["adversarial_trunk_scale"] for _ in range(10)]
    assert scales == pytest.approx([ramp_up(step, 8) for step in range(10)])  # 2 passes of 4 steps



def test_dp_switches_the_passes_ramp_off_instead_of_refusing_the_run() -> None:
    from common.privacy.budget import private_train_config
    from common.privacy.config import PrivacyConfig, check_private_training

    cfg = TrainConfig(batch_size=4, adversarial_trunk=AdversarialTrunkConfig(ramp_passes=50))
    private = PrivacyConfig(enabled=True, scope="discriminator")
    check_private_training(cfg, private)  # accepted
    assert private_train_config(cfg, private).adversarial_trunk.ramp_passes == 0.0
    assert private_train_config(cfg, PrivacyConfig(enabled=False)).adversarial_trunk.ramp_passes == 50
    with pytest.raises(Exception, match="adversarial_trunk"):  # any other setting is still refused
        check_private_training(TrainConfig(batch_size=4, adversarial_trunk=AdversarialTrunkConfig(scale=0.5)), private)
