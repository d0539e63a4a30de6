"""What hospitals and coordinator agree on for SecAgg+ (``federation.secure_aggregation=secaggplus``).

The protocol itself is Flower's (Bonawitz et al. 2017; Bell et al. 2020): the hospitals run
``flwr.client.mod.secaggplus_mod`` unchanged, and the coordinator drives the same four stages with
Flower's primitives (``server/secure_round.py``). This module holds the shared parts:

- ``SecAggPlusConfig``: the ``federation.secaggplus`` section, typed and checked;
- ``VectorLayout``: how one hospital's reply becomes the vector that is summed securely. For every
  aggregated group, in the order the coordinator sent them, the hospital's clipped update
  (its group minus the global group, keys sorted) times its weight ratio ``r = min(w, M) / M``
  (``w`` the group's FedAvg weight, ``M`` its bound: ``weight_bound``), then ``r`` itself as a
  one-element array.
  The secure sum then holds ``sum_i r_i * update_i`` and ``sum_i r_i`` for each group, and the
  coordinator divides the two: FedAvg without ever seeing one hospital's update or weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import dataclass_from_mapping
from common.model import is_derived_state

#: ``federation.secure_aggregation`` values.
MODES = ("none", "secaggplus")
SECAGGPLUS = "secaggplus"
#: Reply metric: how many of the hospital's groups it scaled this round (``clip_update``: learnt weights beyond
#: ``secaggplus.update_norm``, derived buffers beyond ``clipping_range``).
CLIPPED_GROUPS = "secagg/clipped_groups"


@dataclass(frozen=True)
class SecAggPlusConfig:
    """``federation.secaggplus``; every key is explained in ``conf/federation/default.yaml``."""

    num_shares: int
    reconstruction_threshold: int
    max_weight: float
    clipping_range: float
    quantization_range: int
    modulus_range: int
    update_norm: float
    stage_timeout_s: float

    def __post_init__(self) -> None:
        for key in ("num_shares", "reconstruction_threshold", "quantization_range", "modulus_range"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        if self.num_shares < 3:
            raise ValueError(f"num_shares must be >= 3 (each hospital keeps one share and sends one to each "
                             f"neighbour), got {self.num_shares}")
        if not 2 <= self.reconstruction_threshold < self.num_shares:
            raise ValueError(f"reconstruction_threshold must be >= 2 and below num_shares={self.num_shares}, "
                             f"got {self.reconstruction_threshold}")
        for key in ("max_weight", "clipping_range", "update_norm", "stage_timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{key} must be a positive finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.quantization_range <= 1:
            raise ValueError(f"quantization_range must be > 1, got {self.quantization_range}")
        if self.modulus_range <= self.quantization_range or bin(self.modulus_range).count("1") != 1 \
                or self.modulus_range > 2**32:
            raise ValueError(f"modulus_range must be a power of 2 above quantization_range and at most 2**32, "
                             f"got {self.modulus_range}")
        if self.clipping_range < 1.0:
            raise ValueError(f"clipping_range must be >= 1 (the weight ratio, at most 1, travels in the same "
                             f"vector), got {self.clipping_range:g}")
        if self.update_norm > self.clipping_range:
            raise ValueError(f"update_norm={self.update_norm:g} exceeds clipping_range={self.clipping_range:g}: "
                             f"a clipped update could still have entries that quantization clips")

    def max_hospitals(self) -> int:
        """The most hospitals whose quantized sum stays below the modulus (no wrap-around)."""
        return max(1, (self.modulus_range - 1) // self.quantization_range)


def check_secure_aggregation(mode: str, section: Mapping[str, Any], aggregation: Mapping[str, Any],
                             num_sites: int) -> SecAggPlusConfig | None:
    """The ``federation`` keys secure aggregation depends on, checked together at start: the typed
    ``secaggplus`` section when it is on (``ValueError`` naming the key that rules it out), else None.

    With SecAgg+ the coordinator never holds one hospital's update, so every server-side rule that
    reads individual updates is refused: median, trimmed mean, clipping relative to the round's
    median norm, and the cap on one hospital's share of the weight.
    """
    if mode not in MODES:
        raise ValueError(f"secure_aggregation must be one of {list(MODES)}, got {mode!r}")
    cfg = secaggplus_config(section)
    if mode != SECAGGPLUS:
        return None
    why = "needs each hospital's update, which secure aggregation hides from the coordinator"
    for group, rule in aggregation.items():
        if isinstance(rule, Mapping) and not rule.get("local", False) and rule.get("rule", "fedavg") != "fedavg":
            raise ValueError(f"aggregation.{group}.rule={rule['rule']} {why}; use fedavg (or local: true)")
    if aggregation.get("clip_update_norm") is not None:
        raise ValueError(f"aggregation.clip_update_norm (clipping to a multiple of the round's median update norm) "
                         f"{why}; set it to null (the preset federation=secaggplus does): each hospital clips its "
                         f"own update to secaggplus.update_norm instead")
    if "max_weight_share" not in aggregation:
        raise ValueError("aggregation.max_weight_share is missing (conf/federation/default.yaml sets it)")
    share = aggregation["max_weight_share"]
    if share == "auto" or float(share) < 1.0:
        raise ValueError(f"aggregation.max_weight_share={share} (a cap on one hospital's share of the weight) "
                         f"{why}; set it to 1.0 (the preset federation=secaggplus does): secaggplus.max_weight "
                         f"bounds each hospital's weight at the hospital instead")
    if num_sites < max(2, cfg.reconstruction_threshold):
        raise ValueError(f"num_sites={num_sites}: secure aggregation needs at least "
                         f"{max(2, cfg.reconstruction_threshold)} hospitals (secaggplus.reconstruction_threshold)")
    if num_sites > cfg.max_hospitals():
        raise ValueError(f"num_sites={num_sites}: the sum of more than {cfg.max_hospitals()} hospitals would wrap "
                         f"around secaggplus.modulus_range; lower quantization_range")
    return cfg


def secaggplus_config(section: Mapping[str, Any] | Any) -> SecAggPlusConfig:
    """``federation.secaggplus`` as a ``SecAggPlusConfig`` (``ConfigError`` naming a bad key)."""
    return dataclass_from_mapping(SecAggPlusConfig, section, "federation.secaggplus")


def neighbour_count(num_shares: int, hospitals: int) -> int:
    """How many hospitals (itself included) share one hospital's secrets: ``num_shares``, made odd
    as SecAgg+'s ring needs, and at most all of them."""
    shares = num_shares if num_shares & 1 else num_shares + 1
    return min(shares, hospitals)


