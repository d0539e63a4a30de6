"""Separate real streams, the baselines' steps, and what each step may and may not touch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.registry import load_site_data
from common.model import ModelConfig, build_model
from common.train import LocalTrainer, TrainConfig
from common.train.config import SemiSupervisedConfig
from common.train.fit_gate import FitGateConfig
from common.train.gate import PseudoLabelGateConfig
from common.train.selection import SelectionConfig
from common.train.streams import training_batches

DATA = {"name": "synthetic", "root": None, "train_per_site": 120, "test_per_site": 20, "stain_shift": 1.0,
        "labeled_fraction": 1.0, "labeled_per_class": 2, "val_fraction": 0.0, "drop_unlabelled": False}
IID = {"name": "iid"}


def _site(**changes: object):
    return load_site_data({**DATA, **changes}, IID, 0, 1, 32, seed=3)


def test_separate_streams_put_labelled_patches_in_every_batch() -> None:
    site = _site()
    assert (site.train.labels >= 0).sum() == 10 and (site.train.labels < 0).sum() == 110
    batches = training_batches(site.train, TrainConfig(batch_size=4, unlabelled_batch_size=6), seed=0)
    for _ in range(30):
        images, labels = next(batches)
        assert images.shape[0] == 10
        assert (labels[:4] >= 0).all() and (labels[4:] == -1).all()


def test_mixed_stream_is_the_old_single_loader() -> None:
    cfg = TrainConfig(batch_size=8, streams="mixed",
                      pseudo_label_gate=PseudoLabelGateConfig(governs="pseudo_labels"))  # mixed needs it
    batches = training_batches(_site().train, cfg, seed=0)
    without_labels = sum(int((next(batches)[1] >= 0).sum() == 0) for _ in range(30))
    assert without_labels > 0  # with 10 labels among 120 patches, many mixed batches carry none


def test_every_unified_step_has_labelled_patches_in_the_classifier_loss(tiny_cfg: ModelConfig) -> None:
    site = _site()
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=8)
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), cfg, seed=0)
    seen: list[dict[str, float]] = []
    trainer.train_round(training_batches(site.train, cfg, seed=1), steps=6,
                        progress=lambda step, total, losses: seen.append(dict(losses)))
    assert len(seen) == 6 and all("cls_real" in step for step in seen)


def test_plain_baseline_never_touches_the_generator(tiny_cfg: ModelConfig) -> None:
    site = _site()
    cfg = TrainConfig(method="supervised", batch_size=4)
    model = build_model(tiny_cfg, 5, seed=0)
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    calls = []
    model.generator.register_forward_hook(lambda *args: calls.append(1))
    trainer = LocalTrainer(model, cfg, seed=0)
    trunk_before = model.discriminator.trunk.patch_embed.proj.weight.clone()
    trainer.train_round(training_batches(site.train, cfg, seed=1), steps=3)
    assert not calls
    for key, value in model.generator.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.discriminator.trunk.patch_embed.proj.weight, trunk_before)


def test_supervised_stream_draws_no_unlabelled_patch() -> None:
    batches = training_batches(_site().train, TrainConfig(method="supervised", batch_size=4), seed=0)
    assert all((next(batches)[1] >= 0).all() for _ in range(20))


def test_labelled_only_data_never_yields_an_unlabelled_patch() -> None:
    site = _site(drop_unlabelled=True)
    assert len(site.train) == 10 and (site.train.labels >= 0).all()
    batches = training_batches(site.train, TrainConfig(batch_size=4, unlabelled_batch_size=8), seed=0)
    assert all((next(batches)[1] >= 0).all() for _ in range(20))


def test_fixmatch_learns_from_confident_unlabelled_patches_only(tiny_cfg: ModelConfig) -> None:
    site = _site()
    strict = TrainConfig(method="semi_supervised", batch_size=4, unlabelled_batch_size=8,
                         semi_supervised=SemiSupervisedConfig(confidence_threshold=1.0))
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), strict, seed=0)
    result = trainer.step(*next(training_batches(site.train, strict, seed=1)))
    assert result["pseudo_selected"] == 0 and result["cls_pseudo"] == 0.0
    lenient = TrainConfig(method="semi_supervised", batch_size=4, unlabelled_batch_size=8,
                          semi_supervised=SemiSupervisedConfig(confidence_threshold=0.0))
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), lenient, seed=0)
    result = trainer.step(*next(training_batches(site.train, lenient, seed=1)))
    assert result["pseudo_selected"] == 8 and result["cls_pseudo"] > 0


def test_unlabelled_real_patches_give_the_head_no_gradient_while_d_and_g_change(tiny_cfg: ModelConfig) -> None:
    cfg = TrainConfig(selection=SelectionConfig(mode="none"))
    model = build_model(tiny_cfg, 5, seed=0)
    trainer = LocalTrainer(model, cfg, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads: dict[str, bool] = {}
    for name, p in model.classifier.named_parameters():
        p.register_hook(lambda g, name=name: grads.__setitem__(name, bool(g.abs().sum() > 0)))
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    result = trainer.unified_step(images, torch.full((8,), -1, dtype=torch.long))
    assert "cls_real" not in result and np.isfinite(result["adv_discriminator"])
    assert not any(grads.values())  # the head's only gradient would come from a labelled patch
    after = model.state_dict()
    for key, value in after.items():
        changed = not torch.equal(value, before[key])
        if key.startswith("classifier."):
            assert not changed, key
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("discriminator.trunk."))
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("generator."))


def test_selection_accepts_generated_images_after_the_warm_up_and_none_before(tiny_cfg: ModelConfig) -> None:
    site = _site(labeled_per_class=8)
    cfg = TrainConfig(batch_size=16, unlabelled_batch_size=4, selection=SelectionConfig(
        warmup_steps=3, confidence_threshold=0.0, centroid_distance=False),
        fit_gate=FitGateConfig(threshold=0.0))  # the selection rule alone (test_fit_gate covers the gate)
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), cfg, seed=0)
    batches = training_batches(site.train, cfg, seed=1)
    before = trainer.train_round(batches, steps=3)
    assert before.selected_images == 0 and not any(before.acceptance.values())
    after = trainer.train_round(batches, steps=3)
    assert after.selected_images > 0 and after.losses["cls_synthetic"] > 0


def test_pseudo_labels_follow_the_selection_rule(tiny_cfg: ModelConfig) -> None:
    site = _site(labeled_per_class=8)
    rule = SelectionConfig(mode="rule", warmup_steps=0, confidence_threshold=0.0, distance_quantile=1.0, min_history=2)
    cfg = TrainConfig(batch_size=16, unlabelled_batch_size=8, pseudo_label=rule,
                      pseudo_label_gate=PseudoLabelGateConfig(enabled=False))  # the rule alone
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), cfg, seed=0)
    metrics = trainer.train_round(training_batches(site.train, cfg, seed=1), steps=4)
    assert "cls_pseudo" in metrics.losses and metrics.pseudo_labelled > 0
    assert set(metrics.loss_weights) == {"cls_real", "cls_synthetic", "cls_pseudo"}
    never = TrainConfig(batch_size=16, unlabelled_batch_size=8,
                        pseudo_label=SelectionConfig(mode="rule", warmup_steps=0, confidence_threshold=1.0),
                        pseudo_label_gate=PseudoLabelGateConfig(enabled=False))  # the rule alone
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), never, seed=0)
    metrics = trainer.train_round(training_batches(site.train, never, seed=1), steps=2)
    assert metrics.pseudo_labelled == 0 and "cls_pseudo" not in metrics.losses


def test_without_projection_the_score_ignores_the_label(tiny_cfg: ModelConfig) -> None:
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), TrainConfig(class_projection=False), seed=0)
    labels = torch.tensor([0, 1, 2])
    assert (trainer._projected(labels) == -1).all()
    with_projection = LocalTrainer(build_model(tiny_cfg, 5, seed=0), TrainConfig(), seed=0)
    assert torch.equal(with_projection._projected(labels), labels)


def test_methods_and_streams_are_validated() -> None:
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="gan_only")
    with pytest.raises(ValueError, match="streams"):
        TrainConfig(streams="interleaved")
    site = _site(labeled_per_class=0)
    with pytest.raises(ValueError, match="needs labelled patches"):
        training_batches(site.train, TrainConfig(method="supervised"), seed=0)


def test_with_the_classifier_score_unlabelled_patches_reach_the_head(tiny_cfg: ModelConfig) -> None:
    """Semi-supervised GAN: psi is log sum exp of the class logits, so the head learns from unlabelled patches."""
    model = build_model(tiny_cfg, 5, seed=0)
    images, labels = torch.rand(6, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, -1, -1, 2, -1])
    out = model.discriminate(images, labels, classifier_score=True)
    projection = (model.discriminator.class_embed(labels.clamp(min=0)) * out.features).sum(-1) * (labels >= 0)
    torch.testing.assert_close(out.score, torch.logsumexp(out.logits, 1) + projection)
    cfg = TrainConfig(selection=SelectionConfig(mode="none"), classifier_score=True)
    trainer = LocalTrainer(model, cfg, seed=0)
    head = model.classifier.head.weight.clone()
    trainer.unified_step(images, torch.full((6,), -1, dtype=torch.long))
    assert not torch.equal(model.classifier.head.weight, head)


def test_unlabelled_entropy_and_feature_matching_enter_the_losses(tiny_cfg: ModelConfig) -> None:
    images, labels = torch.rand(8, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3, -1, -1, -1, -1])
    plain = LocalTrainer(build_model(tiny_cfg, 5, seed=0), TrainConfig(), seed=0).unified_step(images, labels)
    assert "unlabelled_entropy" not in plain
    # No validation patches: the gate is closed, so it must not withhold the unlabelled patches here.
    ungated = PseudoLabelGateConfig(governs="pseudo_labels")
    cfg = TrainConfig(unlabelled_entropy_weight=0.5, feature_matching_weight=1.0, pseudo_label_gate=ungated)
    with_terms = LocalTrainer(build_model(tiny_cfg, 5, seed=0), cfg, seed=0)
    result = with_terms.unified_step(images, labels)
    assert 0.0 < result["unlabelled_entropy"] <= np.log(5) + 1e-5
    # Same seed, same draws: the generator ends elsewhere only because of the feature-matching term.
    base = LocalTrainer(build_model(tiny_cfg, 5, seed=0),
                        TrainConfig(unlabelled_entropy_weight=0.5, pseudo_label_gate=ungated), seed=0)
    base.unified_step(images, labels)
    g_with = with_terms.model.generator.to_patch.weight
    g_base = base.model.generator.to_patch.weight
    assert not torch.allclose(g_with, g_base)
