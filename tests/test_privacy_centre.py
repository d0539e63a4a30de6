"""The head centre (model.classifier_centre): what the head subtracts, how each hospital releases it
(clipped, noised, in the ledger and the epsilon before its noise is drawn), once per run, and what
the report says."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import protocol
from common.config import ConfigError, compose_config, plain_config
from common.model import ModelConfig, build_model
from common.model.discriminator import TrunkOutput
from common.privacy.accounting import build_plan, epsilon
from common.privacy.budget import BudgetExhausted, SitePrivacy
from common.privacy.centre import centre_entry, centre_pending, centre_radius, clipped_feature_sum, noisy_centre
from common.privacy.config import PrivacyConfig
from common.privacy.ledger import CENTRE, PrivacyLedger
from common.privacy.reference_cost import Recipe, ReferenceCost, nearest_cost
from common.privacy.wiring import DiscriminatorAdapter
from common.run_config import run_config
from tests.test_privacy_federation import COUNT_SIGMA, K, _opacus_epsilon, _run, _train

CENTRED = ["model.classifier_centre=true", "model.classifier_grid=1", "train.method=supervised",
           "privacy.scope=discriminator", "privacy.freeze_trunk=true"]


def test_the_head_subtracts_its_centre_and_a_model_without_the_switch_has_none(tiny_cfg: ModelConfig) -> None:
    plain = build_model(tiny_cfg, 3, seed=0)
    assert not any("centre" in k for k in plain.state_dict())
    model = build_model(dataclasses.replace(tiny_cfg, classifier_centre=True, classifier_grid=1), 3, seed=0)
    head = model.classifier
    assert head.input_centre.shape == (model.cfg.classifier_features,) and centre_pending(model)
    trunk = model.discriminator.trunk(torch.rand(4, 3, 32, 32) * 2 - 1)
    before = head(trunk)
    centre = torch.randn(model.cfg.classifier_features)
    head.input_centre.copy_(centre)
    assert torch.allclose(head(trunk), before - head.head.weight @ centre, atol=1e-5)
    assert torch.allclose(head(TrunkOutput(trunk.tokens, trunk.features)), head.head(head.inputs(trunk) - centre))
    # The discriminator's heads read the CLS feature less the centre's CLS part, on every path.
    images, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        features = model.discriminator.trunk(images).features
        expected = model.discriminator.score(features - centre[: features.shape[1]], labels)
        assert torch.allclose(model.discriminate(images, labels).score, expected, atol=1e-5)
        assert torch.allclose(DiscriminatorAdapter(model)(images, labels)[0], expected, atol=1e-5)
        assert not torch.allclose(model.discriminator.score(features, labels), expected, atol=1e-3)
    with pytest.raises(ValueError, match="classifier_centre needs classifier_depth 0"):
        dataclasses.replace(tiny_cfg, classifier_centre=True, classifier_depth=1)


def test_each_patch_moves_the_released_sum_by_at_most_the_radius(tiny_cfg: ModelConfig) -> None:
    model = build_model(dataclasses.replace(tiny_cfg, classifier_centre=True, classifier_grid=1), 3, seed=0)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    data = torch.utils.data.TensorDataset(images, torch.zeros(6, dtype=torch.long))
    with torch.no_grad():
        norms = model.classifier.inputs(model.discriminator.trunk(images)).norm(dim=1)
    radius = float(norms.min()) / 2  # every patch's vector is clipped
    full = clipped_feature_sum(model, data, radius, batch_size=4)
    for drop in range(6):
        keep = [i for i in range(6) if i != drop]
        without = clipped_feature_sum(model, torch.utils.data.Subset(data, keep), radius)
        assert float((full - without).norm()) == pytest.approx(radius, rel=1e-6)  # sensitivity R, reached
    unclipped = clipped_feature_sum(model, data, float(norms.max()) * 2)
    with torch.no_grad():
        exact = model.classifier.inputs(model.discriminator.trunk(images)).double().sum(dim=0)
    assert torch.allclose(unclipped, exact, atol=1e-4)
    assert centre_radius(PrivacyConfig(), 320) == pytest.approx(math.sqrt(320))
    assert centre_radius(PrivacyConfig(centre_radius=5.0), 320) == 5.0


def test_the_noise_on_the_centre_has_the_configured_std() -> None:
    draws = torch.stack([noisy_centre(torch.zeros(400, dtype=torch.float64), 2.0, 3.0, 10,
                                      torch.Generator().manual_seed(s)) for s in range(50)])
    assert float(draws.std()) == pytest.approx(3.0 * 2.0 / 10, rel=0.05)
    summed = torch.arange(4, dtype=torch.float64)
    assert torch.allclose(noisy_centre(summed, 1.0, 1e-12, 4, torch.Generator()), (summed / 4).float(), atol=1e-9)


def test_target_epsilon_is_met_with_the_centre_release_included() -> None:
    cfg = PrivacyConfig(enabled=True, scope="discriminator", freeze_trunk=True, noise_multiplier=None,
                        target_epsilon=3.0)
    alone = build_plan(cfg, 1000, 1000, 32, 50, 10)
    centred = build_plan(cfg, 1000, 1000, 32, 50, 10, before=(centre_entry(cfg),))
    assert centred.noise_multiplier > alone.noise_multiplier
    total = epsilon([centre_entry(cfg), (centred.noise_multiplier, centred.sample_rate, 500)], centred.delta, "rdp")
    assert 2.97 < total <= 3.0
    assert epsilon([centre_entry(cfg), (alone.noise_multiplier, alone.sample_rate, 500)], alone.delta, "rdp") > 3.0
    # A budget the centre's release alone would spend is refused with the key to change, not searched forever.
    strict = dataclasses.replace(cfg, target_epsilon=1.0)
    with pytest.raises(ConfigError, match=r"before DP-SGD alone .*centre_noise_multiplier=4, where there is one\) cost epsilon"):
        build_plan(strict, 1000, 1000, 32, 50, 10, before=(centre_entry(strict),))
    loose = dataclasses.replace(strict, centre_noise_multiplier=12.0)
    plan = build_plan(loose, 1000, 1000, 32, 50, 10, before=(centre_entry(loose),))
    assert epsilon([centre_entry(loose), (plan.noise_multiplier, plan.sample_rate, 500)], plan.delta, "rdp") <= 1.0


def test_a_centre_the_budget_cannot_pay_for_is_never_released(tmp_path: Path) -> None:
    cfg = PrivacyConfig(enabled=True, scope="discriminator", freeze_trunk=True, noise_multiplier=1.0, max_epsilon=1.0,
                        centre_noise_multiplier=0.5)
    ledger = PrivacyLedger.in_folder(tmp_path)
    privacy = SitePrivacy.open(ledger, "data-key", {"name": "synthetic"}, "run", 1, [])
    privacy.plan = build_plan(cfg, 1000, 1000, 32, 1, 1)
    drawn: list[int] = []
    with pytest.raises(BudgetExhausted):
        privacy.release_centre(centre_entry(cfg), drawn.append)
    assert drawn == [] and ledger.load().attempts == {}
    privacy.plan = dataclasses.replace(privacy.plan, max_epsilon=100.0)
    privacy.release_centre(centre_entry(cfg), drawn.append)
    (attempts,) = ledger.load().attempts.values()
    assert drawn == [1] and [(a.kind, a.steps, a.noise_multiplier, a.sample_rate, a.finished) for a in attempts] == [
        (CENTRE, 1, 0.5, 1.0, True)]
    assert attempts[0].dp_steps == 0


def test_a_centre_on_a_trunk_that_learns_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="classifier_centre=true with privacy.enabled=true needs privacy.freeze_trunk"):
        run_config(plain_config(compose_config(["model.classifier_centre=true", "privacy.enabled=true",
                                                "privacy.scope=discriminator"])))
    run_config(plain_config(compose_config(["model.classifier_centre=true"])))  # without DP it stays zero: allowed


def test_each_hospital_releases_the_centre_once_and_it_is_counted_and_reported(tmp_path: Path) -> None:
    _, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=2", "privacy.noise_multiplier=1.3",
                                 "privacy.centre_noise_multiplier=4.0", *CENTRED])
    for site in ("site-0", "site-1"):
        rounds = _train(summary, site)
        released = rounds[0][protocol.REAL_EXAMPLES]
        q, delta = min(1.0, 8 / released), min(1e-5, 0.1 / released)
        for k, metrics in enumerate(rounds, start=1):
            assert metrics[protocol.DP_CENTRE_NOISE] == 4.0
            schedule = [(COUNT_SIGMA, 1.0, 1), (4.0, 1.0, 1), (1.3, q, k * K)]
            assert metrics[protocol.DP_EPSILON] == pytest.approx(_opacus_epsilon("rdp", schedule, delta), rel=1e-9)
        content = PrivacyLedger.in_folder(tmp_path / "sites" / site).load()
        (attempts,) = content.attempts.values()
        assert [(a.kind, a.round, a.steps) for a in attempts] == [
            ("counts", 1, 1), (CENTRE, 1, 1), ("sgd", 1, K), ("sgd", 2, K)]  # once: round 2 received it set
    final = load_file(str(tmp_path / "checkpoints" / "round-0002.safetensors"))
    assert float(final["classifier.centre_ready"]) == pytest.approx(1.0)
    centre = final["classifier.input_centre"]
    assert torch.isfinite(centre).all() and float(centre.norm()) > 1.0  # the common part of the features
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())
    for site in report["sites"].values():
        assert site["centre_release"]["released"] and site["centre_release"]["noise_multiplier"] == 4.0
        assert site["centre_release"]["radius"] == pytest.approx(math.sqrt(64 * 2))
    assert "| head centre release | Gaussian mechanism on the sum of the head's input features" in (
        tmp_path / "privacy" / "report.md").read_text()


def test_a_centred_run_is_quoted_the_centred_recipe_cost_only() -> None:
    run = {"train": {"method": "supervised"}, "privacy": {"scope": "discriminator", "freeze_trunk": True},
           "model": {"trunk_prior": "p.safetensors", "classifier_grid": 2, "classifier_centre": True}}
    centred = Recipe.of_run(run)
    assert centred.classifier_centre and "model.classifier_centre" in centred.describe()
    uncentred = ReferenceCost("supervised", "discriminator", 8.0, 0.45, 0.65, 3, True, True, 2)
    assert nearest_cost([uncentred], centred, 8.0) is None
    row = dataclasses.replace(uncentred, accuracy=0.75, classifier_centre=True)
    assert nearest_cost([uncentred, row], centred, 8.0) == row