def clip_update(update: Mapping[str, np.ndarray], bound: float, entry_bound: float) -> tuple[dict[str, np.ndarray], bool]:
    """``update`` (float64) with its learnt weights scaled to an L2 norm of at most ``bound`` (the
    hospital's influence on the sum), and whether anything was scaled.

    The derived buffers (``common.model.DERIVED_STATE``: the head's centre and whitening) are kept
    apart and are not held to ``bound``: the whitening's change is the same at every hospital and
    is often ten times ``bound`` (about 47 at the tiny preset in its first round), and the centre
    is each hospital's one DP release; shrinking either gives the global model a centre and a
    whitening that no hospital computed, under head weights trained for the true ones. They are
    only kept inside the quantization's range, ``entry_bound`` per entry (``clipping_range``: what
    Flower's mod would otherwise clip entry by entry), scaled as a whole if one entry is beyond it.
    """
    clipped: dict[str, np.ndarray] = {}
    was_clipped = False
    learnt = {k: v for k, v in update.items() if not is_derived_state(k)}
    norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in learnt.values()))
    derived = {k: v for k, v in update.items() if is_derived_state(k)}
    largest = max((float(np.max(np.abs(v))) for v in derived.values() if v.size), default=0.0)
    for part, scale in ((learnt, 1.0 if norm <= bound else bound / norm),
                        (derived, 1.0 if largest <= entry_bound else entry_bound / largest)):
        was_clipped = was_clipped or scale < 1.0
        clipped.update(part if scale == 1.0 else {k: v * scale for k, v in part.items()})
    return {k: clipped[k] for k in update}, was_clipped


