"""Dynamic multi-loss weighting by homoscedastic uncertainty (Kendall, Gal & Cipolla 2018).

``L = sum_i exp(-s_i) * L_i + s_i`` with one learnable ``s_i = log sigma_i^2`` per balanced loss.
At its optimum ``s_i = log L_i``, so a loss that runs 100 times larger gets a 100 times smaller
weight. An optional *anchor* (the real-label cross-entropy by default) keeps a fixed weight: the
other losses are weighed against it, and it is never lowered because it is still large. The ``s_i``
are a hospital's own state: they are never part of the model that is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common.config import defaults_from_conf

WEIGHTABLE_LOSSES = ("cls_real", "cls_synthetic", "cls_pseudo", "adv_discriminator")


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "weighting")
class WeightingConfig:
    """``conf/train/*.yaml``: ``weighting``."""

    enabled: bool
    include_adversarial: bool  # also balance D's adversarial loss
    init_log_variance: float
    log_variance_bounds: tuple[float, float]  # weight exp(-s) in [e^-6, 1]: finite as a loss -> 0
    fixed_weights: dict[str, float]  # used when disabled (default 1), and for the anchor
    anchor: str | None  # the loss with a fixed weight even when enabled (None: every loss learned)

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_variance_bounds", tuple(float(b) for b in self.log_variance_bounds))
        object.__setattr__(self, "fixed_weights", dict(self.fixed_weights))
        low, high = self.log_variance_bounds
        if not low < high:
            raise ValueError(f"log_variance_bounds must be (low, high) with low < high, got {self.log_variance_bounds}")
        if self.anchor is not None and self.anchor not in WEIGHTABLE_LOSSES:
            raise ValueError(f"weighting.anchor must be null or one of {WEIGHTABLE_LOSSES}, got {self.anchor!r}")


class DynamicLossWeighting(nn.Module):
    """Learnable log-variances for the named losses, combined into one objective."""

    def __init__(self, names: Sequence[str], cfg: WeightingConfig) -> None:
        super().__init__()
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"loss names must be distinct and non-empty, got {list(names)}")
        self.names = tuple(names)
        self.cfg = cfg
        self.anchor = cfg.anchor if cfg.anchor in self.names else None
        self.learned = tuple(n for n in self.names if n != self.anchor)  # one log-variance each
        self.log_vars = nn.Parameter(torch.full((len(self.learned),), float(cfg.init_log_variance)))
        self.project_()

    def _index(self, name: str) -> int:
        try:
            return self.learned.index(name)
        except ValueError:
            raise KeyError(f"loss {name!r} is not weighted; weighted losses: {self.names}") from None

    def clamped(self) -> torch.Tensor:
        """The log-variances (kept inside the bounds by ``project_``)."""
        return self.log_vars

    @torch.no_grad()
    def project_(self) -> None:
        """Put the log-variances back inside ``log_variance_bounds``; call after each optimiser step.

        Projection, not a clamp in the forward pass: a clamped value has zero gradient at the bound,
        so a log-variance that starts there would never move.
        """
        low, high = self.cfg.log_variance_bounds
        self.log_vars.clamp_(low, high)

    def weights(self) -> dict[str, float]:
        """Current multiplier of each loss: exp(-s_i), or the fixed weight when disabled."""
        fixed = {n: float(self.cfg.fixed_weights.get(n, 1.0)) for n in self.names}
        if not self.cfg.enabled:
            return fixed
        learned = dict(zip(self.learned, torch.exp(-self.clamped()).tolist()))
        return {n: learned.get(n, fixed[n]) for n in self.names}

    def log_variances(self) -> dict[str, float]:
        """The learned ``s_i`` by loss name (the anchor has none)."""
        return dict(zip(self.learned, self.clamped().tolist()))

    def combine(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the given losses (a subset of ``names``; absent ones are skipped)."""
        total: torch.Tensor | None = None
        s = self.clamped()
        for name, loss in losses.items():
            if name not in self.names:
                raise KeyError(f"loss {name!r} is not weighted; weighted losses: {self.names}")
            if self.cfg.enabled and name != self.anchor:
                i = self._index(name)
                term = torch.exp(-s[i]) * loss + s[i]
            else:
                term = self.cfg.fixed_weights.get(name, 1.0) * loss
            total = term if total is None else total + term
        if total is None:
            raise ValueError("combine() needs at least one loss")
        return total
