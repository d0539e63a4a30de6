"""The server's aggregation math, with no Flower types: per-group rules with bounded influence.

Each group (generator, discriminator, classifier) is aggregated on its own, or kept as it is when
the group is local to the hospitals. A group's rule is one of

- ``fedavg``: the weighted mean, each hospital's share of the weight capped at ``max_weight_share``
  (the excess is spread over the others in proportion to their weights). ``auto`` (the default)
  caps it at ``auto_weight_share(n) = max(2 / n, 0.5)`` for the ``n`` hospitals taking part: with 3
  no hospital has more than two thirds, with 4 or more none has more than half, with 2 or fewer the
  cap is off (a cap of 0.5 would force equal weights, and no cap can stop one of two);
- ``median``: the coordinate-wise median (Yin et al., 2018), as Flower's ``FedMedian``;
- ``trimmed_mean``: per coordinate, drop the ``int(trim_fraction * n)`` largest and smallest values
  and average the rest, as Flower's ``FedTrimmedAvg``.

Median and trimmed mean count every hospital once (weights only decide who takes part: a
hospital whose weight for the group is 0 does not). Before any rule, ``clip_update_norm = k``
clips each hospital's update (its group minus the current global group) to ``k`` times the median
update norm of the round: the learnt weights' part and the derived buffers' part
(``common.model.DERIVED_STATE``, the head's centre and whitening, which every hospital derives alike)
each against its own median.

Memory. ``fedavg`` is a running weighted sum in float64, never a stack of the updates: over
updates already in memory (the server's case: Flower hands it a round's replies together) one key
at a time (``weighted_mean``: O(largest key) beyond the result), or over updates that arrive one
at a time (``WeightedSum``: O(model)); neither keeps or copies an update. Clipping only needs each
update's norm first (one pass, key by key), and the weight cap only the weights. ``median`` and
``trimmed_mean`` genuinely need every hospital's value of a coordinate at once: they stack the
updates one key at a time (O(hospitals x largest key)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common import protocol
from common.model import is_derived_state
from common.registry import Registry

GroupArrays = Mapping[str, np.ndarray]

AUTO_SHARE = "auto"


def auto_weight_share(hospitals: int) -> float:
    """The ``auto`` cap on one hospital's share of a group's FedAvg weight: ``max(2 / n, 0.5)``, 1 for n <= 2."""
    return min(1.0, max(2.0 / max(1, hospitals), 0.5))


class AggregationError(ValueError):
    """A group cannot be aggregated under its rule this round (the message says why)."""


def _check_updates(updates: Sequence[GroupArrays]) -> list[str]:
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    keys = list(updates[0].keys())
    for i, update in enumerate(updates[1:], start=1):
        if set(update.keys()) != set(keys):
            raise ValueError(f"update {i} has other keys than update 0")
    return keys


def as_reference_dtype(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A float64 result back in the reference's dtype (integer entries rounded)."""
    if np.issubdtype(reference.dtype, np.integer) or reference.dtype == np.bool_:
        values = np.rint(values)
    return np.asarray(values).astype(reference.dtype)


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


@dataclass(frozen=True)
class Clipping:
    """Clipped updates without copies: update ``i`` stands for ``current + scales[i] * (x_i - current)``
    in its floating-point learnt entries, and with ``derived_scales[i]`` in its derived buffers
    (``common.model.DERIVED_STATE``; the learnt scale when None). Integer entries are never clipped."""

    current: GroupArrays
    scales: Sequence[float]
    derived_scales: Sequence[float] | None = None

    def scales_for(self, key: str) -> Sequence[float]:
        """The per-update scales of ``key``."""
        if self.derived_scales is not None and is_derived_state(key):
            return self.derived_scales
        return self.scales


