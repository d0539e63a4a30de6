"""The training speed switches (train.generator_update, amp, compile, loader_workers) compute what
they promise: the same numbers where the math is meant to be equal, on the CPU."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common.data.synthetic import SyntheticHistology
from common.model import ModelConfig, build_model
from common.train import LocalTrainer, TrainConfig
from common.train.augment import AugmentConfig
from common.train.fit_gate import FitGateConfig
from common.train.losses import generator_loss
from common.train.selection import SelectionConfig
from common.train.streams import _endless, training_batches

NO_AUGMENT = AugmentConfig(enabled=False)


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1, torch.arange(n) % 5


def _trainer(tiny_cfg: ModelConfig, cfg: TrainConfig) -> LocalTrainer:
    return LocalTrainer(build_model(tiny_cfg, 5, seed=0), cfg, seed=1)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> bool:
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-5) for k in a)


def test_generator_update_leaves_discriminator_and_classifier_gradients_alone(tiny_cfg: ModelConfig) -> None:
    """G's backward reaches G's parameters only: D's and C's gradients are those of D/C's own loss,
    and every parameter still requires grad afterwards."""
    trainer = _trainer(tiny_cfg, TrainConfig(batch_size=8, generated_batch_size=8))
    images, labels = _batch()
    trainer.unified_step(images, labels)
    model = trainer.model
    before = {k: p.grad.clone() for k, p in model.discriminator.named_parameters() if p.grad is not None}
    fake = model.generator(torch.randn(4, tiny_cfg.z_dim), torch.arange(4) % 5)
    trainer.generator_step(fake, torch.arange(4) % 5)
    after = {k: p.grad for k, p in model.discriminator.named_parameters() if p.grad is not None}
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is not None for p in model.generator.parameters())


def test_same_pass_trains_discriminator_and_classifier_exactly_as_the_default(tiny_cfg: ModelConfig) -> None:
    """D/C's update is the same math in both modes: after a step from the same state, D's and C's
    weights and D/C's losses agree; G's loss comes from the pre-update pass, so G differs."""
    base = TrainConfig(batch_size=8, generated_batch_size=8, selection=SelectionConfig(warmup_steps=0, min_history=1))
    default, fused = _trainer(tiny_cfg, base), _trainer(tiny_cfg, replace(base, generator_update="same_pass"))
    images, labels = _batch()
    out_default, out_fused = default.unified_step(images, labels), fused.unified_step(images, labels)
    for key in ("adv_discriminator", "cls_real"):
        assert out_default[key] == pytest.approx(out_fused[key], rel=1e-5, abs=1e-6), key
    assert _close(_params(default.model.discriminator), _params(fused.model.discriminator))
    assert _close(_params(default.model.classifier), _params(fused.model.classifier))
    assert not _close(_params(default.model.generator), _params(fused.model.generator))


def test_same_pass_gives_g_the_gradient_of_its_loss_against_the_pre_update_model(tiny_cfg: ModelConfig) -> None:
    cfg = TrainConfig(batch_size=8, generated_batch_size=6, augment=NO_AUGMENT, aux_generated_weight=0.5,
                      generator_update="same_pass")
    trainer = _trainer(tiny_cfg, cfg)
    images, labels = _batch()
    initial = copy.deepcopy(trainer.model)
    rng = copy.deepcopy(trainer.rng)
    trainer.unified_step(images, labels)

    fake_labels = (torch.arange(6) % 5)[torch.randperm(6, generator=rng)]
    z = torch.randn(6, tiny_cfg.z_dim, generator=rng)
    fake = initial.generator(z, fake_labels)
    out = initial.discriminate(fake, fake_labels)
    loss = generator_loss(out.score, "hinge") + 0.5 * F.cross_entropy(out.logits, fake_labels)
    expected = torch.autograd.grad(loss, list(initial.generator.parameters()))
    got = [p.grad for p in trainer.model.generator.parameters()]
    assert all(torch.allclose(g, e, atol=1e-6, rtol=1e-4) for g, e in zip(got, expected))


def test_bf16_autocast_runs_on_the_cpu_with_float32_master_weights(tiny_cfg: ModelConfig) -> None:
    base = TrainConfig(batch_size=8, generated_batch_size=8)
    plain, mixed = _trainer(tiny_cfg, base), _trainer(tiny_cfg, replace(base, amp="bf16"))
    images, labels = _batch()
    out_plain, out_mixed = plain.unified_step(images, labels), mixed.unified_step(images, labels)
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    for key in ("adv_discriminator", "cls_real", "adv_generator"):  # bfloat16 keeps ~3 significant digits
        assert out_mixed[key] == pytest.approx(out_plain[key], rel=5e-2, abs=5e-2), key
    assert mixed.supervised_step(images, labels)["cls_real"] > 0


def test_compiled_trunk_and_generator_compute_the_eager_losses(tiny_cfg: ModelConfig) -> None:
    base = TrainConfig(batch_size=4, generated_batch_size=4)
    eager, compiled = _trainer(tiny_cfg, base), _trainer(tiny_cfg, replace(base, compile=True))
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())  # keys as without compile
    model = compiled.model
    for module in (model.discriminator.trunk, model.generator, model.classifier):
        assert module._compiled_call_impl is not None, type(module).__name__
    images, labels = _batch(4)
    for _ in range(2):
        out_eager, out_compiled = eager.unified_step(images, labels), compiled.unified_step(images, labels)
    for key in ("adv_discriminator", "cls_real", "adv_generator", "aux_generated"):
        assert out_compiled[key] == pytest.approx(out_eager[key], rel=1e-3, abs=1e-4), key


def test_fused_optimisers_give_the_loop_update(tiny_cfg: ModelConfig) -> None:
    """optim.fused=true (one kernel per optimiser step; the CUDA default) trains as the per-parameter
    loop does, up to rounding: the losses, the whole update and the loss weights after three steps.
    (Single weights may differ by ~lr: Adam turns the rounding noise of a zero gradient, such as an
    attention key bias's, into a full-size step.)"""
    base = TrainConfig(batch_size=8, generated_batch_size=8,
                       selection=SelectionConfig(warmup_steps=0, min_history=1, confidence_threshold=0.0,
                                                 centroid_distance=False),
                       fit_gate=FitGateConfig(threshold=0.0))  # generated images reach C from the first step
    loop = _trainer(tiny_cfg, replace(base, optim=replace(base.optim, fused=False)))
    fused = _trainer(tiny_cfg, replace(base, optim=replace(base.optim, fused=True)))
    assert fused.opt_discriminator.defaults["fused"] and not loop.opt_discriminator.defaults["fused"]
    images, labels = _batch()
    start = torch.cat([p.flatten() for p in _params(loop.model).values()])
    for _ in range(3):
        out_loop, out_fused = loop.unified_step(images, labels), fused.unified_step(images, labels)
        assert out_fused["selected"] == out_loop["selected"] > 0
        for key, value in out_loop.items():
            assert out_fused[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    step_loop = torch.cat([p.flatten() for p in _params(loop.model).values()]) - start
    step_fused = torch.cat([p.flatten() for p in _params(fused.model).values()]) - start
    assert float((step_fused - step_loop).norm() / step_loop.norm()) < 0.02
    torch.testing.assert_close(fused.weighting.log_vars, loop.weighting.log_vars, rtol=1e-5, atol=1e-6)


def test_fused_optimisers_default_to_cuda_only() -> None:
    optim = TrainConfig().optim
    assert optim.fused is None
    assert optim.use_fused(torch.device("cuda")) and not optim.use_fused(torch.device("cpu"))
    assert not replace(optim, fused=False).use_fused(torch.device("cuda"))
    with pytest.raises(ValueError, match="fused"):
        replace(optim, fused="yes")


def test_private_training_refuses_the_speed_switches(tiny_cfg: ModelConfig) -> None:
    privacy = object()  # never used: the refusal comes first
    for switch in ({"amp": "bf16"}, {"compile": True}, {"generator_update": "same_pass"}):
        with pytest.raises(ValueError, match="DP-SGD"):
            LocalTrainer(build_model(tiny_cfg, 5, seed=0), replace(TrainConfig(), **switch), privacy=privacy)  # type: ignore[arg-type]


def test_unknown_switch_values_are_named() -> None:
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="generator_update"):
        TrainConfig(generator_update="sometimes")
    with pytest.raises(ValueError, match="loader_workers"):
        TrainConfig(loader_workers=-1)


def test_loader_workers_give_the_same_batches_as_the_main_process() -> None:
    data = SyntheticHistology(40, 32, seed=3)
    data.labels = np.where(np.arange(40) < 10, data.labels, -1)  # labelled and unlabelled streams
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=6)
    inline = training_batches(data, cfg, seed=7)
    workers = training_batches(data, replace(cfg, loader_workers=2), seed=7)
    for _ in range(12):  # past the end of the labelled stream's first epoch
        (xa, ya), (xb, yb) = next(inline), next(workers)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("batch", [3, 4, 10])
