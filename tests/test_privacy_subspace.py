"""DP-SGD in the generated images' gradient subspace (privacy.subspace_dim): what it adds and where."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.config import ConfigError
from common.model import ModelConfig, build_model
from common.privacy.accounting import PrivacyPlan
from common.privacy.config import check_private_method, privacy_config
from common.privacy.wiring import DPTraining


def _plan(sigma: float, dim: int | None, clip: float = 0.05, history: int = 2) -> PrivacyPlan:
    return PrivacyPlan(scope="discriminator", accountant="rdp", noise_multiplier=sigma, max_grad_norm=clip,
                       expected_batch=4, sample_rate=0.1, delta=1e-5, steps_per_round=3, planned_rounds=2,
                       num_examples=40, labelled_fraction=0.5, max_epsilon=None, clipping="vmap",
                       subspace_dim=dim, subspace_history=history)


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1, torch.arange(n) % 5


def test_the_private_gradient_lies_in_the_public_span_and_its_noise_has_subspace_dimension(
        tiny_cfg: ModelConfig) -> None:
    model = build_model(tiny_cfg, 5, seed=0)
    real, labels = _images(4, 1)
    public, public_labels = _images(6, 2)
    dp = DPTraining(model, _plan(sigma=1.0, dim=3), seed=0)
    dp.observe_public(public, public_labels, "hinge", 1.0, 1.0)
    basis = dp.subspace.basis()
    assert basis.shape[1] == 3
    # float32 SVD over ~10^5 coordinates: rounding of order sqrt(d) x 6e-8, depending on the thread count
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=2e-4, rtol=0)
    noisy, _ = dp.discriminator_gradient(real, labels, "hinge", 1.0, 1.0)
    vector = _flat(noisy)
    # Everything the step adds, signal and noise, is in the span: its projection is itself.
    torch.testing.assert_close(basis @ (basis.T @ vector), vector, atol=1e-6, rtol=1e-4)
    assert dp.history == [(1.0, 0.1, 1)]
    # The noise's norm is about sigma C sqrt(k) / B, not sigma C sqrt(d) / B (d > 100,000 here).
    quiet = DPTraining(model, _plan(sigma=1e-9, dim=3), seed=0)
    quiet.observe_public(public, public_labels, "hinge", 1.0, 1.0)
    signal = _flat(quiet.discriminator_gradient(real, labels, "hinge", 1.0, 1.0)[0])
    assert vector.numel() > 100_000
    assert float((vector - signal).norm()) < 0.05 * 1.0 * (3 ** 0.5) * 4 / 4
    # The clipped coefficients bound the signal: |sum_i clip(c_i)| / B <= C.
    assert float(signal.norm()) <= 0.05 * (1 + 1e-4)


def test_without_a_subspace_the_noise_spans_every_covered_parameter(tiny_cfg: ModelConfig) -> None:
    model = build_model(tiny_cfg, 5, seed=0)
    real, labels = _images(4, 1)
    noisy = _flat(DPTraining(model, _plan(sigma=1.0, dim=None), seed=0)
                  .discriminator_gradient(real, labels, "hinge", 1.0, 1.0)[0])
    assert float(noisy.norm()) > 0.05 * (noisy.numel() ** 0.5) / 4 * 0.9


def test_the_subspace_follows_the_last_steps_generated_images_only(tiny_cfg: ModelConfig) -> None:
    model = build_model(tiny_cfg, 5, seed=0)
    dp = DPTraining(model, _plan(sigma=1.0, dim=50, history=2), seed=0)
    for seed in (3, 4, 5):
        dp.observe_public(*_images(4, seed), "hinge", 1.0, 1.0)
    assert len(dp.subspace.recent) == 2
    assert dp.subspace.basis().shape[1] == 8  # at most the 2 x 4 gradients kept
    with pytest.raises(RuntimeError, match="no generated-image gradient"):
        DPTraining(model, _plan(sigma=1.0, dim=3), seed=0).discriminator_gradient(*_images(2, 1), "hinge", 1.0, 1.0)


def test_the_subspace_is_refused_where_it_cannot_work() -> None:
    base = {"enabled": True, "scope": "discriminator", "clipping": "vmap", "subspace_dim": 16}
    assert privacy_config(base).subspace_dim == 16
    for change in ({"clipping": "bookkeeping"}, {"scope": "classifier"}, {"subspace_dim": 0}):
        with pytest.raises(ConfigError, match="subspace_dim"):
            privacy_config({**base, **change})
    with pytest.raises(ConfigError, match="only train.method=unified"):
        check_private_method("supervised", privacy_config(base))
    check_private_method("unified", privacy_config(base))
    assert dataclasses.replace(privacy_config(base), subspace_dim=None).subspace_dim is None
