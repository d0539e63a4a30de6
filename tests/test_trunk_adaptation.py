"""The frozen trunk adapted on the generator's images (train.trunk_adaptation): it moves alike at every
hospital holding the same global model, the head centre follows it, nothing else changes, it is refused
where the trunk is not frozen under DP, it spends no budget, and the report and the reference costs say so."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import dataclass_from_mapping
from common.data.synthetic import CLASS_NAMES
from common.model import ModelConfig, build_model
from common.model.unified import UnifiedViTGAN
from common.privacy.accounting import build_plan
from common.privacy.budget import private_train_config
from common.privacy.config import PrivacyConfig
from common.privacy.ledger import CENTRE, PrivacyLedger
from common.privacy.reference_cost import Recipe
from common.privacy.report import FROZEN_TRUNK, _coverage
from common.privacy.wiring import DPTraining
from common.train import LocalTrainer, TrainConfig
from common.train.trunk_adaptation import TrunkAdaptationConfig, adapt_trunk
from common.train.whitening import free_images
from tests.test_privacy_federation import K, _run

FEW = TrunkAdaptationConfig(steps=3, batch_size=8, images=16, learning_rate=1e-3, weight_decay=0.05, temperature=0.2,
                            seed=0)


def _model(tiny_cfg: ModelConfig, seed: int = 0) -> UnifiedViTGAN:
    return build_model(dataclasses.replace(tiny_cfg, classifier_centre=True, classifier_grid=1), 3, seed=seed)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def _mean_inputs(model: UnifiedViTGAN, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model.classifier.inputs(model.discriminator.trunk(images)).double().mean(0)


def test_every_hospital_holding_the_same_model_adapts_the_same_trunk_and_only_the_trunk(tiny_cfg: ModelConfig) -> None:
    model, other = _model(tiny_cfg), _model(tiny_cfg)
    trunk, rest = _state(model.discriminator.trunk), {k: v for k, v in _state(model).items()
                                                      if not k.startswith("discriminator.trunk.")}
    adapt_trunk(model, FEW)
    adapt_trunk(other, FEW)
    moved = _state(model.discriminator.trunk)
    assert max(float((moved[k] - trunk[k]).abs().max()) for k in trunk) > 1e-4
    assert all(torch.equal(moved[k], v) for k, v in _state(other.discriminator.trunk).items())
    # the generator, the heads and the (unset) centre are untouched
    after = _state(model)
    assert all(torch.equal(after[k], v) for k, v in rest.items())
    # another public seed, another trunk
    third = _model(tiny_cfg)
    adapt_trunk(third, dataclasses.replace(FEW, seed=1))
    assert not torch.equal(_state(third.discriminator.trunk)["cls_token"], moved["cls_token"])


def test_a_released_centre_moves_with_the_generated_images_mean_feature(tiny_cfg: ModelConfig) -> None:
    model = _model(tiny_cfg)
    head = model.classifier
    with torch.no_grad():
        head.input_centre.copy_(torch.linspace(-1, 1, len(head.input_centre)))
        head.centre_ready.fill_(1.0)
    centre = head.input_centre.clone()
    images = free_images(model, "generator", FEW.images, torch.Generator().manual_seed(FEW.seed))
    before = _mean_inputs(model, images)
    adapt_trunk(model, FEW)
    shift = _mean_inputs(model, images) - before
    assert float(shift.norm()) > 1e-4
    assert torch.allclose(head.input_centre.double(), centre.double() + shift, atol=1e-5)


def test_the_section_refuses_values_it_cannot_use(tiny_cfg: ModelConfig) -> None:
    assert not TrunkAdaptationConfig().enabled  # off by default
    for key, value in (("steps", -1), ("batch_size", 1), ("images", 1), ("learning_rate", 0.0), ("temperature", 0.0)):
        with pytest.raises(ValueError, match=f"train.trunk_adaptation.{key}"):
            dataclasses.replace(FEW, **{key: value})
    with pytest.raises(ValueError, match="nothing to adapt"):
        adapt_trunk(_model(tiny_cfg), TrunkAdaptationConfig())


def _private_trainer(model: UnifiedViTGAN, freeze_trunk: bool, method: str = "unified") -> LocalTrainer:
    pcfg = PrivacyConfig(enabled=True, scope="discriminator", noise_multiplier=1.0, freeze_trunk=freeze_trunk)
    plan = build_plan(pcfg, num_examples=40, num_labelled=20, batch_size=4, steps_per_round=3, planned_rounds=1)
    dp = DPTraining(model, plan, seed=1)
    cfg = private_train_config(dataclasses.replace(TrainConfig(batch_size=4), method=method, trunk_adaptation=FEW), pcfg)
    return LocalTrainer(model, cfg, seed=0, privacy=dp)


def test_a_trainer_adapts_only_a_trunk_dp_sgd_keeps_frozen(tiny_cfg: ModelConfig) -> None:
    model = _model(tiny_cfg)
    trunk = _state(model.discriminator.trunk)
    trainer = _private_trainer(model, freeze_trunk=True)
    assert trainer.adaptation_loss is not None
    assert not torch.equal(_state(model.discriminator.trunk)["cls_token"], trunk["cls_token"])
    assert not any(p.requires_grad for p in model.discriminator.trunk.parameters())  # still frozen for DP-SGD
    with pytest.raises(ValueError, match="needs DP-SGD with a frozen trunk"):
        _private_trainer(_model(tiny_cfg), freeze_trunk=False)
    with pytest.raises(ValueError, match="needs DP-SGD with a frozen trunk"):
        LocalTrainer(_model(tiny_cfg), dataclasses.replace(TrainConfig(batch_size=4), trunk_adaptation=FEW))
    with pytest.raises(ValueError, match="trains the generator"):
        _private_trainer(_model(tiny_cfg), freeze_trunk=True, method="supervised")


def test_a_private_run_adapts_its_trunk_each_round_at_no_cost_to_the_budget(tmp_path: Path) -> None:
    _run(tmp_path, ["federation.num_sites=2", "federation.rounds=2", "privacy.noise_multiplier=3.0",
                    "model.classifier_centre=true", "model.classifier_grid=1", "privacy.scope=discriminator",
                    "privacy.freeze_trunk=true", "train.trunk_adaptation.steps=3", "train.trunk_adaptation.batch_size=8",
                    "train.trunk_adaptation.images=16", "train.trunk_adaptation.learning_rate=1e-3"])
    for site in ("site-0", "site-1"):
        (attempts,) = PrivacyLedger.in_folder(tmp_path / "sites" / site).load().attempts.values()
        # the releases of a centred run and nothing else: the adaptation reads no patch
        assert [(a.kind, a.round, a.steps) for a in attempts] == [
            ("counts", 1, 1), (CENTRE, 1, 1), ("sgd", 1, K), ("sgd", 2, K)]
    # Both hospitals adapted the round-1 global model alike, so the round-2 global trunk and centre are
    # that model adapted once more (DP-SGD never reaches the frozen trunk).
    run = json.loads((tmp_path / "checkpoints" / "run_config.json").read_text())
    model = build_model(dataclass_from_mapping(ModelConfig, run["model"], "model"), len(CLASS_NAMES), seed=0)
    model.load_state_dict(load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors")))
    first = _state(model.discriminator.trunk)
    adapt_trunk(model, dataclass_from_mapping(TrunkAdaptationConfig, run["train"]["trunk_adaptation"],
                                              "train.trunk_adaptation"))
    final = load_file(str(tmp_path / "checkpoints" / "round-0002.safetensors"))
    for key, value in _state(model.discriminator.trunk).items():
        assert torch.allclose(final[f"discriminator.trunk.{key}"], value, atol=1e-5), key
    assert max(float((final[f"discriminator.trunk.{k}"] - v).abs().max()) for k, v in first.items()) > 1e-4
    assert torch.allclose(final["classifier.input_centre"], model.classifier.input_centre, atol=1e-4)
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())
    text = report["sites"]["site-0"]["covered"]["discriminator"]
    assert "train.trunk_adaptation" in text and "adds no epsilon" in text


def test_the_report_and_the_recipe_tell_an_adapted_trunk_from_a_frozen_one() -> None:
    pcfg = PrivacyConfig(enabled=True, scope="discriminator", freeze_trunk=True)
    assert _coverage(pcfg, {})["covered"]["discriminator"] == FROZEN_TRUNK
    adapted = _coverage(pcfg, {"train": {"trunk_adaptation": {"steps": 30}}})["covered"]["discriminator"]
    assert adapted != FROZEN_TRUNK and "received global generator" in adapted
    run = {"privacy": {"scope": "discriminator", "freeze_trunk": True}, "model": {"trunk_prior": "p"},
           "train": {"method": "unified", "trunk_adaptation": {"steps": 30}}}
    recipe = Recipe.of_run(run)
    assert recipe.trunk_adaptation == 30 and "30 SimCLR steps" in recipe.describe()
    assert Recipe.of_run({**run, "train": {"method": "unified"}}).trunk_adaptation == 0
    assert recipe != Recipe.of_run({**run, "train": {"method": "unified"}})