def _stack(updates: Sequence[GroupArrays], key: str, clipping: Clipping | None = None) -> np.ndarray:
    """One key of every update, stacked in float64 (clipped rows scaled towards ``current``)."""
    stacked = np.stack([np.asarray(u[key], dtype=np.float64) for u in updates])
    if clipping is not None and _is_float(np.asarray(clipping.current[key])):
        base = np.asarray(clipping.current[key], dtype=np.float64)
        scales = np.asarray(clipping.scales_for(key), dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
        stacked = base + scales * (stacked - base)
    return stacked


def _add_scaled(total: np.ndarray, value: np.ndarray, weight: float, scratch: np.ndarray) -> None:
    """``total += weight * value`` in float64 through ``scratch``: widen, scale, add (three same-dtype
    passes over a buffer that stays in cache; NumPy's mixed float32 x float64 multiply is slower)."""
    product = scratch[: total.size].reshape(total.shape)
    product[...] = value
    product *= weight
    total += product


def _checked(update: GroupArrays, key: str, shape: tuple[int, ...], index: int) -> np.ndarray:
    value = np.asarray(update[key])
    if value.shape != shape:
        raise ValueError(f"{key}: shape {value.shape} in update {index}, expected {shape}")
    return value


class WeightedSum:
    """A running ``sum_i w_i x_i`` of updates that arrive one at a time, in float64.

    It holds one float64 accumulator per key and one float64 scratch buffer the size of the largest
    key. ``add`` reads an update once and keeps no reference to it or copy of it, so the memory is
    O(model) however many updates are added. Every product is formed and added in float64.
    """

    def __init__(self, like: GroupArrays) -> None:
        self.keys = frozenset(like)
        self.sums = {key: np.zeros(np.shape(value), dtype=np.float64) for key, value in like.items()}
        self._scratch = np.empty(max((a.size for a in self.sums.values()), default=0), dtype=np.float64)
        self.updates_added = 0
        self.total_weight = 0.0

    def add(self, update: GroupArrays, weight: float, floating_weight: float | None = None) -> None:
        """Add ``weight * update`` (``floating_weight`` instead for floating-point entries, if given)."""
        if set(update.keys()) != self.keys:
            raise ValueError(f"update {self.updates_added} has other keys than update 0")
        for key, total in self.sums.items():
            value = _checked(update, key, total.shape, self.updates_added)
            w = floating_weight if floating_weight is not None and _is_float(value) else weight
            if w != 0.0:
                _add_scaled(total, value, w, self._scratch)
        self.updates_added += 1
        self.total_weight += weight

    def result(self, like: GroupArrays) -> dict[str, np.ndarray]:
        """The sums in ``like``'s dtypes (integer entries rounded)."""
        return {key: as_reference_dtype(total, np.asarray(like[key])) for key, total in self.sums.items()}

    def mean(self, like: GroupArrays) -> dict[str, np.ndarray]:
        """The sums divided by the total ``weight`` added, in ``like``'s dtypes: FedAvg of updates
        added as they arrived, their weights not known in advance."""
        if not self.total_weight > 0:
            raise ValueError("nothing to average: no update with a weight > 0 was added")
        return {key: as_reference_dtype(total / self.total_weight, np.asarray(like[key])) for key, total in self.sums.items()}


def _normalised(weights: Sequence[float], count: int) -> np.ndarray:
    if count != len(weights):
        raise ValueError(f"{count} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w.sum()):
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    return w / w.sum()


#: float32 updates are summed in float32 in blocks of this many, each block then added to the key's
#: float64 total: two same-dtype passes per update instead of three, and at most this many float32
#: roundings (about 6e-8 relative each) before the float64 sum, however many hospitals reply.
FLOAT32_BLOCK = 8


class _KeySum:
    """The float64 running sum of one key over updates in memory, float32 entries summed in blocks."""

    def __init__(self, shape: tuple[int, ...], scratch: np.ndarray) -> None:
        size = int(np.prod(shape, dtype=np.int64))
        self.total = np.zeros(shape, dtype=np.float64)
        self._wide = scratch[:size].reshape(shape)
        narrow = scratch[size : 2 * size].view(np.float32)  # 2 x size float32 in size float64
        self._product = narrow[:size].reshape(shape)
        self._block = narrow[size:].reshape(shape)
        self._in_block = 0

    def add(self, value: np.ndarray, weight: float) -> None:
        if value.dtype != np.float32:
            self._wide[...] = value
            self._wide *= weight
            self.total += self._wide
            return
        if self._in_block == 0:
            np.multiply(value, np.float32(weight), out=self._block)
        else:
            np.multiply(value, np.float32(weight), out=self._product)
            self._block += self._product
        self._in_block += 1
        if self._in_block == FLOAT32_BLOCK:
            self.flush()

    def flush(self) -> np.ndarray:
        if self._in_block:
            self.total += self._block
            self._in_block = 0
        return self.total


def weighted_mean(updates: Sequence[GroupArrays], weights: Sequence[float],
                  clipping: Clipping | None = None) -> dict[str, np.ndarray]:
    """``sum_i w_i x_i / sum_i w_i`` key by key, summed in float64, returned in each key's dtype.

    A running sum per key over updates already in memory: the key's accumulators stay in cache
    while every update's entry is added (float32 entries in float32 blocks of ``FLOAT32_BLOCK``,
    each block then added in float64), and no update is stacked or copied. Integer entries
    (counters) are averaged too and rounded back to their integer dtype. With ``clipping``, update
    ``i``'s floating-point entries count as ``c + s_i (x_i - c)``: its share ``a_i`` goes as
    ``a_i s_i`` to ``x_i`` and the rest, summed over the updates, to ``c`` once.
    """
    keys = _check_updates(updates)
    shares = [float(a) for a in _normalised(weights, len(updates))]
    scratch = np.empty(2 * max(np.asarray(updates[0][k]).size for k in keys), dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        like = np.asarray(updates[0][key])
        floating = _is_float(like)
        scales = [1.0] * len(updates) if clipping is None else [float(s) for s in clipping.scales_for(key)]
        towards_current = sum(a * (1.0 - s) for a, s in zip(shares, scales))
        running = _KeySum(like.shape, scratch)
        for index, (update, share, scale) in enumerate(zip(updates, shares, scales)):
            value = _checked(update, key, like.shape, index)
            weight = share * scale if floating else share
            if weight != 0.0:
                running.add(value, weight)
        total = running.flush()
        if clipping is not None and floating and towards_current > 0.0:
            _add_scaled(total, np.asarray(clipping.current[key]), towards_current, scratch[: total.size])
        out[key] = as_reference_dtype(total, like)
    return out


def coordinate_median(updates: Sequence[GroupArrays], clipping: Clipping | None = None) -> dict[str, np.ndarray]:
    """The coordinate-wise median of the updates (the mean of the two middle values for even n).

    Needs every update's value of a coordinate at once: stacks one key at a time."""
    keys = _check_updates(updates)
    return {key: as_reference_dtype(np.median(_stack(updates, key, clipping), axis=0), np.asarray(updates[0][key]))
            for key in keys}


def trimmed_mean(updates: Sequence[GroupArrays], trim_fraction: float,
                 clipping: Clipping | None = None) -> dict[str, np.ndarray]:
    """Per coordinate, the mean after dropping the ``int(trim_fraction * n)`` lowest and highest values.

    Needs every update's value of a coordinate at once: stacks one key at a time."""
    keys = _check_updates(updates)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction}")
    cut = int(trim_fraction * len(updates))
    out: dict[str, np.ndarray] = {}
    for key in keys:
        ordered = np.sort(_stack(updates, key, clipping), axis=0)
        out[key] = as_reference_dtype(ordered[cut : len(updates) - cut].mean(axis=0), np.asarray(updates[0][key]))
    return out


def capped_shares(weights: Sequence[float], max_share: float = 1.0) -> np.ndarray:
    """Normalised weights in which no entry exceeds ``max_share``; the excess goes to the others
    in proportion to their weights (water-filling). Entries with weight 0 stay 0.

    Raises ``AggregationError`` when it cannot be done: fewer than ``1 / max_share`` positive weights.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("no weights")
    if not np.all(np.isfinite(w)) or (w < 0).any() or not np.isfinite(w.sum()) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    if not 0.0 < max_share <= 1.0:
        raise ValueError(f"max_weight_share must lie in (0, 1], got {max_share}")
    shares = w / w.sum()
    if max_share >= 1.0:
        return shares
    positive = int((w > 0).sum())
    if positive * max_share < 1.0 - 1e-9:
        raise AggregationError(f"{positive} hospital(s) with weight > 0 cannot keep every share <= "
                               f"max_weight_share={max_share} (needs at least {int(np.ceil(1 / max_share - 1e-9))})")
    capped = np.zeros(len(w), dtype=bool)
    for _ in range(len(w)):
        over = (shares > max_share) & ~capped
        if not over.any():
            break
        capped |= over
        free = ~capped
        shares[capped] = max_share
        free_total = w[free].sum()
        left = max(0.0, 1.0 - max_share * capped.sum())
        shares[free] = w[free] / free_total * left if free_total > 0 else 0.0
    return shares


def update_norm(update: GroupArrays, current: GroupArrays, derived: bool = False) -> float:
    """L2 norm of ``update - current`` over the group's floating-point learnt entries (``derived``:
    over its derived buffers instead, ``common.model.DERIVED_STATE``), float64, one key at a time."""
    total = 0.0
    for key, value in current.items():
        value = np.asarray(value)
        if _is_float(value) and is_derived_state(key) == derived:
            diff = np.subtract(update[key], value, dtype=np.float64).ravel()
            total += float(np.dot(diff, diff))
    return float(np.sqrt(total))


def clip_scales(current: GroupArrays, updates: Sequence[GroupArrays], factor: float, derived: bool = False
                ) -> tuple[list[float], list[float], float]:
    """Per update, the factor that clips its difference from ``current`` to ``factor`` x the median
    difference norm (1.0 for an update within it), over the learnt entries (``derived``: over the
    derived buffers). Returns the scales, the norms and the threshold."""
    if not factor > 0:
        raise ValueError(f"clip_update_norm must be > 0, got {factor}")
    norms = [update_norm(u, current, derived) for u in updates]
    threshold = float(factor * np.median(norms))
    scales = [threshold / norm if norm > threshold else 1.0 for norm in norms]
    return scales, norms, threshold


def clip_updates(current: GroupArrays, updates: Sequence[GroupArrays], factor: float
                 ) -> tuple[list[dict[str, np.ndarray]], list[float], float]:
    """Each update's difference from ``current`` clipped to ``factor`` x the median difference norm,
    as new arrays (the aggregation rules clip without these copies, through ``Clipping``).

    Returns the clipped updates, the original norms and the clipping threshold. Integer entries
    (counters) are left as they are.
    """
    scales, norms, threshold = clip_scales(current, updates, factor)
    derived_scales, _, _ = clip_scales(current, updates, factor, derived=True)
    clipped: list[dict[str, np.ndarray]] = []
    for update, scale, derived_scale in zip(updates, scales, derived_scales):
        if scale == 1.0 and derived_scale == 1.0:
            clipped.append({k: np.asarray(v) for k, v in update.items()})
            continue
        alone = Clipping(current, [scale], [derived_scale])
        clipped.append({key: as_reference_dtype(_stack([update], key, alone)[0], np.asarray(value)) for key, value in update.items()})
    return clipped, norms, threshold


@dataclass(frozen=True)
class GroupPolicy:
    """How one group is aggregated: its own keys (``federation.aggregation.<group>``: the weight, left
    local or not, the rule) and the federation-wide influence bounds (``max_weight_share``,
    ``clip_update_norm``). The strategy builds one per group from the config; a bare one is plain FedAvg."""

    weight: str = "real_examples"  # a key of protocol.WEIGHT_KEYS, or "uniform"
    local: bool = False
    rule: str = "fedavg"  # fedavg | median | trimmed_mean
    trim_fraction: float = 0.2  # trimmed_mean: the share cut from each end
    max_weight_share: float | str = 1.0  # a share in (0, 1], or "auto" (auto_weight_share)
    clip_update_norm: float | None = None

    def __post_init__(self) -> None:
        if self.weight not in (*protocol.WEIGHT_KEYS, "uniform"):
            raise ValueError(f"aggregation weight {self.weight!r}: choose one of {[*protocol.WEIGHT_KEYS, 'uniform']}")
        if self.rule not in RULES:
            raise ValueError(f"aggregation rule {self.rule!r}: choose one of {list(RULES)}")
        if not 0.0 <= float(self.trim_fraction) < 0.5:
            raise ValueError(f"trim_fraction must lie in [0, 0.5), got {self.trim_fraction}")
        if isinstance(self.max_weight_share, str):
            if self.max_weight_share != AUTO_SHARE:
                raise ValueError(f"max_weight_share must be {AUTO_SHARE!r} or a number in (0, 1], "
                                 f"got {self.max_weight_share!r}")
        elif not 0.0 < self.max_weight_share <= 1.0:
            raise ValueError(f"max_weight_share must lie in (0, 1], got {self.max_weight_share}")
        if self.clip_update_norm is not None and not self.clip_update_norm > 0:
            raise ValueError(f"clip_update_norm must be > 0 or null (off), got {self.clip_update_norm}")

    def share_cap(self, hospitals: int) -> float:
        """The cap on one hospital's share when ``hospitals`` take part in the group."""
        if self.max_weight_share == AUTO_SHARE:
            return auto_weight_share(hospitals)
        return float(self.max_weight_share)


@dataclass
class GroupOutcome:
    """What happened to one group: who took part, their shares, who was clipped, or why it was kept."""

    arrays: dict[str, np.ndarray]
    members: list[int] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)
    kept: str | None = None


