"""Fault injection for simulations: which simulated hospital misbehaves, how, and when.

The top-level config list ``faults`` holds entries ``{site: INT, kind: KIND, rounds: [INT, ...] | all,
scale: FLOAT, target: INT, phase: train|evaluate|both}``:

| kind | what the hospital does |
|---|---|
| ``crash`` | its ClientApp raises (Flower delivers an error reply) |
| ``hang`` | it sleeps past the phase deadline (``federation.round_timeout_s``), then gives up |
| ``nan`` | its updated groups are all NaN |
| ``shape`` | one tensor of its reply has one element too many |
| ``scale`` | it sends ``global + scale x (update - global)`` (``scale`` required) |
| ``inflate_examples`` | it claims 1e12 real and labelled examples |
| ``impersonate`` | it reports site ``target``'s name (default: the next site) |

``nan``, ``shape``, ``scale`` and ``inflate_examples`` act on train replies; ``crash``, ``hang`` and
``impersonate`` act on the ``phase`` given (default ``train``). Only ``fedvitgan simulate`` may
inject faults: the ServerApp under ``flwr run`` refuses them, and a hospital that is not a
simulated node refuses any instruction whose run config carries them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError, to_plain

KINDS: tuple[str, ...] = ("crash", "hang", "nan", "shape", "scale", "inflate_examples", "impersonate")
#: Kinds that change a train reply's content (and so act on train replies only).
TRAIN_ONLY: frozenset[str] = frozenset({"nan", "shape", "scale", "inflate_examples"})
PHASES: tuple[str, ...] = ("train", "evaluate", "both")
#: What ``inflate_examples`` claims.
INFLATED_EXAMPLES = 1e12


@dataclass(frozen=True)
class Fault:
    """One configured fault."""

    site: int
    kind: str
    rounds: tuple[int, ...] | None  # None: every round
    scale: float | None = None
    target: int | None = None
    phase: str = "train"

    def applies(self, site: int, server_round: int, phase: str) -> bool:
        """Whether this fault acts on ``site``'s ``phase`` message of ``server_round``."""
        return (self.site == site and (self.rounds is None or server_round in self.rounds)
                and self.phase in (phase, "both"))


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def parse_fault(entry: Mapping[str, Any], index: int, num_sites: int) -> Fault:
    """One ``faults`` entry, checked; errors name ``faults[index]`` and the key."""
    where = f"faults[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{site: 1, kind: crash, rounds: all}}, got {entry!r}")
    unknown = sorted(set(entry) - {"site", "kind", "rounds", "scale", "target", "phase"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: site, kind, rounds, scale, target, phase")
    if "site" not in entry or "kind" not in entry:
        raise ConfigError(f"{where}: 'site' and 'kind' are required")
    site = _integer(entry["site"], f"{where}.site")
    if not 0 <= site < num_sites:
        raise ConfigError(f"{where}.site: {site} is outside 0..{num_sites - 1} (federation.num_sites={num_sites})")
    kind = entry["kind"]
    if isinstance(kind, float) and math.isnan(kind):
        kind = "nan"  # Hydra reads an unquoted `kind:nan` as the float NaN
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: {kind!r}; choose one of {list(KINDS)}")
    raw_rounds = entry.get("rounds", "all")
    rounds: tuple[int, ...] | None
    if raw_rounds == "all":
        rounds = None
    elif isinstance(raw_rounds, Sequence) and not isinstance(raw_rounds, str):
        rounds = tuple(_integer(r, f"{where}.rounds") for r in raw_rounds)
        if any(r < 1 for r in rounds):
            raise ConfigError(f"{where}.rounds: rounds count from 1, got {list(rounds)}")
    else:
        raise ConfigError(f"{where}.rounds: expected a list of round numbers or 'all', got {raw_rounds!r}")
    scale = entry.get("scale")
    if kind == "scale":
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ConfigError(f"{where}.scale: kind scale needs a number, e.g. scale: 1e4")
        scale = float(scale)
    elif scale is not None:
        raise ConfigError(f"{where}.scale: only kind scale takes a scale")
    target = entry.get("target")
    if kind == "impersonate":
        target = (site + 1) % num_sites if target is None else _integer(target, f"{where}.target")
        if not 0 <= target < num_sites or target == site:
            raise ConfigError(f"{where}.target: {target} must be another site in 0..{num_sites - 1}")
    elif target is not None:
        raise ConfigError(f"{where}.target: only kind impersonate takes a target")
    phase = entry.get("phase", "train")
    if phase not in PHASES:
        raise ConfigError(f"{where}.phase: {phase!r}; choose one of {list(PHASES)}")
    if kind in TRAIN_ONLY and phase != "train":
        raise ConfigError(f"{where}.phase: kind {kind} changes train replies only")
    return Fault(site, kind, rounds, scale, target, phase)


def parse_faults(entries: Any, num_sites: int) -> list[Fault]:
    """The ``faults`` config list, checked (an empty list or null: no faults)."""
    entries = to_plain(entries)
    if entries is None:
        return []
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ConfigError(f"faults: expected a list of entries, got {entries!r}")
    return [parse_fault(entry, i, num_sites) for i, entry in enumerate(entries)]
