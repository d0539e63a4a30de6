"""Hospitals kept warm between messages: each one's data set and built model, per run and site.

A process that serves many messages (a simulation's worker holds many hospitals; a test drives
the ClientApp directly) would otherwise load the hospital's data set and build its model again
for every message. ``SITE_CACHE`` keeps them, keyed by (run, site), for as long as the run's
config and the site's identity stay the same (``fingerprint``); any change builds afresh.

What is kept is *construction* only. Every message still starts the model from its freshly built
weights (``CachedSite.checkout``), loads the received global groups and the hospital's saved local
state into it, and builds its trainer (optimisers, loss weights, selection statistics, random
state) from the saved local state: a hospital's results and its privacy ledger are the same,
bit for bit, with the cache on or off. A message that fails drops its hospital (``discard``).

Bounded by ``client.cache_sites`` hospitals and ``client.cache_mib`` MiB per process (tensors and
arrays the entries hold), the least recently used out first; ``client.cache=false`` turns it off.
In a deployment every message is a fresh ClientApp process (Flower's SuperExec), so the cache
only matters in simulations and in-process runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.config import ConfigError, dataclass_from_mapping, defaults_from_conf
from common.data.sites import SiteData
from common.model import UnifiedViTGAN

logger = logging.getLogger("fedvitgan.client")

MIB = 1 << 20


@dataclass(frozen=True)
@defaults_from_conf("config.yaml", "client")
class CacheConfig:
    """The run config's ``client`` section (conf/config.yaml)."""

    cache: bool
    cache_sites: int
    cache_mib: int

    def __post_init__(self) -> None:
        if self.cache_sites < 1 or self.cache_mib < 1:
            raise ConfigError(f"client.cache_sites and client.cache_mib must be >= 1 (got {self.cache_sites}, "
                             f"{self.cache_mib})")


def cache_config(section: Mapping[str, Any] | None) -> CacheConfig:
    """``client`` from a run config; the defaults where it is absent (a run recorded before it existed)."""
    return dataclass_from_mapping(CacheConfig, section or {}, "client")


def fingerprint(run: Mapping[str, Any], site: Any) -> str:
    """A hash of everything a hospital's build depends on: the whole run config and the site's identity."""
    text = json.dumps({"run": run, "site": dataclasses.asdict(site)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def held_bytes(obj: Any, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the tensors and numpy arrays ``obj`` holds (attributes, containers), each counted once."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes) if obj.base is None else held_bytes(obj.base, seen, depth + 1)
    if isinstance(obj, torch.nn.Module):
        return sum(held_bytes(t, seen, depth + 1) for t in (*obj.parameters(), *obj.buffers()))
    if isinstance(obj, Mapping):
        return sum(held_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(held_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


@dataclass
class CachedSite:
    """One hospital's data set and built model (with the weights it was built with)."""

    data: SiteData
    build_model: Callable[[int], UnifiedViTGAN]
    _model: UnifiedViTGAN | None = None
    _initial: dict[str, torch.Tensor] = field(default_factory=dict)
    _requires_grad: dict[str, bool] = field(default_factory=dict)

    def checkout(self, num_classes: int) -> tuple[UnifiedViTGAN, dict[str, torch.Tensor]]:
        """The model as freshly built (weights still to load: the returned initial state, to update
        and ``load_state_dict``), in training mode, with no gradients and every flag as built."""
        if self._model is None or self._model.num_classes != num_classes:
            self._model = self.build_model(num_classes)
            self._initial = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
            self._requires_grad = {n: p.requires_grad for n, p in self._model.named_parameters()}
        model = self._model
        model.train()
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(self._requires_grad[name])
        return model, dict(self._initial)

    def release(self) -> None:
        """After a message: gradients are not kept."""
        if self._model is not None:
            self._model.zero_grad(set_to_none=True)

    def nbytes(self) -> int:
        return held_bytes((self.data, self._model, self._initial))


class SiteCache:
    """Least-recently-used hospitals of this process, keyed by (run id, site)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str], tuple[str, CachedSite]] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}
        self.config = CacheConfig()
        self.builds = 0  # hospitals built (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: tuple[str, str], print_: str, build: Callable[[], CachedSite]) -> CachedSite:
        """The hospital for ``key`` built with fingerprint ``print_``; built now if absent or changed."""
        held = self._entries.get(key)
        if held is not None and held[0] == print_:
            self._entries.move_to_end(key)
            return held[1]
        if held is not None:
            logger.info("%s: the run config changed; building the hospital again", key[1])
            self.discard(key)
        hospital = build()
        self.builds += 1
        self._entries[key] = (print_, hospital)
        return hospital

    def done(self, key: tuple[str, str]) -> None:
        """After a message to ``key``: measure it again, then drop the least recently used others
        until both bounds hold (``key`` itself stays, even alone over ``cache_mib``)."""
        if key in self._entries:
            self._sizes[key] = self._entries[key][1].nbytes()
        limit = self.config.cache_mib * MIB
        for old in list(self._entries):
            if len(self._entries) <= self.config.cache_sites and self.nbytes() <= limit:
                break
            if old != key:
                self.discard(old)

    def discard(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)
        self._sizes.pop(key, None)

    def clear(self) -> None:
        """Forget every kept hospital and the build count."""
        self._entries.clear()
        self._sizes.clear()
        self.builds = 0

    def nbytes(self) -> int:
        """Bytes held by the kept hospitals, as last measured."""
        return sum(self._sizes.values())


#: This process's hospitals.
SITE_CACHE = SiteCache()
