"""The head's input whitening (model.classifier_whitening): the matrix, where its images come from
(never a hospital's patches), that a refresh leaves the model's function unchanged, and that every
trainer refreshes it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import protocol
from common.config import dataclass_from_mapping
from common.data.synthetic import CLASS_NAMES
from common.model import ModelConfig, build_model
from common.model.unified import UnifiedViTGAN
from common.privacy.ledger import CENTRE, PrivacyLedger
from common.privacy.report import build_report, head_whitening_floor, head_whitening_text, render_markdown
from common.train.config import TrainConfig
from common.train.engine import LocalTrainer
from common.train.whitening import WhiteningConfig, refresh_whitening, whitening_matrix
from tests.test_privacy_federation import K, _run

SMALL = WhiteningConfig(images=64, shrinkage=0.01, seed=0)
GEN, PUBLIC = ("generator",), ("random_process",)


def _model(tiny_cfg: ModelConfig, **extra: object) -> UnifiedViTGAN:
    cfg = dataclasses.replace(tiny_cfg, classifier_whitening=True, classifier_grid=1, **extra)
    return build_model(cfg, 3, seed=0)


def test_the_matrix_whitens_correlated_features_and_keeps_their_mean_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=generator) * torch.tensor([10.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    features = torch.randn(4000, 6, generator=generator, dtype=torch.float64) @ mixing.double().T + 5.0
    matrix = whitening_matrix(features, shrinkage=1e-6).double()
    assert torch.allclose(matrix, matrix.T, atol=1e-6)
    centred = features - features.mean(0)
    whitened = centred @ matrix
    covariance = whitened.T @ whitened / len(whitened)
    # equal variance in every direction (a multiple of the identity), where the raw spread is 100:0.01
    assert torch.allclose(covariance / covariance.diagonal().mean(), torch.eye(6, dtype=torch.float64), atol=0.05)
    assert whitened.norm(dim=1).mean() == pytest.approx(float(centred.norm(dim=1).mean()), rel=1e-4)
    # the floor bounds the gain of the weakest directions: at most sqrt((1 + s) / s) times the strongest's
    floored = whitening_matrix(features, shrinkage=0.5).double()
    assert float(torch.linalg.cond(floored)) <= 3 ** 0.5 + 1e-6 and float(torch.linalg.cond(matrix)) > 50
    with pytest.raises(ValueError, match="do not vary"):
        whitening_matrix(torch.ones(10, 6), shrinkage=0.01)
    # Several sets: each centred on its own mean and weighed at equal trace, so a set's overall
    # scale or offset does not change the matrix, and a second set pulls it towards its own shape.
    assert torch.allclose(whitening_matrix([features, 10 * features - 3.0], 1e-6).double(), matrix, atol=1e-4)
    isotropic = torch.randn(4000, 6, generator=generator, dtype=torch.float64)
    mixed = whitening_matrix([features, isotropic], 1e-6).double()
    assert float(torch.linalg.cond(mixed)) < float(torch.linalg.cond(matrix)) / 5


def test_a_refresh_keeps_the_model_s_function_and_every_hospital_computes_the_same_matrix(tiny_cfg: ModelConfig) -> None:
    model = _model(tiny_cfg)
    assert torch.equal(model.classifier.input_whitening, torch.eye(model.cfg.classifier_features))
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = model.classifier(model.discriminator.trunk(images))
    for sources in (GEN, PUBLIC, GEN):
        refresh_whitening(model, sources, SMALL)
        with torch.no_grad():
            after = model.classifier(model.discriminator.trunk(images))
        assert torch.allclose(after, before, atol=1e-4)
    assert not torch.allclose(model.classifier.input_whitening, torch.eye(model.cfg.classifier_features), atol=0.1)
    other = _model(tiny_cfg)  # another hospital holding the same global model
    refresh_whitening(other, GEN, SMALL)
    assert torch.equal(other.classifier.input_whitening, model.classifier.input_whitening)


def test_the_unified_model_whitens_by_its_generator_s_images_the_plain_one_by_public_images(tiny_cfg: ModelConfig) -> None:
    def matrices(model: UnifiedViTGAN) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for sources in (GEN, PUBLIC):
            model.classifier.input_whitening.copy_(torch.eye(model.cfg.classifier_features))
            refresh_whitening(model, sources, SMALL)
            out.append(model.classifier.input_whitening.clone())
        return out[0], out[1]

    model = _model(tiny_cfg)
    generated, public = matrices(model)
    with torch.no_grad():  # another generator, the same trunk
        for p in model.generator.parameters():
            p.add_(0.5 * torch.randn_like(p))
    generated_after, public_after = matrices(model)
    assert not torch.allclose(generated, generated_after, atol=1e-3)
    assert torch.equal(public, public_after)


def test_every_trainer_refreshes_the_whitening_and_a_model_without_the_switch_has_none(tiny_cfg: ModelConfig) -> None:
    plain = build_model(tiny_cfg, 3, seed=0)
    assert not any("whitening" in k for k in plain.state_dict())
    cfg = dataclasses.replace(TrainConfig(), whitening=SMALL)
    model = _model(tiny_cfg)
    LocalTrainer(model, cfg, seed=0)
    unified = model.classifier.input_whitening.clone()
    assert not torch.allclose(unified, torch.eye(model.cfg.classifier_features), atol=0.1)
    supervised = _model(tiny_cfg)
    LocalTrainer(supervised, dataclasses.replace(cfg, method="supervised"), seed=0)
    reference = _model(tiny_cfg)
    refresh_whitening(reference, PUBLIC, SMALL)
    assert torch.equal(supervised.classifier.input_whitening, reference.classifier.input_whitening)
    assert not torch.allclose(supervised.classifier.input_whitening, unified, atol=1e-3)
    # train.whitening.source=random_process: the unified model whitens by the public images too.
    public = _model(tiny_cfg)
    LocalTrainer(public, dataclasses.replace(cfg, whitening=dataclasses.replace(SMALL, source="random_process")), seed=0)
    assert torch.equal(public.classifier.input_whitening, reference.classifier.input_whitening)
    # The unified default (auto) and source=mixed: half the generator's images, half random-process ones.
    both = _model(tiny_cfg)
    refresh_whitening(both, (*GEN, *PUBLIC), SMALL)
    assert torch.equal(unified, both.classifier.input_whitening)
    mixed = _model(tiny_cfg)
    LocalTrainer(mixed, dataclasses.replace(cfg, whitening=dataclasses.replace(SMALL, source="mixed")), seed=0)
    assert torch.equal(mixed.classifier.input_whitening, unified)
    # source=generator: its images alone.
    generated = _model(tiny_cfg)
    LocalTrainer(generated, dataclasses.replace(cfg, whitening=dataclasses.replace(SMALL, source="generator")), seed=0)
    alone = _model(tiny_cfg)
    refresh_whitening(alone, GEN, SMALL)
    assert torch.equal(generated.classifier.input_whitening, alone.classifier.input_whitening)
    assert not torch.allclose(alone.classifier.input_whitening, unified, atol=1e-3)


def test_the_floor_grows_with_the_dp_noise_and_stays_the_fixed_one_without_dp() -> None:
    cfg = WhiteningConfig(shrinkage=0.01, noise_shrinkage=0.0012, noise_shrinkage_min=0.003)
    assert cfg.floor(None) == 0.01  # no DP-SGD: the fixed floor
    assert cfg.floor(0.5) == cfg.floor(1.3) == 0.003  # weak noise: the lowest floor the rule gives
    assert cfg.floor(2.46) == pytest.approx(0.0012 * 2.46**3)  # 0.018
    assert cfg.floor(6.3) == pytest.approx(0.300, abs=1e-3)
    assert cfg.floor(100.0) == 1.0  # a fraction of the largest eigenvalue: at most 1
    assert [cfg.floor(s) for s in (1.0, 2.0, 3.0, 4.0, 5.0)] == sorted(cfg.floor(s) for s in (1.0, 2.0, 3.0, 4.0, 5.0))
    off = dataclasses.replace(cfg, noise_shrinkage=0.0)
    assert off.floor(6.3) == off.floor(None) == 0.01  # the rule off: the fixed floor under DP too
    # the floor is the one the matrix is built with: a stronger noise, a flatter (less stretching) matrix
    features = torch.randn(500, 6, dtype=torch.float64) * torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1, 0.03], dtype=torch.float64)
    spread = [torch.linalg.eigvalsh(whitening_matrix(features, cfg.floor(s)).double()) for s in (1.0, 6.3)]
    assert float(spread[0].max() / spread[0].min()) > 3 * float(spread[1].max() / spread[1].min())
    with pytest.raises(ValueError, match="noise_shrinkage must be >= 0"):
        WhiteningConfig(noise_shrinkage=-0.1)
    with pytest.raises(ValueError, match=r"noise_shrinkage_min must be in \(0, 1\]"):
        WhiteningConfig(noise_shrinkage_min=0.0)
    with pytest.raises(ValueError, match="noise multiplier >= 0"):
        cfg.floor(float("nan"))


def test_the_whitening_section_refuses_values_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="shrinkage"):
        WhiteningConfig(images=64, shrinkage=0.0, seed=0)
    with pytest.raises(ValueError, match="images"):
        WhiteningConfig(images=1, shrinkage=0.01, seed=0)
    with pytest.raises(ValueError, match="source must be one of"):
        WhiteningConfig(images=64, shrinkage=0.01, seed=0, source="real")
    generator = WhiteningConfig(images=64, shrinkage=0.01, seed=0, source="generator")
    for source in ("generator", "mixed"):
        with pytest.raises(ValueError, match=f"source={source} needs a train.method that trains the generator"):
            dataclasses.replace(generator, source=source).sources(trains_generator=False)
    assert generator.sources(True) == GEN and dataclasses.replace(generator, source="random_process").sources(True) == PUBLIC
    assert dataclasses.replace(generator, source="mixed").sources(True) == (*GEN, *PUBLIC)
    assert dataclasses.replace(generator, source="auto").sources(True) == (*GEN, *PUBLIC)  # auto: mixed for the unified model
    assert dataclasses.replace(generator, source="auto").sources(False) == PUBLIC
    # refresh_whitening shares the images equally: each source needs 2 for a covariance
    few = dataclasses.replace(generator, source="mixed", images=3)
    with pytest.raises(ValueError, match="images=3 gives each of its 2 sources .* 1 image.*>= 4"):
        few.sources(True)
    assert dataclasses.replace(few, images=4).sources(True) == (*GEN, *PUBLIC)
    assert dataclasses.replace(few, source="random_process").sources(True) == PUBLIC  # 3 images, one source


def test_a_private_run_whitens_from_its_generator_at_no_cost_to_the_budget(tmp_path: Path) -> None:
    _, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=2", "privacy.noise_multiplier=3.0",
                                 "model.classifier_centre=true", "model.classifier_grid=1", "privacy.scope=discriminator",
                                 "privacy.freeze_trunk=true", "model.classifier_whitening=true",
                                 "train.whitening.images=64"])
    for site in ("site-0", "site-1"):
        content = PrivacyLedger.in_folder(tmp_path / "sites" / site).load()
        (attempts,) = content.attempts.values()
        # the releases of a centred run and nothing else: the whitening reads no patch
        assert [(a.kind, a.round, a.steps) for a in attempts] == [
            ("counts", 1, 1), (CENTRE, 1, 1), ("sgd", 1, K), ("sgd", 2, K)]
    final = load_file(str(tmp_path / "checkpoints" / "round-0002.safetensors"))
    whitening = final["classifier.input_whitening"]
    assert torch.isfinite(whitening).all()
    assert not torch.allclose(whitening, torch.eye(len(whitening)), atol=0.1)
    # every hospital computed the same matrix from the round-1 global model, so their average is that matrix
    run = json.loads((tmp_path / "checkpoints" / "run_config.json").read_text())
    model = build_model(dataclass_from_mapping(ModelConfig, run["model"], "model"), len(CLASS_NAMES), seed=0)
    model.load_state_dict(load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors")))
    # auto: mixed. The hospitals trained in the floor their sigma (3.0) sets and sent their heads
    # expressed in the matrix at the fixed floor, the one every hospital computes alike.
    matrices = refresh_whitening(model, (*GEN, *PUBLIC), WhiteningConfig(images=64, seed=0), noise_multiplier=3.0)
    assert torch.allclose(matrices.shared, whitening, atol=1e-5)
    assert not torch.allclose(matrices.local, whitening, atol=1e-3)
    report = (tmp_path / "privacy" / "report.md").read_text()
    assert "| head input whitening | from 32 images of the received global generator and 32 random-process" in report
    assert "spends no budget" in report


def test_each_hospital_trains_in_its_own_floor_and_sends_its_head_in_the_shared_one(tmp_path: Path) -> None:
    common = ["federation.num_sites=2", "federation.rounds=1", "privacy.noise_multiplier=3.0", "model.classifier_grid=1",
              "privacy.scope=discriminator", "privacy.freeze_trunk=true", "model.classifier_whitening=true",
              "train.whitening.images=64", "privacy.seed=0"]  # seeded noise: the same draws in both runs
    heads = {}
    for name, rule in (("own", []), ("fixed", ["train.whitening.noise_shrinkage=0"])):
        _run(tmp_path / name, [*common, *rule])
        heads[name] = load_file(str(tmp_path / name / "checkpoints" / "round-0001.safetensors"))
    # the same coordinates leave the hospitals either way (the matrix at the fixed floor) ...
    assert torch.equal(heads["own"]["classifier.input_whitening"], heads["fixed"]["classifier.input_whitening"])
    # ... but the steps were taken in another matrix, so the same noise moved the head elsewhere
    assert not torch.allclose(heads["own"]["classifier.head.weight"], heads["fixed"]["classifier.head.weight"], atol=1e-4)


def test_a_round_switches_to_the_hospital_s_matrix_for_its_steps_and_back(tiny_cfg: ModelConfig) -> None:
    model = _model(tiny_cfg)
    trainer = LocalTrainer(model, dataclasses.replace(TrainConfig(), method="supervised", whitening=SMALL), seed=0)
    shared = model.classifier.input_whitening.clone()
    assert trainer.whitenings is not None and torch.equal(trainer.whitenings.shared, shared)
    assert trainer.whitenings.local is trainer.whitenings.shared  # no DP: one matrix, nothing switches
    noisy = _model(tiny_cfg)
    matrices = refresh_whitening(noisy, PUBLIC, SMALL, noise_multiplier=6.3)
    local = matrices.local
    assert not torch.allclose(local, matrices.shared, atol=1e-3)
    assert torch.equal(noisy.classifier.input_whitening, matrices.shared)  # a refresh leaves the head ready to leave
    trainer.whitenings = dataclasses.replace(trainer.whitenings, local=local)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    labels = torch.arange(8) % 3
    with torch.no_grad():
        before = model.classify(images)
    seen: list[torch.Tensor] = []
    trainer.train_round([(images, labels)], steps=2,
                        progress=lambda *_: seen.append(model.classifier.input_whitening.clone()))
    assert len(seen) == 2 and all(torch.equal(m, local) for m in seen)  # the steps: the hospital's own floor
    assert torch.equal(model.classifier.input_whitening, shared)  # after: the shared one, ready to leave
    assert not torch.allclose(model.classify(images), before, atol=1e-4)  # it did train


def test_the_report_says_the_matrix_is_free_only_where_the_generator_is_private() -> None:
    def row(method: str, scope: str) -> str | None:
        return head_whitening_text({"model": {"classifier_whitening": True}, "privacy": {"scope": scope},
                           "train": {"method": method, "whitening": {"images": 1000}}})

    assert "post-processing of DP outputs and spends no budget" in row("unified", "discriminator")
    head_only = row("unified", "classifier")
    assert "WITHOUT DP" in head_only and "spends no budget" not in head_only
    assert "1000 random-process images" in row("supervised", "classifier")
    public = head_whitening_text({"model": {"classifier_whitening": True}, "privacy": {"scope": "classifier"},
                                  "train": {"method": "unified", "whitening": {"images": 1000, "source": "random_process"}}})
    assert "1000 random-process images" in public and "WITHOUT DP" not in public
    mixed = head_whitening_text({"model": {"classifier_whitening": True}, "privacy": {"scope": "discriminator"},
                                 "train": {"method": "unified", "whitening": {"images": 1000, "source": "mixed"}}})
    assert "500 images of the received global generator and 500 random-process images" in mixed
    refused = head_whitening_text({"model": {"classifier_whitening": True}, "privacy": {"scope": "discriminator"},
                                   "train": {"method": "supervised", "whitening": {"source": "generator"}}})
    assert refused is not None and refused.startswith("none: train.whitening.source=generator needs")
    assert "spends no budget" in mixed
    assert head_whitening_text({"model": {}, "privacy": {"scope": "discriminator"}}) is None


def test_the_report_names_each_hospital_s_whitening_floor_and_the_shared_one() -> None:
    """The report says which floor the hospital's steps used (from the noise its DP steps used) and in
    which matrix the head left: how to reproduce the run."""
    config = {"model": {"classifier_whitening": True}, "train": {"whitening": {"images": 1000}}}
    noisy = head_whitening_floor(config, 2.46)
    assert noisy["floor"] == pytest.approx(0.0012 * 2.46 ** 3) and noisy["shared_floor"] == 0.01
    assert noisy["rule"] == "clamp(0.0012 sigma^3, 0.01, 1) under DP-SGD, shared 0.01"
    calm = head_whitening_floor(config, 1.17)
    assert calm["floor"] == 0.01
    assert head_whitening_floor(config, None)["floor"] == 0.01
    assert head_whitening_floor({"model": {}, "train": {}}, 2.46) is None
    config["train"]["whitening"]["noise_shrinkage"] = 0.0
    assert head_whitening_floor(config, 6.3) == {"rule": "0.01", "noise_multiplier": 6.3, "floor": 0.01,
                                                 "shared_floor": 0.01}


def test_a_private_run_s_report_states_the_floor_its_hospitals_used(tmp_path: Path) -> None:
    """Two hospitals of one private run, whitened: report.json and report.md carry each one's floor at
    the noise multiplier it reported."""
    config = {"model": {"classifier_whitening": True}, "train": {"whitening": {"images": 1000}}}
    text = render_markdown(_report_with_floors(config, tmp_path))
    assert "| head whitening's eigenvalue floor | 0.0179 of the largest eigenvalue in its training steps (at this " \
           "hospital's noise multiplier 2.46" in text
    assert "the head leaves written in the shared matrix, floor 0.01 |" in text
    assert "0.01 of the largest eigenvalue in its training steps (at this hospital's noise multiplier 1.17" in text
    assert "; the head leaves in the same matrix |" in text


def _report_with_floors(config: dict, run_dir: Path) -> dict:
    """build_report of a one-round private run whose two hospitals reported noise 2.46 and 1.17."""
    def site(sigma: float) -> dict:
        return {"train": {protocol.DP_EPSILON: 3.0, protocol.DP_DELTA: 1e-5, protocol.DP_NOISE_MULTIPLIER: sigma,
                          protocol.DP_SAMPLE_RATE: 0.05, protocol.DP_MAX_GRAD_NORM: 1.0, protocol.DP_STEPS_TOTAL: 50,
                          protocol.DP_HISTORY_NOISE: [sigma], protocol.DP_HISTORY_RATE: [0.05],
                          protocol.DP_HISTORY_STEPS: [50]}}
    full = {**config, "privacy": {"enabled": True, "scope": "discriminator"}}
    (run_dir / "summary.json").write_text(json.dumps({"config": full, "rounds": [
        {"round": 1, "sites": {"site-0": site(2.46), "site-1": site(1.17)}}]}))
    report = build_report(run_dir)
    assert report["sites"]["site-0"]["head_whitening_floor"]["floor"] == pytest.approx(0.0012 * 2.46 ** 3)
    assert report["sites"]["site-1"]["head_whitening_floor"]["floor"] == 0.01
    return report
