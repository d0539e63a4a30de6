"""DP noise drawn ahead on a host thread (common/privacy/noise.py): the same numbers in the same
order as drawn in place, so a prefetching step trains exactly as one that does not."""

from __future__ import annotations

import pytest
import torch

from common.model import ModelConfig, build_model
from common.privacy.accounting import PrivacyPlan
from common.privacy.budget import private_train_config
from common.privacy.config import PrivacyConfig
from common.privacy.noise import NoiseSource
from common.privacy.wiring import DPTraining
from common.train import LocalTrainer, TrainConfig
from common.train.selection import SelectionConfig


def _plan(scope: str, batch: int = 6) -> PrivacyPlan:
    return PrivacyPlan(scope=scope, accountant="rdp", noise_multiplier=1.0, max_grad_norm=0.5,
                       expected_batch=batch, sample_rate=batch / 40, delta=1e-5, steps_per_round=3,
                       planned_rounds=2, num_examples=40, labelled_fraction=0.5, max_epsilon=None)


def test_prefetched_draws_equal_draws_in_place() -> None:
    shapes = [(3, 4), (5,), (2, 2, 2)]
    in_place = NoiseSource(torch.Generator().manual_seed(9), shapes, std=0.7)
    ahead = NoiseSource(torch.Generator().manual_seed(9), shapes, std=0.7)
    try:
        for step in range(3):
            if step != 1:  # a step without a prefetch in between still stays in step
                ahead.prefetch()
                ahead.prefetch()  # a second call while one is pending draws nothing more
            want, got = in_place.take(), ahead.take()
            assert [tuple(t.shape) for t in got] == shapes
            for w, g in zip(want, got):
                assert torch.equal(w, g)
            assert float(torch.cat([g.flatten() for g in got]).std()) > 0.3  # real noise, not zeros
    finally:
        ahead.close()


@pytest.mark.parametrize("scope", ["discriminator", "classifier"])
def test_a_prefetching_dp_step_trains_exactly_as_one_without(tiny_cfg: ModelConfig, scope: str) -> None:
    results = {}
    for prefetch in (False, True):
        model = build_model(tiny_cfg, 5, seed=0)
        dp = DPTraining(model, _plan(scope), seed=3)
        dp.prefetch_noise = prefetch
        cfg = private_train_config(
            TrainConfig(batch_size=6, selection=SelectionConfig(warmup_steps=0, min_history=1, confidence_threshold=0.0)),
            PrivacyConfig(enabled=True, scope=scope))
        trainer = LocalTrainer(model, cfg, seed=0, privacy=dp)
        torch.manual_seed(4)
        losses = [trainer.unified_step(torch.rand(size, 3, 32, 32) * 2 - 1, torch.arange(size) % 5)
                  for size in (6, 0, 4)]
        assert (dp.noise._pending is not None) is False  # every prefetched draw was used
        dp.noise.close()
        results[prefetch] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
    assert results[True][0] == results[False][0]
    for name, want in results[False][1].items():
        assert torch.equal(results[True][1][name], want), name


def test_noise_for_other_parameters_or_another_sigma_is_refused(tiny_cfg: ModelConfig) -> None:
    dp = DPTraining(build_model(tiny_cfg, 5, seed=0), _plan("classifier"), seed=1)
    zeros = {n: torch.zeros(p.shape) for n, p in dp.adapter.named_parameters() if n in dp.names}
    with pytest.raises(RuntimeError, match="not the covered ones in order"):
        dp.add_noise(dict(reversed(list(zeros.items()))))
    dp.noise.std = 0.1  # no longer sigma * C = 0.5
    with pytest.raises(RuntimeError, match="std no longer matches"):
        dp.add_noise(zeros)
    assert dp.steps_total == 0