@dataclass(frozen=True)
class VectorLayout:
    """The order and shapes of the securely summed vector: per group, its sorted keys then its weight ratio."""

    groups: tuple[str, ...]
    keys: Mapping[str, tuple[str, ...]]
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]]

    @classmethod
    def of(cls, groups: Sequence[str], shapes: Mapping[str, Mapping[str, Sequence[int]]]) -> VectorLayout:
        """The layout of ``groups`` (in this order), each with its ``{key: shape}``."""
        keys = {g: tuple(sorted(shapes[g])) for g in groups}
        return cls(tuple(groups), keys, {g: {k: tuple(int(d) for d in shapes[g][k]) for k in keys[g]} for g in groups})

    @property
    def array_shapes(self) -> list[tuple[int, ...]]:
        """The shape of each array of the vector, in order."""
        shapes: list[tuple[int, ...]] = []
        for group in self.groups:
            shapes += [self.shapes[group][k] for k in self.keys[group]]
            shapes.append((1,))
        return shapes

    def encode(self, updates: Mapping[str, Mapping[str, np.ndarray]], ratios: Mapping[str, float]) -> list[np.ndarray]:
        """The hospital's vector: each group's update times its ratio, then the ratio (float64)."""
        vector: list[np.ndarray] = []
        for group in self.groups:
            ratio = float(ratios[group])
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{group}: weight ratio {ratio} outside [0, 1]")
            for key in self.keys[group]:
                value = np.asarray(updates[group][key], dtype=np.float64)
                if value.shape != self.shapes[group][key]:
                    raise ValueError(f"{group}.{key}: shape {value.shape}, expected {self.shapes[group][key]}")
                vector.append(value * ratio)
            vector.append(np.array([ratio], dtype=np.float64))
        return vector

    def decode(self, vector: Sequence[np.ndarray]) -> dict[str, tuple[dict[str, np.ndarray], float]]:
        """The summed vector back as ``{group: ({key: sum of ratio x update}, sum of ratios)}``."""
        if len(vector) != len(self.array_shapes):
            raise ValueError(f"{len(vector)} arrays, the layout has {len(self.array_shapes)}")
        out: dict[str, tuple[dict[str, np.ndarray], float]] = {}
        position = 0
        for group in self.groups:
            sums = {}
            for key in self.keys[group]:
                sums[key] = np.asarray(vector[position], dtype=np.float64).reshape(self.shapes[group][key])
                position += 1
            out[group] = (sums, float(np.asarray(vector[position]).reshape(-1)[0]))
            position += 1
        return out


def weight_bound(weight: str, cfg: SecAggPlusConfig, local_steps: int) -> float:
    """The bound ``M`` on a hospital's FedAvg weight of the kind ``weight``: ``train.local_steps`` for
    generator steps (a hospital cannot take more; a bound near the real weights keeps the ratios,
    and so the quantized sum, precise), ``max_weight`` for example counts, 1 for uniform."""
    if weight == "uniform":
        return 1.0
    if weight == "generator_steps":
        return float(max(1, local_steps))
    return cfg.max_weight


def weight_ratio(weight: float, bound: float) -> float:
    """A hospital's share-to-be of a group's FedAvg weight, bounded at the hospital: ``min(w, M) / M``."""
    if not weight >= 0:
        raise ValueError(f"aggregation weight {weight!r} is not a non-negative number")
    return min(float(weight), bound) / bound
