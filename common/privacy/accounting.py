"""Privacy accounting with Opacus' accountants, from a stored history, and the per-round plan.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, Opacus' own format
(``IAccountant.history``): composing a history with RDP or PRV gives the epsilon at a delta of the
Poisson-subsampled Gaussian mechanism run for those steps, under the add/remove-one neighbouring
relation. Histories are restored into a fresh accountant whenever needed, so nothing depends on one
``PrivacyEngine`` living across rounds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import ConfigError
from common.privacy.config import ACCOUNTANTS, PrivacyConfig

History = list[tuple[float, float, int]]

MECHANISM = ("Sampled Gaussian mechanism (DP-SGD): Poisson subsampling, per-sample gradient clipping, "
             "Gaussian noise on the sum of clipped gradients")
NEIGHBOURING = ("add/remove one training patch of the hospital's training split (example-level; a patient "
                "with several patches is covered only as far as group privacy allows)")
SAMPLING = ("Poisson: each training patch joins each step's batch independently with probability q "
            "(batches vary in size and can be empty; every noisy step is counted)")


def compact(history: Iterable[Sequence[float]]) -> History:
    """Entries as typed tuples, consecutive ones with equal noise and sampling rate merged."""
    out: History = []
    for entry in history:
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if steps < 0:
            raise ValueError(f"negative step count in privacy history: {entry}")
        if steps == 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def total_steps(history: Iterable[Sequence[float]]) -> int:
    return int(sum(int(e[2]) for e in history))


def make_accountant(kind: str, history: Iterable[Sequence[float]] = ()) -> IAccountant:
    """A fresh Opacus accountant of ``kind`` (rdp | prv) restored to ``history``."""
    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")
    accountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    accountant.history = list(compact(history))
    return accountant


@lru_cache(maxsize=512)
def _epsilon(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not history:
        return 0.0
    with warnings.catch_warnings():
        # RDP warns when the best order is the largest one tried: the bound is still valid.
        warnings.simplefilter("ignore")
        return float(make_accountant(kind, history).get_epsilon(delta=delta))


def epsilon(history: Iterable[Sequence[float]], delta: float, kind: str) -> float:
    """Epsilon at ``delta`` after ``history``, by Opacus' ``kind`` accountant (0 for no steps)."""
    return _epsilon(kind, tuple(compact(history)), float(delta))


def epsilons(history: Iterable[Sequence[float]], delta: float) -> dict[str, float]:
    """Epsilon by every accountant (rdp and prv side by side)."""
    hist = compact(history)
    return {kind: epsilon(hist, delta, kind) for kind in ACCOUNTANTS}


@lru_cache(maxsize=64)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str) -> float:
    """Opacus' noise multiplier whose ``steps`` steps at ``sample_rate`` reach ``target_epsilon``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=kind))
        except ValueError as error:
            raise ConfigError(f"privacy.target_epsilon={target_epsilon}: {error}") from error


def default_delta(num_examples: int) -> float:
    """min(1e-5, 1 / (10 n)): always well below 1/n."""
    return min(1e-5, 0.1 / max(1, num_examples))


@dataclass(frozen=True)
class PrivacyPlan:
    """One hospital's DP-SGD parameters for a round (all public, derived from config and n)."""

    scope: str
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    expected_batch: int  # B: real patches a step draws on average, and the fixed generated count
    sample_rate: float  # q = B / n
    delta: float
    steps_per_round: int
    planned_rounds: int
    num_examples: int
    labelled_fraction: float  # public: the labelled count is shared as an aggregation weight
    max_epsilon: float | None

    def next_round(self) -> tuple[float, float, int]:
        """The history entry the coming round adds if it trains."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def build_plan(cfg: PrivacyConfig, num_examples: int, num_labelled: int, batch_size: int,
               steps_per_round: int, planned_rounds: int) -> PrivacyPlan:
    """The plan for a hospital with ``num_examples`` training patches."""
    if num_examples < 2:
        raise ConfigError(f"DP-SGD needs at least 2 training patches, got {num_examples}")
    expected = min(int(batch_size), int(num_examples))
    q = expected / num_examples
    delta = float(cfg.delta) if cfg.delta is not None else default_delta(num_examples)
    if not delta < 1.0 / num_examples:
        raise ConfigError(f"privacy.delta={delta:g} is not below 1/n = {1.0 / num_examples:g} for this hospital's "
                          f"{num_examples} training patches (a delta that large allows releasing a patch outright)")
    if cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
    else:
        assert cfg.target_epsilon is not None
        sigma = noise_for_target(float(cfg.target_epsilon), delta, q, int(planned_rounds) * int(steps_per_round),
                                 cfg.accountant)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"privacy: noise multiplier {sigma} is not a positive number")
    return PrivacyPlan(
        scope=cfg.scope, accountant=cfg.accountant, noise_multiplier=sigma, max_grad_norm=float(cfg.max_grad_norm),
        expected_batch=expected, sample_rate=q, delta=delta, steps_per_round=int(steps_per_round),
        planned_rounds=int(planned_rounds), num_examples=int(num_examples),
        labelled_fraction=(num_labelled / num_examples) if num_labelled > 0 else 1.0,
        max_epsilon=None if cfg.max_epsilon is None else float(cfg.max_epsilon),
    )
