"""Model shapes, parameter groups, gradient flow and the class projection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.model import GROUPS, ModelConfig, build_model, group_entries, group_of, model_preset, preset_names, split_groups
from common.train import LocalTrainer, TrainConfig


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_generator_and_discriminator_shapes_for_every_preset(preset: str) -> None:
    assert set(preset_names()) >= {"tiny", "small", "base"}
    cfg = model_preset(preset)
    model = build_model(cfg, num_classes=5, seed=0)
    labels = torch.tensor([0, 4])
    images = model.generator(torch.randn(2, cfg.z_dim), labels)
    assert images.shape == (2, 3, cfg.image_size, cfg.image_size)
    assert images.dtype == torch.float32
    assert images.abs().max() <= 1.0
    out = model.discriminate(images, labels)
    assert out.score.shape == (2,) and out.score.dtype == torch.float32
    assert out.logits.shape == (2, 5) and out.logits.dtype == torch.float32
    assert out.features.shape == (2, cfg.embed_dim)
    assert model.classify(images).shape == (2, 5)


def test_preset_sizes_match_the_issue() -> None:
    assert [model_preset(p).image_size for p in ("tiny", "small", "base")] == [32, 64, 96]


def test_every_state_dict_entry_is_in_exactly_one_group(tiny_cfg: ModelConfig) -> None:
    model = build_model(tiny_cfg, num_classes=5)
    state = model.state_dict()
    groups = split_groups(state)
    assert tuple(groups) == GROUPS
    flat = [k for g in GROUPS for k in groups[g]]
    assert sorted(flat) == sorted(state)
    assert len(flat) == len(set(flat))
    for group in GROUPS:
        assert groups[group], f"group {group} is empty"
        assert all(groups[group][k] is state[k] for k in groups[group])
    assert list(group_entries(state, ["generator", "classifier"])) == [*groups["generator"], *groups["classifier"]]
    params = dict(model.named_parameters())
    owners = {name: group_of(name) for name in params}
    assert set(owners.values()) == set(GROUPS)
    with pytest.raises(KeyError, match="belongs to no group"):
        split_groups({**state, "stray.weight": torch.zeros(1)})


def test_classifier_blocks_and_spectral_norm_stay_inside_groups() -> None:
    cfg = dataclasses.replace(model_preset("tiny"), classifier_depth=1, spectral_norm=True)
    model = build_model(cfg, num_classes=3)
    keys = split_groups(model.state_dict())
    assert any(".blocks." in k for k in keys["classifier"])
    assert any("parametrizations" in k for k in keys["discriminator"])
    assert sum(len(v) for v in keys.values()) == len(model.state_dict())


@pytest.mark.parametrize("loss", ["hinge", "non_saturating"])
def test_a_unified_step_sends_gradients_to_every_parameter_of_every_group(tiny_cfg: ModelConfig, loss: str) -> None:
    model = build_model(tiny_cfg, num_classes=5, seed=0)
    trainer = LocalTrainer(model, TrainConfig(adversarial_loss=loss), seed=0)
    # With the hinge loss and every score inside the margin (as at initialisation), the gradient of
    # psi's bias is -1/B * B + 1/B * B = 0 exactly: the one entry allowed a zero gradient there.
    may_be_zero = {"discriminator.adv_head.bias"} if loss == "hinge" else set()
    images = torch.rand(10, 3, 32, 32) * 2 - 1
    labels = torch.arange(10) % 5
    trainer.unified_step(images, labels)
    for group in GROUPS:
        for name, param in model.group_module(group).named_parameters():
            assert param.grad is not None, f"{group}.{name} got no gradient"
            if f"{group}.{name}" not in may_be_zero:
                assert param.grad.abs().sum() > 0, f"{group}.{name} got a zero gradient"
            assert torch.isfinite(param.grad).all(), f"{group}.{name} has a non-finite gradient"


def test_class_projection_changes_the_score_with_the_label(tiny_cfg: ModelConfig) -> None:
    model = build_model(tiny_cfg, num_classes=5, seed=0)
    with torch.no_grad():
        model.discriminator.class_embed.weight.normal_(0, 1)
        images = torch.rand(4, 3, 32, 32) * 2 - 1
        a = model.discriminate(images, torch.zeros(4, dtype=torch.long)).score
        b = model.discriminate(images, torch.full((4,), 3, dtype=torch.long)).score
        unlabelled = model.discriminate(images, torch.full((4,), -1, dtype=torch.long)).score
        features = model.trunk(images).features
    assert not torch.allclose(a, b)
    expected_gap = (features * (model.discriminator.class_embed.weight[0] - model.discriminator.class_embed.weight[3])).sum(-1)
    torch.testing.assert_close(a - b, expected_gap, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unlabelled, model.discriminator.adv_head(features).squeeze(-1))


def test_bad_model_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        dataclasses.replace(model_preset("tiny"), image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(model_preset("tiny"), embed_dim=30, num_heads=4)
