"""Privacy accounting with Opacus' accountants, from a stored history, and the per-round plan.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, Opacus' own format
(``IAccountant.history``): composing a history with RDP or PRV gives the epsilon at a delta of the
Poisson-subsampled Gaussian mechanism run for those steps, under the add/remove-one neighbouring
relation, each entry's noise being ``noise_multiplier`` times the L2 sensitivity of one patch.
Histories are restored into a fresh accountant whenever needed, so nothing depends on one
``PrivacyEngine`` living across rounds.

Add/remove-one holds exactly because nothing the mechanism uses depends on the training-set size
n or the labelled count except through one Gaussian release of both (``counts_noise_multiplier``,
an entry with sample rate 1 in the same history): the sampling rate ``q = B / n~``, the divisor B
(the configured batch size), the labelled-loss scale ``n~ / l~`` and the aggregation weights all
come from the released noisy counts, so adding or removing one patch changes the sum of clipped
per-sample gradients by that patch's own term only (norm <= C, the clipping norm).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
from opacus.accountants.analysis.prv.domain import compute_safe_domain_size
from opacus.accountants.utils import get_noise_multiplier

from common.config import ConfigError
from common.privacy.config import ACCOUNTANTS, PrivacyConfig

History = list[tuple[float, float, int]]

MECHANISM = ("Sampled Gaussian mechanism (DP-SGD): Poisson subsampling, per-sample gradient clipping, "
             "Gaussian noise on the sum of clipped gradients")
NEIGHBOURING = ("add/remove one training patch of the hospital's training split (example-level; a patient "
                "with several patches is covered only as far as group privacy allows). The mechanism never uses the "
                "exact training-set size or labelled count: they are released once per data set with Gaussian noise "
                "(accounted), and only these noisy counts set the sampling rate, the loss scale and the aggregation "
                "weights, so one patch changes a step's sum of clipped gradients by at most C (with "
                "privacy.scope=classifier the class counts are still sent, outside the guarantee)")
COUNTS_MECHANISM = ("Gaussian mechanism on (training-set size, labelled count), L2 sensitivity sqrt(2) under add/remove-one, "
                    "released once per hospital and data set and reused")
CENTRE_MECHANISM = ("Gaussian mechanism on the sum of the head's input features over the training patches, each "
                    "patch's vector clipped to an L2 norm of R (sensitivity R under add/remove-one), divided by the "
                    "released size; once per run, before the first DP-SGD step, then averaged over the hospitals")
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


#: The most memory one PRV computation may take, MiB. Opacus' PRV accountant discretises the privacy
#: loss on a grid whose size grows without bound as the noise falls and the steps grow (noise 0.05 at
#: sampling rate 0.05 asks for 1.3e9 points, about 87 GiB, after 500 steps), and the coordinator
#: chooses both. A fixed bound, not a config key: the coordinator must not be able to raise it.
PRV_MAX_MIB = 512
#: What the report says where PRV's epsilon is not computed.
PRV_NOT_COMPUTED = (f"not computed: Opacus' PRV grid for this history would take more than {PRV_MAX_MIB} MiB (the noise is "
                    f"too small, or the steps too many, for a meaningful guarantee); RDP's epsilon, an upper bound "
                    f"as well, stands in wherever prv is the configured accountant")
#: Bytes per grid point of Opacus' PRV (measured with tracemalloc, Opacus 1.6: 67 for one history
#: entry, 120 for three), bounded above by 8 x (6 + 4 x entries).
_PRV_BYTES_PER_POINT_AND_ENTRY = (48, 32)
#: Opacus' defaults for PRV's precision (``PRVAccountant.get_epsilon``).
_PRV_EPS_ERROR = 0.01


def prv_grid_points(history: Sequence[Sequence[float]], delta: float) -> int:
    """The size of the grid Opacus' PRV accountant would build for ``history`` at ``delta`` (its own
    domain rule: ``PRVAccountant._get_domain``), computed from RDP alone, without building it."""
    return _prv_grid_points(tuple(compact(history)), float(delta))


@lru_cache(maxsize=512)
def _prv_grid_points(hist: tuple[tuple[float, float, int], ...], delta: float) -> int:
    """``prv_grid_points`` of a compacted history (cached: the report and the budget check ask
    about the same histories, and each answer costs several RDP evaluations)."""
    if not hist:
        return 0
    delta_error = float(delta) / 1000  # Opacus' default
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in hist]
    compositions = [steps for _, _, steps in hist]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half_width = compute_safe_domain_size(prvs=prvs, max_self_compositions=compositions,
                                              eps_error=_PRV_EPS_ERROR, delta_error=delta_error)
    mesh = _PRV_EPS_ERROR / math.sqrt(sum(compositions) * math.log(12 / delta_error) / 2)
    return int(math.ceil(2 * half_width / mesh)) + 2


def prv_mib(history: Sequence[Sequence[float]], delta: float) -> float:
    """An upper estimate of the memory Opacus' PRV accountant takes for ``history``, MiB."""
    per_point, per_entry = _PRV_BYTES_PER_POINT_AND_ENTRY
    return prv_grid_points(history, delta) * (per_point + per_entry * len(compact(history))) / 2**20


