"""Learning-rate schedules: cosine decay to 0 over the run, an optional linear warm-up."""

from __future__ import annotations

import math

import pytest

from common.train.config import OptimConfig, learning_rate_factor


def test_cosine_decays_from_one_to_zero_over_the_run() -> None:
    cfg = OptimConfig(schedule="cosine", schedule_steps=100)
    assert learning_rate_factor(cfg, 0) == 1.0
    assert learning_rate_factor(cfg, 50) == pytest.approx(0.5)
    assert learning_rate_factor(cfg, 100) == pytest.approx(0.0, abs=1e-12)


def test_warm_up_rises_linearly_then_follows_the_schedule() -> None:
    cfg = OptimConfig(schedule="cosine", schedule_steps=100, warmup_fraction=0.1)  # 10 warm-up steps
    assert learning_rate_factor(cfg, 0) == pytest.approx(0.1 * 1.0)
    assert learning_rate_factor(cfg, 4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.04)))
    assert learning_rate_factor(cfg, 9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.09)))
    assert learning_rate_factor(cfg, 50) == pytest.approx(0.5)
    constant = OptimConfig(schedule="constant", schedule_steps=20, warmup_fraction=0.5)
    assert [learning_rate_factor(constant, s) for s in (0, 9, 10)] == pytest.approx([0.1, 1.0, 1.0])
    assert learning_rate_factor(OptimConfig(warmup_fraction=0.5), 0) == 1.0  # no length known: no warm-up


def test_a_warm_up_of_the_whole_run_is_refused() -> None:
    with pytest.raises(ValueError, match="warmup_fraction"):
        OptimConfig(warmup_fraction=1.0)