def test_the_shuffle_order_is_that_of_a_plain_seeded_loader_with_or_without_workers(batch: int) -> None:
    """Five epochs of batches match a shuffling DataLoader(generator=seeded) without workers: the
    order the project had before loader workers existed (runs resumed across versions agree)."""
    items = [torch.tensor(i) for i in range(10)]
    plain = DataLoader(items, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    expected = [b.tolist() for _ in range(5) for b in plain]
    for workers in (0, 1):
        stream = _endless(items, batch, seed=3, workers=workers)  # type: ignore[arg-type]
        assert [next(stream).tolist() for _ in expected] == expected


def test_a_host_mask_picks_the_rows_a_device_mask_picks() -> None:
    """masked_cross_entropy with a host mask (indices, no wait for the GPU) gives the boolean-mask
    value and gradient; no row: None."""
    from common.train.losses import masked_cross_entropy
    from common.train.transfer import host_rows, to_device

    logits = torch.randn(7, 5, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 1, 3, 0, 2])
    mask = torch.tensor([True, False, True, True, False, False, True])
    got = masked_cross_entropy(logits, labels, mask)
    (grad_got,) = torch.autograd.grad(got, logits)
    want = F.cross_entropy(logits[mask], labels[mask])
    (grad_want,) = torch.autograd.grad(want, logits)
    assert torch.equal(got, want) and torch.equal(grad_got, grad_want)
    assert masked_cross_entropy(logits, labels, torch.zeros(7, dtype=torch.bool)) is None
    assert host_rows(mask, "cpu").tolist() == [0, 2, 3, 6]
    host = torch.arange(3)
    assert to_device(host, "cpu") is host  # nothing copied on the CPU
