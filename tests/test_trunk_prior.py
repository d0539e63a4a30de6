"""The trunk prior: random-process images, SimCLR pretraining, the prior file, and where a run reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import common.model.unified as unified
from common.model import build_model, initial_model, model_preset
from common.model.prior.pretrain import augmented_view, nt_xent, pretrain_trunk, prior_config
from common.model.prior.random_images import dead_leaves, random_process_images, spectral_noise
from common.model.prior.store import PriorError
from simulations.cli import main as cli_main
from tests.test_federation import _run

TINY = model_preset("tiny")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_process_images_are_seeded_bounded_and_vary() -> None:
    a = random_process_images(16, 32, _generator(0))
    assert a.shape == (16, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, random_process_images(16, 32, _generator(0)))
    assert not torch.equal(a, random_process_images(16, 32, _generator(1)))
    assert a.flatten(1).std(dim=1).min() > 0.05  # no blank image
    assert dead_leaves(4, 32, _generator(0)).unique().numel() > 100  # textured leaves, not flat colours


def test_spectral_noise_has_more_power_at_low_than_at_high_frequencies() -> None:
    images = spectral_noise(32, 32, _generator(0))
    power = torch.fft.fft2(images - images.mean(dim=(2, 3), keepdim=True)).abs().pow(2).mean(dim=(0, 1))
    frequency = torch.fft.fftfreq(32).abs()
    radius = torch.maximum(frequency.reshape(-1, 1), frequency.reshape(1, -1))
    low = power[(radius > 0) & (radius <= 2 / 32)].mean()
    high = power[radius >= 12 / 32].mean()
    assert low > 20 * high


def test_nt_xent_is_low_when_each_view_finds_its_partner_and_high_when_it_cannot() -> None:
    z = torch.randn(32, 64, generator=_generator(0))
    matched = nt_xent(z, z + 0.01 * torch.randn(32, 64, generator=_generator(1)), temperature=0.2)
    shuffled = nt_xent(z, z[torch.randperm(32, generator=_generator(2))], temperature=0.2)
    assert matched < 0.5 and shuffled > 3.0


def test_views_are_other_crops_of_the_same_image() -> None:
    images = random_process_images(8, 32, _generator(0))
    view = augmented_view(images, _generator(1))
    assert view.shape == images.shape and not torch.equal(view, images)
    assert view.min() >= -1 and view.max() <= 1


def test_pretraining_is_reproducible_and_moves_the_trunk() -> None:
    cfg = prior_config({"steps": 2, "batch_size": 8})
    first, second = pretrain_trunk(TINY, cfg), pretrain_trunk(TINY, cfg)
    assert set(first) == set(build_model(TINY, 3).discriminator.trunk.state_dict())
    assert all(torch.equal(first[k], second[k]) for k in first)
    start = pretrain_trunk(TINY, prior_config({"steps": 1, "batch_size": 8, "learning_rate": 0.0}))
    assert any(not torch.equal(first[k], start[k]) for k in first)


def test_an_unknown_prior_setting_is_refused_by_name() -> None:
    with pytest.raises(Exception, match="temprature"):
        prior_config({"temprature": 0.5})


def _prior_file(tmp: Path, scale: float = 0.5) -> Path:
    trunk = build_model(TINY, 3, seed=123).discriminator.trunk.state_dict()
    path = tmp / "prior.safetensors"
    save_file({k: (v * scale).contiguous() for k, v in trunk.items()}, str(path))
    return path


def test_initial_model_takes_its_trunk_from_the_prior_and_everything_else_from_the_seed(tmp_path: Path) -> None:
    path = _prior_file(tmp_path)
    cfg = TINY.__class__(**{**TINY.__dict__, "trunk_prior": str(path)})
    model, plain = initial_model(cfg, 3, seed=0), build_model(cfg, 3, seed=0)
    prior = load_file(str(path))
    for key, value in model.discriminator.trunk.state_dict().items():
        assert torch.equal(value, prior[key]), key
    assert any(not torch.equal(v, plain.discriminator.trunk.state_dict()[k]) for k, v in prior.items())
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("discriminator.trunk.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in rest.items())


def test_a_missing_corrupt_or_mismatched_prior_is_refused_naming_the_file(tmp_path: Path) -> None:
    def with_prior(path: Path) -> object:
        return TINY.__class__(**{**TINY.__dict__, "trunk_prior": str(path)})

    with pytest.raises(PriorError, match="no file .*absent.safetensors"):
        initial_model(with_prior(tmp_path / "absent.safetensors"), 3)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(PriorError, match="corrupt.safetensors is not a readable"):
        initial_model(with_prior(corrupt), 3)
    other = tmp_path / "small.safetensors"
    save_file(build_model(model_preset("small"), 3).discriminator.trunk.state_dict(), str(other))
    with pytest.raises(PriorError, match="small.safetensors was made for another trunk"):
        initial_model(with_prior(other), 3)


@pytest.mark.slow
def test_the_coordinator_alone_reads_the_prior_and_the_hospitals_start_from_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _prior_file(tmp_path)
    reads: list[str] = []
    real = unified.load_trunk_prior
    monkeypatch.setattr(unified, "load_trunk_prior", lambda p, trunk: (reads.append(str(p)), real(p, trunk))[1])
    # A frozen trunk (learning rate 0): after one round the global trunk is still the prior.
    _run(tmp_path / "run", [f"model.trunk_prior={path}", "federation.rounds=1", "train.method=supervised",
                            "train.optim.lr_discriminator=0.0"])
    assert reads == [str(path)]  # once, at the coordinator; three hospitals never opened it
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "round-0001.safetensors"))
    prior = load_file(str(path))
    for key, value in prior.items():  # FedAvg of three equal copies, in float64 and back: within one float32 step
        torch.testing.assert_close(saved[f"discriminator.trunk.{key}"], value, rtol=0.0, atol=1e-7, msg=key)


def test_the_prior_command_writes_a_file_a_run_can_start_from(tmp_path: Path) -> None:
    out = tmp_path / "priors" / "tiny.safetensors"
    assert cli_main(["prior", "--out", str(out), "--steps", "2", "--threads", "1"]) == 0
    record = json.loads(out.with_name("tiny.safetensors.json").read_text())
    assert record["model"] == "tiny" and record["prior"]["steps"] == 2 and "no patient image" in record["data"]
    model = initial_model(TINY.__class__(**{**TINY.__dict__, "trunk_prior": str(out)}), 3)
    assert torch.equal(model.discriminator.trunk.pos_embed, load_file(str(out))["pos_embed"])
    assert cli_main(["prior", "--out", str(out), "--steps", "0"]) == 2
