"""Continuing a stopped run: its own recorded config, frozen, with the few changes a resume may make.

One function for both ways a run is started: ``fedvitgan simulate resume=RUN`` and a deployment's
``flwr run ... --run-config "overrides='resume=RUN federation.rounds=N'"`` (``server.app``). The
stopped run's config is read from its ``summary.json``; only rounds, timeouts, the number of failed
rounds tolerated, the simulation's ``faults`` and the device may change, so a resume can never turn
differential privacy off, change the aggregation or point the hospitals somewhere else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.config import ConfigError
from server.summary import CONFIG_COPY

logger = logging.getLogger("fedvitgan.server")

#: Keys a resumed run may change; everything else must match the stopped run.
RESUMABLE_KEYS = ("federation.rounds", "federation.round_timeout_s", "federation.reply_poll_s",
                  "federation.wait_for_sites_s",
                  "federation.max_failed_rounds", "faults", "device")
#: Sections about how a command reports (not what it trains): always the current command's.
REPORTING_SECTIONS = ("console", "tracking")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _reporting(key: str) -> bool:
    return key.split(".", 1)[0] in REPORTING_SECTIONS


def _add_new_keys(resumed: dict[str, Any], newer: Mapping[str, Any]) -> None:
    """Keys ``conf/`` gained after the stopped run started take ``newer``'s value (the run never set them)."""
    for key, value in newer.items():
        if key not in resumed:
            resumed[key] = value
        elif isinstance(value, Mapping) and isinstance(resumed[key], dict):
            _add_new_keys(resumed[key], value)


def resolve_resume(resume: str | Path, overrides: Sequence[str],
                   current: Mapping[str, Any] | None = None,
                   newer_keys_from: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config of the run in folder ``resume`` with the resumable ``overrides`` applied.

    ``overrides`` are the Hydra overrides given with the resume (``resume=`` itself, ``hydra.*``
    and an ``output_dir`` naming the same folder are accepted and ignored; ``console.*`` and
    ``tracking.*`` are taken from ``current``, the resuming command's own config); any other key
    is a ``ConfigError`` naming it. A key the stopped run's config lacks (added to ``conf/``
    since) takes its value from ``newer_keys_from``, or else from ``current``.
    """
    folder = Path(resume).expanduser().resolve()
    summary_path = folder / "summary.json"
    copy_path = folder / "checkpoints" / CONFIG_COPY
    if not summary_path.is_file() and not copy_path.is_file():
        raise ConfigError(f"resume={folder}: no summary.json there; is it a fedvitgan run folder?")
    try:
        saved = json.loads(summary_path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        try:  # the copy the run keeps beside its checkpoints
            saved = json.loads(copy_path.read_text())
            logger.warning("resume=%s: %s cannot be read (%s); using the config in %s", folder, summary_path,
                           error, copy_path)
        except (OSError, ValueError) as copy_error:
            raise ConfigError(f"resume={folder}: cannot read the stopped run's config from {summary_path} ({error}) "
                              f"nor from {copy_path} ({copy_error})") from error
    refused = []
    for override in overrides:
        key = _key(override)
        if key in (*RESUMABLE_KEYS, "resume") or key.startswith("hydra.") or _reporting(key):
            continue
        if key == "output_dir" and "=" in override and Path(override.split("=", 1)[1]).expanduser().resolve() == folder:
            continue
        refused.append(key)
    if refused:
        raise ConfigError(f"resume: {refused} cannot change when resuming; only {list(RESUMABLE_KEYS)} can "
                          f"(the rest is the stopped run's config, from {summary_path})")
    merged = OmegaConf.create(saved)
    if current is not None:  # the overrides as Hydra parsed them (lists such as faults=[{site:1,...}], numbers)
        composed = OmegaConf.create(dict(current))
        for key in {_key(o) for o in overrides if _key(o) in RESUMABLE_KEYS}:
            OmegaConf.update(merged, key, OmegaConf.select(composed, key), force_add=True)
    else:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([o.lstrip("+~") for o in overrides
                                                                 if _key(o) in RESUMABLE_KEYS]))
    resumed = OmegaConf.to_container(merged, resolve=True)
    assert isinstance(resumed, dict)
    if newer_keys_from is not None or current is not None:
        _add_new_keys(resumed, newer_keys_from if newer_keys_from is not None else current)  # type: ignore[arg-type]
    resumed["resume"] = str(folder)
    resumed["output_dir"] = str(folder)
    for section in REPORTING_SECTIONS:
        if current is not None and section in current:
            resumed[section] = current[section]
    return resumed
