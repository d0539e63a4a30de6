"""A one-hospital run learns, and its local state saves and restores exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.data.synthetic import SyntheticHistology
from common.evaluation import evaluate_classifier
from common.model import ModelConfig, build_model
from common.train import LocalTrainer, TrainConfig
from common.train.selection import SelectionConfig

CHANCE = 1.0 / 5
#: Balanced accuracy a 5-class tiny model must reach after 300 local steps on held-out patches
#: (chance is 0.2). Measured 0.7-0.8 when written; an engine that stops learning fails it.
THRESHOLD = 0.5


def _loader(ds: SyntheticHistology, seed: int, batch: int = 32) -> DataLoader:
    return DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def test_one_hospital_learns_clearly_better_than_chance(tiny_cfg: ModelConfig) -> None:
    train = SyntheticHistology(1500, 32, site=0, split="train", seed=11)
    test = SyntheticHistology(500, 32, site=0, split="test", seed=11)
    model = build_model(tiny_cfg, train.num_classes, seed=0)
    trainer = LocalTrainer(model, TrainConfig(), seed=0, class_names=train.class_names)
    metrics = trainer.train_round(_loader(train, 0), steps=300)
    result = evaluate_classifier(model, DataLoader(test, batch_size=250))
    assert result["balanced_accuracy"] > THRESHOLD > 2 * CHANCE, result
    assert result["auroc"] > 0.8, result
    flat = metrics.as_flat_dict()
    assert flat["steps"] == 300 and flat["images_per_second"] > 0
    assert all(np.isfinite(v) for v in flat.values())
    assert set(metrics.loss_weights) == {"cls_real", "cls_synthetic", "cls_pseudo"}  # pseudo-labels on by default
    # The warm-up (100 steps) has passed, so selection has been tried for every class.
    assert set(metrics.acceptance) == set(train.class_names)
    assert metrics.global_step == 300


def test_local_state_restores_exactly_across_a_fresh_trainer(tiny_cfg: ModelConfig) -> None:
    """2 rounds in one trainer == 1 round, save, new model+trainer from the saved state, 1 round."""
    cfg = TrainConfig(batch_size=8, selection=SelectionConfig(warmup_steps=2, min_history=2))
    data = SyntheticHistology(64, 32, seed=5)

    def loader(round_index: int) -> DataLoader:
        return _loader(data, seed=100 + round_index, batch=8)

    model_a = build_model(tiny_cfg, 5, seed=1)
    trainer_a = LocalTrainer(model_a, cfg, seed=3)
    trainer_a.train_round(loader(0), steps=4)
    saved_model = {k: v.clone() for k, v in model_a.state_dict().items()}
    saved_local = trainer_a.state_dict()
    trainer_a.train_round(loader(1), steps=4)

    model_b = build_model(tiny_cfg, 5, seed=99)
    model_b.load_state_dict(saved_model)
    trainer_b = LocalTrainer(model_b, cfg, seed=12345)
    trainer_b.load_state_dict(saved_local)
    trainer_b.train_round(loader(1), steps=4)

    assert not any(k.startswith(("generator.", "discriminator.", "classifier.")) for k in saved_local)
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert trainer_b.global_step == trainer_a.global_step == 8
    torch.testing.assert_close(trainer_b.weighting.log_vars, trainer_a.weighting.log_vars, rtol=0, atol=0)


def test_unlabelled_real_images_train_the_gan_but_not_the_classifier_loss(tiny_cfg: ModelConfig) -> None:
    model = build_model(tiny_cfg, 5, seed=0)
    trainer = LocalTrainer(model, TrainConfig(), seed=0)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    result = trainer.unified_step(images, torch.full((8,), -1, dtype=torch.long))
    assert "cls_real" not in result and np.isfinite(result["adv_discriminator"])


def test_the_real_label_loss_keeps_weight_one_while_it_is_large(tiny_cfg: ModelConfig) -> None:
    """Early on the real cross-entropy is ~ln 5 > 1: the paper's weighting lowers its weight, the
    default anchor (weighting.anchor=cls_real) keeps it at 1 and learns only the other losses' weights."""
    data = SyntheticHistology(64, 32, seed=5)
    weights = {}
    for anchor in ("cls_real", None):
        cfg = TrainConfig(batch_size=8)
        cfg = dataclasses.replace(cfg, weighting=dataclasses.replace(cfg.weighting, anchor=anchor))
        trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=1), cfg, seed=3)
        metrics = trainer.train_round(_loader(data, seed=7, batch=8), steps=4)
        assert metrics.losses["cls_real"] > 1.0
        weights[anchor] = metrics.loss_weights["cls_real"]
    assert TrainConfig().weighting.anchor == "cls_real"
    assert weights["cls_real"] == 1.0
    assert weights[None] < 0.99
