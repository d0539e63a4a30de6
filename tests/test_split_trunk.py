"""train.optim.trunk_update=split: C's losses and D's adversarial loss move the trunk through optimisers of their own."""

from __future__ import annotations

import pytest
import torch

from common.model import build_model
from common.train import LocalTrainer, TrainConfig
from common.train.config import OptimConfig


def _trainer(tiny_cfg, update: str, **optim) -> LocalTrainer:
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=0, generated_batch_size=4,
                      optim=OptimConfig(trunk_update=update, **optim))
    return LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0)


def _batch(tiny_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size, generator=torch.Generator().manual_seed(3))
    return images * 2 - 1, torch.tensor([0, 1, 2, 3])


def test_split_steps_the_trunk_with_both_optimisers_and_keeps_both_in_local_state(tiny_cfg) -> None:
    trainer = _trainer(tiny_cfg, "split")
    before = {n: p.detach().clone() for n, p in trainer.model.discriminator.trunk.named_parameters()}
    trainer.step(*_batch(tiny_cfg))
    moved = [n for n, p in trainer.model.discriminator.trunk.named_parameters() if not torch.equal(p, before[n])]
    assert moved
    state = trainer.state_dict()
    assert any(k.startswith("opt_trunk_classifier.") for k in state)  # C's moments on the trunk
    assert any(k.startswith("opt_discriminator.") for k in state)  # D's moments on the trunk and heads
    fresh = _trainer(tiny_cfg, "split")
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        if key.startswith("opt_trunk_classifier."):
            torch.testing.assert_close(value, state[key], msg=key)


def test_without_the_adversarial_learning_rate_only_c_moves_the_trunk(tiny_cfg) -> None:
    # D's optimiser at lr 0: whatever moves the trunk came through C's own optimiser, from C's losses alone.
    split = _trainer(tiny_cfg, "split", lr_discriminator=0.0)
    reference = build_model(tiny_cfg, 4, seed=0)
    images, labels = _batch(tiny_cfg)
    split.step(images, labels)
    assert not torch.equal(split.model.discriminator.adv_head.weight, torch.zeros(0))
    torch.testing.assert_close(split.model.discriminator.adv_head.weight, reference.discriminator.adv_head.weight)
    assert any(not torch.equal(a, b) for a, b in zip(split.model.discriminator.trunk.parameters(),
                                                      reference.discriminator.trunk.parameters()))


def test_joint_keeps_no_trunk_classifier_optimiser(tiny_cfg) -> None:
    trainer = _trainer(tiny_cfg, "joint")
    trainer.step(*_batch(tiny_cfg))
    assert trainer.opt_trunk_classifier is None
    assert not any(k.startswith("opt_trunk_classifier.") for k in trainer.state_dict())


def test_split_is_refused_with_same_pass_and_unknown_values_are_refused(tiny_cfg) -> None:
    with pytest.raises(ValueError, match="trunk_update"):
        OptimConfig(trunk_update="both")
    cfg = TrainConfig(generator_update="same_pass", optim=OptimConfig(trunk_update="split"))
    with pytest.raises(ValueError, match="split"):
        LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0)