def aggregate_group(current: GroupArrays, updates: Sequence[GroupArrays], weights: Sequence[float],
                    policy: GroupPolicy) -> GroupOutcome:
    """One group's new value under ``policy``; indices in the outcome refer to ``updates``.

    Only updates with a weight > 0 take part. If the group cannot be aggregated (no such update, or
    the weight cap cannot be met), the outcome keeps ``current`` and says why in ``kept``.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    members = [i for i in range(len(updates)) if w[i] > 0]
    if not members:
        return GroupOutcome(_copy(current), kept="no hospital has a weight > 0 for this group")
    chosen = [updates[i] for i in members]
    clipped: list[int] = []
    clipping: Clipping | None = None
    if policy.clip_update_norm is not None:
        scales, norms, threshold = clip_scales(current, chosen, policy.clip_update_norm)
        derived_scales, _, _ = clip_scales(current, chosen, policy.clip_update_norm, derived=True)
        clipping = Clipping(current, scales, derived_scales)
        clipped = [members[j] for j, (scale, derived) in enumerate(zip(scales, derived_scales))
                   if scale < 1.0 or derived < 1.0]
    return RULES[policy.rule](RuleInputs(current, chosen, w[members], members, clipped, clipping, policy))


@dataclass(frozen=True)
class RuleInputs:
    """What an aggregation rule receives: the current value, the taking-part updates (``members``:
    their indices among all replies) with their weights, who was clipped and how, and the policy."""

    current: GroupArrays
    updates: Sequence[GroupArrays]
    weights: np.ndarray
    members: list[int]
    clipped: list[int]
    clipping: Clipping | None
    policy: GroupPolicy


#: An aggregation rule: the group's outcome from its inputs.
AggregationRule = Callable[[RuleInputs], "GroupOutcome"]

#: Every rule ``federation.aggregation.<group>.rule`` can name, registered with :func:`register_rule`.
RULES: Registry[AggregationRule] = Registry("aggregation rule")


def register_rule(name: str) -> Callable[[AggregationRule], AggregationRule]:
    """Register an aggregation rule under ``name`` (a function of :class:`RuleInputs`)."""
    def register(rule: AggregationRule) -> AggregationRule:
        return RULES.add(name, rule)
    return register


def _equal_shares(inputs: RuleInputs) -> list[float]:
    return [1.0 / len(inputs.members)] * len(inputs.members)


@register_rule("fedavg")
def _fedavg(inputs: RuleInputs) -> GroupOutcome:
    """The weighted mean, each hospital's share capped by ``max_weight_share``."""
    cap = inputs.policy.share_cap(len(inputs.members))
    try:
        shares = capped_shares(inputs.weights, cap)
    except AggregationError as error:
        return GroupOutcome(_copy(inputs.current), inputs.members, clipped=inputs.clipped, kept=str(error))
    uncapped = cap >= 1.0  # then the plain weighted mean of the weights themselves
    mean = weighted_mean(inputs.updates, inputs.weights if uncapped else shares, inputs.clipping)
    return GroupOutcome(mean, inputs.members, shares.tolist(), inputs.clipped)