def prv_computable(history: Iterable[Sequence[float]], delta: float) -> bool:
    """Whether PRV's epsilon for ``history`` fits in ``PRV_MAX_MIB`` (else RDP's stands in for it)."""
    return prv_mib(list(history), delta) <= PRV_MAX_MIB


@lru_cache(maxsize=512)
def _epsilon(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not history:
        return 0.0
    if kind == "prv" and not prv_computable(history, delta):
        # RDP's epsilon is an upper bound too (looser): the budget is never under-counted.
        kind = "rdp"
    with warnings.catch_warnings():
        # RDP warns when the best order is the largest one tried: the bound is still valid.
        warnings.simplefilter("ignore")
        return float(make_accountant(kind, history).get_epsilon(delta=delta))


def epsilon(history: Iterable[Sequence[float]], delta: float, kind: str) -> float:
    """Epsilon at ``delta`` after ``history``, by Opacus' ``kind`` accountant (0 for no steps).

    ``prv`` whose grid would take more than ``PRV_MAX_MIB`` gives RDP's epsilon instead: an upper
    bound as well, so a budget judged by it is never under-counted (see :func:`prv_computable`)."""
    return _epsilon(kind, tuple(compact(history)), float(delta))


def epsilons(history: Iterable[Sequence[float]], delta: float) -> dict[str, float | None]:
    """Epsilon by every accountant (rdp and prv side by side); prv is None where it is not computed
    (its grid would take more than ``PRV_MAX_MIB``)."""
    hist = compact(history)
    return {kind: epsilon(hist, delta, kind) if kind != "prv" or prv_computable(hist, delta) else None
            for kind in ACCOUNTANTS}


@lru_cache(maxsize=64)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str,
                     before: History = ()) -> float:
    """The noise multiplier whose ``steps`` steps at ``sample_rate`` reach ``target_epsilon``, after
    the releases ``before`` (history entries; e.g. the head centre's) where there are any.

    RDP: Opacus' search. PRV: the same search (raise the noise until epsilon <= target, then bisect
    to within 0.01 of it) on :func:`epsilon`, whose memory is bounded; where PRV is not computable
    RDP stands in, which only ever asks for more noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rdp_sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                                   sample_rate=sample_rate, steps=steps, accountant="rdp"))
        except ValueError as error:
            raise ConfigError(f"privacy.target_epsilon={target_epsilon}: {error}") from error
    if kind == "rdp" and not before:
        return rdp_sigma
    return _bisect_noise(lambda sigma: epsilon([*before, (sigma, sample_rate, steps)], delta, kind), target_epsilon,
                         rdp_sigma)


def _bisect_noise(epsilon_at: Callable[[float], float], target: float, start: float, tolerance: float = 0.01) -> float:
    """The smallest noise (to ``tolerance`` in epsilon) whose ``epsilon_at`` is <= ``target``,
    searching from ``start`` (Opacus' ``get_noise_multiplier`` rule)."""
    high = start
    while epsilon_at(high) > target:
        high *= 2
        if high > 1e6:
            raise ConfigError(f"privacy.target_epsilon={target}: no noise multiplier reaches it")
    low = 0.0
    while True:
        mid = (low + high) / 2
        if mid <= 0 or high - low < 1e-6:
            return high
        eps = epsilon_at(mid)
        if eps < target:
            high = mid
            if target - eps < tolerance:
                return high
        else:
            low = mid


def default_delta(num_examples: int) -> float:
    """min(1e-5, 1 / (10 n)): always well below 1/n."""
    return min(1e-5, 0.1 / max(1, num_examples))


def counts_noise_multiplier(noise_std: float) -> float:
    """Noise multiplier of the count release: adding or removing one patch changes the size by 1
    and the labelled count by at most 1 (L2 sensitivity sqrt(2)), so noise std s is s / sqrt(2)."""
    return float(noise_std) / math.sqrt(2.0)


def counts_entry(noise_std: float) -> tuple[float, float, int]:
    """The count release's accountant history entry: one Gaussian step at sample rate 1."""
    return (counts_noise_multiplier(noise_std), 1.0, 1)


def noisy_counts(examples: int, labelled: int, noise_std: float, generator: torch.Generator) -> tuple[int, int]:
    """(n~, l~): the counts plus N(0, s^2) each, rounded and clamped to 1 <= n~ and 0 <= l~ <= n~
    (post-processing: the clamps use nothing but the noisy values)."""
    noise = torch.normal(0.0, float(noise_std), size=(2,), generator=generator, dtype=torch.float64)
    n = max(1, round(float(examples) + float(noise[0])))
    return n, min(n, max(0, round(float(labelled) + float(noise[1]))))


@dataclass(frozen=True)
class PrivacyPlan:
    """One hospital's DP-SGD parameters for a round: all public, from config and the released counts."""

    scope: str
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    expected_batch: int  # B: the configured batch size; the divisor of the noisy sum
    sample_rate: float  # q = min(1, B / n~)
    delta: float
    steps_per_round: int
    planned_rounds: int
    num_examples: int  # n~: the released (noisy) training-set size, never the exact one
    labelled_fraction: float  # l~ / n~ from the released counts
    max_epsilon: float | None
    clipping: str = "bookkeeping"  # how the clipped sum is computed (common/privacy/bookkeeping.py or torch.func)
    #: scope=discriminator, unified step: each generated image's D/C gradient is clipped too, to C / m for m
    #: generated images (so their sum is bounded by C, as the real patches' clipped sum / B is); public, no noise.
    clip_generated: bool = True
    #: scope=discriminator: project the real gradients on the top-k directions of recent generated-image
    #: gradients before clipping and noise (common/privacy/subspace.py); None: off.
    subspace_dim: int | None = None
    subspace_history: int = 4
    #: scope=discriminator, unified step: the weight of D's adversarial losses (real and generated halves)
    #: against the classification losses inside each clipped per-patch gradient.
    adversarial_weight: float = 0.2
    #: scope=discriminator, unified step: the share s of C^2 for the discriminator's parameters when the
    #: real patches' gradients are clipped part by part (D's to sqrt(s) C, the head's to sqrt(1 - s) C;
    #: each patch's whole gradient still has norm <= C); None: one flat clip to C over both.
    discriminator_clip_share: float | None = None
    #: scope=discriminator: views per real patch, averaged before clipping (augmentation multiplicity).
    augmentations: int = 1
    #: scope=discriminator: the trunk stays at its (public) initial weights; DP-SGD trains the heads only.
    freeze_trunk: bool = False

    def next_round(self) -> tuple[float, float, int]:
        """The history entry the coming round adds if it trains."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def build_plan(cfg: PrivacyConfig, num_examples: int, num_labelled: int, batch_size: int,
               steps_per_round: int, planned_rounds: int, max_epsilon: float | None = None,
               before: History = ()) -> PrivacyPlan:
    """The plan for a hospital whose released counts are ``num_examples`` and ``num_labelled``;
    ``before``: the releases the run makes besides its DP-SGD steps that target_epsilon includes
    (the count release and, with model.classifier_centre, the head centre's).

    Pass the noisy released counts, never the exact ones (the guarantee depends on it).
    ``max_epsilon`` (when given) replaces ``cfg.max_epsilon`` (a hospital's stricter budget).
    """
    if num_examples < 1:
        raise ConfigError(f"DP-SGD needs a released training-set size >= 1, got {num_examples}")
    expected = int(batch_size)
    if expected < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {batch_size}")
    q = min(1.0, expected / num_examples)
    delta = float(cfg.delta) if cfg.delta is not None else default_delta(num_examples)
    if not delta < 1.0 / num_examples:
        raise ConfigError(f"privacy.delta={delta:g} is not below 1/n = {1.0 / num_examples:g} for this hospital's "
                          f"{num_examples} released training patches (a delta that large allows releasing a patch "
                          f"outright)")
    if cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
    else:
        assert cfg.target_epsilon is not None
        if before and epsilon(list(before), delta, cfg.accountant) >= float(cfg.target_epsilon):
            raise ConfigError(
                f"privacy.target_epsilon={cfg.target_epsilon:g}: the releases before DP-SGD alone (the count "
                f"release, privacy.count_noise_std={cfg.count_noise_std:g}, and the head centre's, "
                f"privacy.centre_noise_multiplier={cfg.centre_noise_multiplier:g}, where there is one) cost epsilon "
                f"{epsilon(list(before), delta, cfg.accountant):.3g} at delta {delta:.3g}, leaving nothing for DP-SGD; "
                f"raise their noise (centre: 12 at epsilon 1, docs/privacy.md) or the target")
        sigma = noise_for_target(float(cfg.target_epsilon), delta, q, int(planned_rounds) * int(steps_per_round),
                                 cfg.accountant, tuple(before))
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"privacy: noise multiplier {sigma} is not a positive number")
    return PrivacyPlan(
        scope=cfg.scope, accountant=cfg.accountant, noise_multiplier=sigma, max_grad_norm=float(cfg.max_grad_norm),
        expected_batch=expected, sample_rate=q, delta=delta, steps_per_round=int(steps_per_round),
        planned_rounds=int(planned_rounds), num_examples=int(num_examples),
        labelled_fraction=(num_labelled / num_examples) if num_labelled > 0 else 1.0,
        max_epsilon=max_epsilon if max_epsilon is not None else (None if cfg.max_epsilon is None else float(cfg.max_epsilon)),
        clipping=cfg.clipping, clip_generated=bool(cfg.clip_generated),
        subspace_dim=cfg.subspace_dim, subspace_history=int(cfg.subspace_history),
        adversarial_weight=float(cfg.adversarial_weight), discriminator_clip_share=cfg.discriminator_clip_share,
        augmentations=int(cfg.augmentation_multiplicity),
        freeze_trunk=bool(cfg.freeze_trunk),
    )
