"""Who this hospital is, where its data and state live, and what it accepts: from its node config.

Deployment (``flower-supernode --node-config``) keys; ``site-id`` is required, the rest optional:

- ``site-id`` (int): this hospital's index, 0-based;
- ``num-sites`` (int): hospitals in the federation (default: the run's ``federation.num_sites``);
- ``site-name`` (str): name in logs and reports (default ``site-<id>``);
- ``dataset`` (str): data set name, overrides the run's ``data.name``;
- ``device`` (str): ``cpu``, ``cuda`` or ``cuda:N`` (default: the run's ``device``);
- ``test-split`` (str): the held-out split this hospital evaluates on (default: the data set's own;
  a run naming another, or a held-out split that overlaps the training split, is refused);
- the policy keys of ``client.policy`` (``data-root``, ``state-dir``, ``cache-dir``,
  ``privacy-required``, ``privacy-scope``, ``min-noise-multiplier``, ``max-epsilon``,
  ``max-grad-norm``). ``state-dir`` defaults to ``~/.fedvitgan/sites``.

An unknown key is an error (a misspelt privacy floor must not be ignored silently). In a
simulation Flower fills ``partition-id`` and ``num-partitions``, which stand in for the first two,
and the policy comes from the run's ``sites.<name>.policy`` (node config policy keys, if any, on
top); the state folder defaults to
``<run folder>/sites``. A hospital is *deployed* when its node config has ``site-id``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.paths import check_held_out, confine_splits, pin_test_split
from client.policy import NODE_KEYS, PublicError, SitePolicy, check_deployment_keys
from common.device import resolve_device

IDENTITY_KEYS = ("site-id", "num-sites", "site-name", "dataset", "device", "test-split", "app-sha256")
FLOWER_SIMULATION_KEYS = ("partition-id", "num-partitions")


def _int_key(node_config: Mapping[str, Any], key: str, fallback: str, default: Any) -> int:
    raw = node_config.get(key, node_config.get(fallback, default))
    if raw is None:
        raise PublicError(f"node config lacks {key!r} (set --node-config \"{key}=N ...\" on the SuperNode)")
    try:
        return int(raw)
    except (TypeError, ValueError) as error:
        raise PublicError(f"node config {key!r} must be an integer, got {raw!r}") from error


@dataclass(frozen=True)
class SiteIdentity:
    """A hospital's index, name, number of hospitals, data config, state folder and policy."""

    site_id: int
    num_sites: int
    name: str
    data: dict[str, Any]
    state_dir: Path
    device: str
    policy: SitePolicy = field(default_factory=SitePolicy)
    deployed: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: Mapping[str, Any], run_dir: str | None) -> SiteIdentity:
        """Resolve the site from ``node_config`` and the run's plain config; ``Refusal`` when the run
        asks for what this hospital does not accept (paths, simulation-only keys)."""
        deployed = "site-id" in node_config
        unknown = sorted(set(node_config) - set(IDENTITY_KEYS) - set(NODE_KEYS) - set(FLOWER_SIMULATION_KEYS))
        if unknown:
            raise PublicError(f"node config key(s) {unknown} are not known; known keys: "
                              f"{sorted([*IDENTITY_KEYS, *NODE_KEYS])}")
        site_id = _int_key(node_config, "site-id", "partition-id", None)
        num_sites = _int_key(node_config, "num-sites", "num-partitions", run["federation"]["num_sites"])
        if not 0 <= site_id < num_sites:
            raise PublicError(f"node config 'site-id' {site_id} is outside 0..{num_sites - 1}")
        name = str(node_config.get("site-name", f"site-{site_id}"))
        if deployed:
            policy = SitePolicy.from_node_config(node_config)
            check_deployment_keys(run, policy)
        else:  # the run's sites.<name>.policy, with any policy key of the node config on top
            sites = run.get("sites") or {}
            policy = dataclasses.replace(
                SitePolicy.from_mapping((sites.get(name) or {}).get("policy"), f"sites.{name}.policy"),
                **{f: node_config[k] for k, f in NODE_KEYS.items() if k in node_config})
        data = copy.deepcopy(dict(run["data"]))
        if "dataset" in node_config and str(node_config["dataset"]) != data.get("name"):
            from common.data.registry import hospital_data_section  # the loaders: only when needed

            data = hospital_data_section(str(node_config["dataset"]), data)
        if policy.data_root is not None:
            data["root"] = policy.data_root
        if policy.cache_dir is not None and "cache_dir" in data:  # the data sets that inflate files
            data["cache_dir"] = policy.cache_dir
        confine_splits(data)
        if deployed:
            pin_test_split(data, node_config.get("test-split"))
        check_held_out(data)
        state_root = policy.state_dir or (None if deployed else run["federation"].get("state_dir"))
        if not state_root:
            # Only a simulated hospital shares the coordinator's disk; a deployed one keeps its
            # state on its own machine (the run folder path is the coordinator's).
            state_root = Path(run_dir) / "sites" if (not deployed and run_dir) else Path.home() / ".fedvitgan" / "sites"
        device = resolve_device(node_config.get("device", run.get("device")))
        return cls(site_id, num_sites, name, data, Path(state_root).expanduser() / name, device, policy, deployed)
