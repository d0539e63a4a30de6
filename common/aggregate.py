"""Per-group weighted means (FedAvg), with no Flower types: the server's aggregation math.

Each group (generator, discriminator, classifier) is averaged on its own, with its own weights,
or kept as it is when the group is configured as local to the hospitals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

GroupArrays = Mapping[str, np.ndarray]


def weighted_mean(updates: Sequence[GroupArrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``sum_i w_i x_i / sum_i w_i`` key by key, computed in float64, returned in each key's dtype.

    Integer entries (counters) are averaged too and rounded back to their integer dtype.
    """
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    w = w / w.sum()
    keys = list(updates[0].keys())
    for i, update in enumerate(updates[1:], start=1):
        if list(update.keys()) != keys and set(update.keys()) != set(keys):
            raise ValueError(f"update {i} has other keys than update 0")
    out: dict[str, np.ndarray] = {}
    for key in keys:
        reference = np.asarray(updates[0][key])
        total = np.zeros(reference.shape, dtype=np.float64)
        for update, factor in zip(updates, w):
            total += factor * np.asarray(update[key], dtype=np.float64)
        if np.issubdtype(reference.dtype, np.integer) or reference.dtype == np.bool_:
            total = np.rint(total)
        out[key] = total.astype(reference.dtype)
    return out


def aggregate_groups(
    current: Mapping[str, GroupArrays],
    updates: Sequence[Mapping[str, GroupArrays]],
    weights: Mapping[str, Sequence[float]],
    local_groups: Sequence[str] = (),
) -> dict[str, dict[str, np.ndarray]]:
    """New global groups: a weighted mean per group, or the current value for local groups.

    ``current`` maps group -> arrays; ``updates`` is one mapping group -> arrays per hospital;
    ``weights[group]`` holds one weight per hospital for that group.
    """
    result: dict[str, dict[str, np.ndarray]] = {}
    for group, arrays in current.items():
        if group in local_groups:
            result[group] = {k: np.array(v, copy=True) for k, v in arrays.items()}
            continue
        result[group] = weighted_mean([u[group] for u in updates], weights[group])
    return result
