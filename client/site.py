"""Who this hospital is and where its data lives, from Flower's node config.

Deployment (``flower-supernode --node-config``) keys, all optional except where noted:

- ``site-id`` (int, required in deployment): this hospital's index, 0-based;
- ``num-sites`` (int): hospitals in the federation (default: the run's ``federation.num_sites``);
- ``site-name`` (str): name in logs and reports (default ``site-<id>``);
- ``dataset`` (str): data set name, overrides the run's ``data.name``;
- ``data-root`` (str): this hospital's data folder, overrides the run's ``data.root``;
- ``state-dir`` (str): the hospital's local state folder (default ``~/.fedvitgan/sites``; in a
  simulation ``<run folder>/sites``);
- ``device`` (str): ``cpu``, ``cuda`` or ``cuda:N`` (default: the run's ``device``).

In simulation Flower fills ``partition-id`` and ``num-partitions``, which stand in for the first two.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError


@dataclass(frozen=True)
class SiteIdentity:
    """A hospital's index, name, number of hospitals, data config and state folder."""

    site_id: int
    num_sites: int
    name: str
    data: dict[str, Any]
    state_dir: Path
    device: str

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: Mapping[str, Any], run_dir: str | None) -> SiteIdentity:
        """Resolve the site from ``node_config`` and the run's plain config."""
        raw_id = node_config.get("site-id", node_config.get("partition-id"))
        if raw_id is None:
            raise ConfigError("node config lacks 'site-id' (set --node-config \"site-id=N ...\" on the SuperNode)")
        try:
            site_id = int(raw_id)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"node config 'site-id' must be an integer, got {raw_id!r}") from error
        num_sites = int(node_config.get("num-sites", node_config.get("num-partitions", run["federation"]["num_sites"])))
        if not 0 <= site_id < num_sites:
            raise ConfigError(f"node config 'site-id' {site_id} is outside 0..{num_sites - 1}")
        name = str(node_config.get("site-name", f"site-{site_id}"))
        data = copy.deepcopy(dict(run["data"]))
        if "dataset" in node_config:
            data["name"] = str(node_config["dataset"])
        if "data-root" in node_config:
            data["root"] = str(node_config["data-root"])
        state_root = node_config.get("state-dir") or run["federation"].get("state_dir")
        if not state_root:
            # Only a simulated hospital shares the coordinator's disk; a deployed one keeps its
            # state on its own machine (the run folder path is the coordinator's).
            simulated = "partition-id" in node_config and run_dir
            state_root = Path(run_dir) / "sites" if simulated else Path.home() / ".fedvitgan" / "sites"
        device = str(node_config.get("device", run.get("device", "auto")))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(site_id, num_sites, name, data, Path(state_root).expanduser() / name, device)
