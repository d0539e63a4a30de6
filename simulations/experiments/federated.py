"""The ``federated`` setting: the real Flower simulation engine, as ``fedvitgan simulate`` runs it.

The experiment's step budget is split over ``experiment.rounds`` rounds (``train.local_steps`` =
steps / rounds). Afterwards every round's global checkpoint is evaluated here on each hospital's
validation and test patches (pooled), which gives the curve and the final metrics; the hospitals'
own per-round evaluation is switched off to save time.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from common import protocol
from common.config import ConfigError
from common.data.sites import SiteData
from common.model import build_model
from common.run_config import RunConfig
from server.checkpoint import CheckpointStore
from simulations.experiments.inprocess import CurvePoint, evaluate_point, final_metrics


def federated_run_config(run: dict[str, Any], steps: int, rounds: int, seed: int, folder: Path) -> dict[str, Any]:
    """The simulation's config: ``rounds`` rounds of ``steps / rounds`` local steps, into ``folder``."""
    if rounds < 1 or steps % rounds:
        raise ConfigError(f"experiment.steps={steps} must be a multiple of experiment.rounds={rounds}")
    fed_run = copy.deepcopy(run)
    fed_run.pop("experiment", None)
    fed_run["seed"] = seed
    fed_run["federation"]["rounds"] = rounds
    fed_run["federation"]["evaluate_each_round"] = False
    fed_run["train"]["local_steps"] = steps // rounds
    fed_run["output_dir"] = str(folder)
    fed_run["resume"] = None
    return fed_run


def train_federated(run: dict[str, Any], config: RunConfig, sites: list[SiteData], steps: int, rounds: int,
                    seed: int, folder: Path) -> tuple[dict[str, Any], list[CurvePoint]]:
    """Run the federation of ``run`` (``config``: the same, typed) into ``folder``; returns pooled final
    metrics and the per-round curve."""
    from simulations.simulate import run_simulation_from_config

    fed_run = federated_run_config(run, steps, rounds, seed, folder)
    if folder.exists():  # an earlier attempt stopped half-way: start it afresh
        shutil.rmtree(folder)
    run_simulation_from_config(fed_run)
    summary = json.loads((folder / "summary.json").read_text())
    rounds_done = {int(r["round"]): r for r in summary.get("rounds", [])}
    if sorted(rounds_done) != list(range(1, rounds + 1)):
        raise RuntimeError(f"the federation in {folder} finished rounds {sorted(rounds_done)}, not 1..{rounds}; "
                           f"see {folder / 'simulate.log'}")
    model = build_model(config.model, len(sites[0].class_names), seed=seed)
    store = CheckpointStore(folder)
    curve: list[CurvePoint] = []
    seconds = 0.0
    for rnd in range(1, rounds + 1):
        model.load_state_dict(store.load_round(rnd))
        seconds += float(rounds_done[rnd]["seconds"])
        curve.append(evaluate_point(sites, [model] * len(sites), rnd * (steps // rounds), seconds))
    return final_metrics(sites, [model] * len(sites)), curve


def spent_epsilon(folder: Path) -> float | None:
    """The largest epsilon any hospital reported for this run (its last train reply; per hospital,
    by the run's accountant), or None when no hospital trained with DP."""
    summary = json.loads((folder / "summary.json").read_text())
    found = [float(site["train"][protocol.DP_EPSILON]) for entry in summary.get("rounds", [])
             for site in (entry.get("sites") or {}).values()
             if protocol.DP_EPSILON in ((site or {}).get("train") or {})]
    return max(found) if found else None


def final_global_model(folder: Path, config: RunConfig, num_classes: int, seed: int) -> Any:
    """The federation's last global model (from ``folder``'s newest checkpoint)."""
    model = build_model(config.model, num_classes, seed=seed)
    latest = CheckpointStore(folder).latest()
    if latest is None:
        raise RuntimeError(f"{folder} holds no checkpoint")
    model.load_state_dict(latest[1])
    return model
