"""Dynamic multi-loss weighting (uncertainty weighting) learns to down-weight large losses."""

from __future__ import annotations

import pytest
import torch

from common.train.weighting import DynamicLossWeighting, WeightingConfig


def test_log_variances_move_and_a_100x_loss_gets_a_smaller_weight() -> None:
    weighting = DynamicLossWeighting(["small", "large"], WeightingConfig())
    opt = torch.optim.Adam(weighting.parameters(), lr=0.05)
    before = weighting.log_vars.detach().clone()
    for _ in range(400):
        base = torch.tensor(0.7)
        loss = weighting.combine({"small": base, "large": 100.0 * base})
        opt.zero_grad()
        loss.backward()
        opt.step()
        weighting.project_()
    assert not torch.allclose(weighting.log_vars.detach(), before)
    weights = weighting.weights()
    assert weights["large"] < weights["small"]
    # At the optimum exp(-s_i) = 1 / L_i; with the default bounds (weights <= 1) the small loss's
    # weight stays at 1 and the large one's approaches 1/70, so the ratio approaches 70.
    assert weights["small"] == 1.0
    assert 50.0 < weights["small"] / weights["large"] < 90.0


def test_a_log_variance_starting_at_its_bound_still_moves_inward() -> None:
    weighting = DynamicLossWeighting(["x"], WeightingConfig(init_log_variance=0.0, log_variance_bounds=(0.0, 6.0)))
    opt = torch.optim.Adam(weighting.parameters(), lr=0.1)
    for _ in range(20):
        loss = weighting.combine({"x": torch.tensor(5.0)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        weighting.project_()
    assert float(weighting.log_vars.detach()) > 0.5


def test_disabled_weighting_uses_fixed_weights() -> None:
    weighting = DynamicLossWeighting(["a", "b"], WeightingConfig(enabled=False, fixed_weights={"b": 0.5}))
    total = weighting.combine({"a": torch.tensor(2.0), "b": torch.tensor(4.0)})
    assert float(total) == 4.0
    assert weighting.weights() == {"a": 1.0, "b": 0.5}


def test_weights_stay_finite_when_a_loss_vanishes() -> None:
    cfg = WeightingConfig(log_variance_bounds=(-3.0, 3.0))
    weighting = DynamicLossWeighting(["x"], cfg)
    opt = torch.optim.Adam(weighting.parameters(), lr=0.5)
    for _ in range(200):
        loss = weighting.combine({"x": torch.tensor(1e-9)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        weighting.project_()
    assert abs(weighting.weights()["x"] - float(torch.exp(torch.tensor(3.0)))) < 1e-3


def _train_weights(weighting: DynamicLossWeighting, losses: dict[str, float], steps: int = 300) -> None:
    opt = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(steps):
        total = weighting.combine({k: torch.tensor(v) for k, v in losses.items()})
        opt.zero_grad()
        total.backward()
        opt.step()
        weighting.project_()


def test_the_anchor_keeps_weight_one_while_a_large_auxiliary_loss_is_lowered() -> None:
    # A real-label loss of 2.3 (ten classes, early in training) is not lowered when it is the anchor;
    # without the anchor it is (Kendall's optimum 1/2.3), which let D's term dominate the shared trunk.
    losses = {"cls_real": 2.3, "cls_synthetic": 4.0}
    anchored = DynamicLossWeighting(list(losses), WeightingConfig(anchor="cls_real"))
    _train_weights(anchored, losses)
    assert anchored.learned == ("cls_synthetic",) and anchored.log_vars.shape == (1,)
    assert anchored.weights()["cls_real"] == 1.0
    assert anchored.weights()["cls_synthetic"] < 0.4
    assert set(anchored.log_variances()) == {"cls_synthetic"}
    free = DynamicLossWeighting(list(losses), WeightingConfig(anchor=None))
    _train_weights(free, losses)
    assert free.weights()["cls_real"] < 0.6


def test_the_anchor_term_is_its_loss_times_its_fixed_weight() -> None:
    weighting = DynamicLossWeighting(["cls_real", "cls_synthetic"],
                                     WeightingConfig(anchor="cls_real", fixed_weights={"cls_real": 2.0}))
    total = weighting.combine({"cls_real": torch.tensor(3.0)})
    assert float(total) == 6.0
    assert weighting.weights()["cls_real"] == 2.0


def test_an_anchor_that_is_no_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="weighting.anchor"):
        WeightingConfig(anchor="cls_rael")
