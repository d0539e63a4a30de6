"""The server's aggregation math, with no Flower types: per-group rules with bounded influence.

Each group (generator, discriminator, classifier) is aggregated on its own, or kept as it is when
the group is local to the hospitals. A group's rule is one of

- ``fedavg``: the weighted mean, each hospital's share of the weight optionally capped at
  ``max_weight_share`` (the excess is spread over the others in proportion to their weights);
- ``median``: the coordinate-wise median (Yin et al., 2018), as Flower's ``FedMedian``;
- ``trimmed_mean``: per coordinate, drop the ``int(trim_fraction * n)`` largest and smallest values
  and average the rest, as Flower's ``FedTrimmedAvg``.

Median and trimmed mean count every hospital once (weights only decide who takes part: a
hospital whose weight for the group is 0 does not). Before any rule, ``clip_update_norm = k``
clips each hospital's update (its group minus the current global group) to ``k`` times the median
update norm of the round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

GroupArrays = Mapping[str, np.ndarray]

RULES: tuple[str, ...] = ("fedavg", "median", "trimmed_mean")


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


def _like(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A float64 result back in the reference's dtype (integer entries rounded)."""
    if np.issubdtype(reference.dtype, np.integer) or reference.dtype == np.bool_:
        values = np.rint(values)
    return np.asarray(values).astype(reference.dtype)


def _stack(updates: Sequence[GroupArrays], key: str) -> np.ndarray:
    return np.stack([np.asarray(u[key], dtype=np.float64) for u in updates])


def weighted_mean(updates: Sequence[GroupArrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``sum_i w_i x_i / sum_i w_i`` key by key, computed in float64, returned in each key's dtype.

    Integer entries (counters) are averaged too and rounded back to their integer dtype.
    """
    keys = _check_updates(updates)
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w.sum()):
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    w = w / w.sum()
    out: dict[str, np.ndarray] = {}
    for key in keys:
        total = np.tensordot(w, _stack(updates, key), axes=1)
        out[key] = _like(total, np.asarray(updates[0][key]))
    return out


def coordinate_median(updates: Sequence[GroupArrays]) -> dict[str, np.ndarray]:
    """The coordinate-wise median of the updates (the mean of the two middle values for even n)."""
    keys = _check_updates(updates)
    return {key: _like(np.median(_stack(updates, key), axis=0), np.asarray(updates[0][key])) for key in keys}


def trimmed_mean(updates: Sequence[GroupArrays], trim_fraction: float) -> dict[str, np.ndarray]:
    """Per coordinate, the mean after dropping the ``int(trim_fraction * n)`` lowest and highest values."""
    keys = _check_updates(updates)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction}")
    cut = int(trim_fraction * len(updates))
    out: dict[str, np.ndarray] = {}
    for key in keys:
        ordered = np.sort(_stack(updates, key), axis=0)
        out[key] = _like(ordered[cut : len(updates) - cut].mean(axis=0), np.asarray(updates[0][key]))
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


def update_norm(update: GroupArrays, current: GroupArrays) -> float:
    """L2 norm of ``update - current`` over the group's floating-point entries."""
    total = 0.0
    for key, value in current.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            diff = np.asarray(update[key], dtype=np.float64) - value.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def clip_updates(current: GroupArrays, updates: Sequence[GroupArrays], factor: float
                 ) -> tuple[list[dict[str, np.ndarray]], list[float], float]:
    """Each update's difference from ``current`` clipped to ``factor`` x the median difference norm.

    Returns the clipped updates, the original norms and the clipping threshold. Integer entries
    (counters) are left as they are.
    """
    if not factor > 0:
        raise ValueError(f"clip_update_norm must be > 0, got {factor}")
    norms = [update_norm(u, current) for u in updates]
    threshold = float(factor * np.median(norms))
    clipped: list[dict[str, np.ndarray]] = []
    for update, norm in zip(updates, norms):
        if norm <= threshold:
            clipped.append({k: np.asarray(v) for k, v in update.items()})
            continue
        scale = threshold / norm
        out: dict[str, np.ndarray] = {}
        for key, value in update.items():
            base = np.asarray(current[key])
            if np.issubdtype(base.dtype, np.floating):
                diff = np.asarray(value, dtype=np.float64) - base.astype(np.float64)
                out[key] = (base.astype(np.float64) + scale * diff).astype(np.asarray(value).dtype)
            else:
                out[key] = np.asarray(value)
        clipped.append(out)
    return clipped, norms, threshold


@dataclass(frozen=True)
class GroupPolicy:
    """How one group is aggregated (the server builds it from ``federation.aggregation``)."""

    rule: str = "fedavg"
    trim_fraction: float = 0.2
    max_weight_share: float = 1.0
    clip_update_norm: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"aggregation rule {self.rule!r}: choose one of {list(RULES)}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must lie in [0, 0.5), got {self.trim_fraction}")
        if not 0.0 < self.max_weight_share <= 1.0:
            raise ValueError(f"max_weight_share must lie in (0, 1], got {self.max_weight_share}")
        if self.clip_update_norm is not None and not self.clip_update_norm > 0:
            raise ValueError(f"clip_update_norm must be > 0 or null (off), got {self.clip_update_norm}")


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
    unchanged = {k: np.array(v, copy=True) for k, v in current.items()}
    if not members:
        return GroupOutcome(unchanged, kept="no hospital has a weight > 0 for this group")
    chosen = [updates[i] for i in members]
    clipped: list[int] = []
    if policy.clip_update_norm is not None:
        chosen, norms, threshold = clip_updates(current, chosen, policy.clip_update_norm)
        clipped = [members[j] for j, norm in enumerate(norms) if norm > threshold]
    if policy.rule == "median":
        return GroupOutcome(coordinate_median(chosen), members, [1.0 / len(members)] * len(members), clipped)
    if policy.rule == "trimmed_mean":
        return GroupOutcome(trimmed_mean(chosen, policy.trim_fraction), members,
                            [1.0 / len(members)] * len(members), clipped)
    try:
        shares = capped_shares(w[members], policy.max_weight_share)
    except AggregationError as error:
        return GroupOutcome(unchanged, members, clipped=clipped, kept=str(error))
    uncapped = policy.max_weight_share >= 1.0  # then the plain weighted mean of the weights themselves
    return GroupOutcome(weighted_mean(chosen, w[members] if uncapped else shares), members, shares.tolist(), clipped)


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
            result[group] = GroupOutcome({k: np.array(v, copy=True) for k, v in arrays.items()}, kept="local")
            continue
        policy = (policies or {}).get(group, GroupPolicy())
        result[group] = aggregate_group(arrays, [u[group] for u in updates], weights[group], policy)
    return result