@register_rule("median")
def _median(inputs: RuleInputs) -> GroupOutcome:
    """The coordinate-wise median; weights play no part."""
    return GroupOutcome(coordinate_median(inputs.updates, inputs.clipping), inputs.members, _equal_shares(inputs),
                        inputs.clipped)


@register_rule("trimmed_mean")
def _trimmed_mean(inputs: RuleInputs) -> GroupOutcome:
    """The coordinate-wise mean without the ``trim_fraction`` lowest and highest values; weights play no part."""
    return GroupOutcome(trimmed_mean(inputs.updates, inputs.policy.trim_fraction, inputs.clipping), inputs.members,
                        _equal_shares(inputs), inputs.clipped)


def _copy(arrays: GroupArrays) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def aggregate_groups(
    current: Mapping[str, GroupArrays],
    updates: Sequence[Mapping[str, GroupArrays]],
    weights: Mapping[str, Sequence[float]],
    local_groups: Sequence[str] = (),
    policies: Mapping[str, GroupPolicy] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """New global groups: each group under its policy (default plain FedAvg), or the current value
    for local groups. ``updates`` is one mapping group -> arrays per hospital; ``weights[group]``
    holds one weight per hospital for that group."""
    return {group: outcome.arrays for group, outcome in
            aggregate_group_outcomes(current, updates, weights, local_groups, policies).items()}


def aggregate_group_outcomes(
    current: Mapping[str, GroupArrays],
    updates: Sequence[Mapping[str, GroupArrays]],
    weights: Mapping[str, Sequence[float]],
    local_groups: Sequence[str] = (),
    policies: Mapping[str, GroupPolicy] | None = None,
) -> dict[str, GroupOutcome]:
    """Like ``aggregate_groups``, with each group's outcome (members, shares, clipping, kept)."""
    result: dict[str, GroupOutcome] = {}
    for group, arrays in current.items():
        if group in local_groups:
            result[group] = GroupOutcome(_copy(arrays), kept="local")
            continue
        policy = (policies or {}).get(group, GroupPolicy())
        result[group] = aggregate_group(arrays, [u[group] for u in updates], weights[group], policy)
    return result
