"""The federated run: rounds of train + evaluate, checkpoints, sample grids, summary, resume.

A round waits once for the hospitals, then trains and evaluates, each phase with its own deadline
(``federation.round_timeout_s``; hospitals that miss it are named as stragglers). A round with
fewer than ``federation.min_sites`` valid train replies keeps the global model; after
``federation.max_failed_rounds`` such rounds in a row the run stops: ``summary.json`` says
``status: failed`` and why, the last checkpoint resumes it, and ``FederationFailed`` is raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.config import ConfigError, dataclass_from_mapping
from common.data.sites import configured_class_names
from common.evaluation import METRIC_NAMES, save_generator_grid
from common.faults import parse_faults
from common.model import GROUPS, ModelConfig, build_model
from common.records import check_transport_dtype, state_nbytes
from server.checkpoint import CheckpointStore, LatestCheckpoint
from server.identity import SiteRegistry
from server.partition_report import write_partition_report
from server.replies import ReplyLimits
from server.strategy import AggregationConfig, GroupedStrategy, RoundRecord
from server.summary import RunSummary

logger = logging.getLogger("fedvitgan.server")


class FederationFailed(RuntimeError):
    """The run stopped: too many rounds in a row without enough valid replies (the message says more)."""


def _fingerprint(run: dict[str, Any], num_classes: int) -> str:
    """Identifies the model architecture a checkpoint belongs to."""
    payload = json.dumps({"model": run["model"], "num_classes": num_classes}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy().copy()) for k, v in state.items()})


def _to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(arrays[k].numpy().copy()) for k in arrays.keys()}


def _progress(text: str) -> None:
    """Progress for the person running the federation (stdout reaches `flwr log` too)."""
    print(text, flush=True)
    logger.debug(text)


def _privacy_report(run_dir: Path) -> None:
    """The privacy-budget report of a run with DP on (privacy/ in the run folder)."""
    from common.privacy.report import write_privacy_report

    try:
        paths = write_privacy_report(run_dir)
    except Exception:  # the run itself is done and saved; say why the report is missing
        logger.exception("could not write the privacy report")
        _progress(f"privacy report FAILED (see the log); retry with: fedvitgan privacy-report {run_dir}")
        return
    _progress(f"privacy report: {paths['md']}")


def _limits(run: dict[str, Any], class_names: tuple[str, ...]) -> ReplyLimits:
    fed = run["federation"]
    limits = ReplyLimits(tuple(class_names), int(fed.get("score_bins", 1000)), int(fed.get("max_site_examples", 10_000_000)),
                         int(run["train"]["local_steps"]))
    if limits.score_bins < 1 or limits.max_site_examples < 1:
        raise ConfigError("federation.score_bins and federation.max_site_examples must be >= 1")
    return limits


def _round_entry(rnd: int, seconds: float, train: RoundRecord, evaluate: RoundRecord | None) -> dict[str, Any]:
    """The round's entry in summary.json."""
    sites: dict[str, dict[str, Any]] = {}
    for name, metrics in train.sites.items():
        sites.setdefault(name, {})["train"] = metrics
    if evaluate is not None:
        for name, metrics in evaluate.sites.items():
            sites.setdefault(name, {})["evaluate"] = metrics
    global_metrics = evaluate.global_metrics if evaluate is not None else {}
    return {
        "round": rnd,
        "seconds": seconds,
        "global": {k: global_metrics.get(k, float("nan")) for k in (*METRIC_NAMES, "examples")},
        "sites": sites,
        "aggregated": train.aggregated,
        "failure": train.failure,
        "aggregation": train.groups,
        "excluded": train.excluded + (evaluate.excluded if evaluate is not None else []),
        "budget_exhausted": train.budget_exhausted,
        "bytes": {
            "train_to_sites": train.bytes_to_sites,
            "train_from_sites": train.bytes_from_sites,
            "evaluate_to_sites": evaluate.bytes_to_sites if evaluate is not None else 0,
        },
    }


def _resume_point(latest: LatestCheckpoint | None, store: CheckpointStore, run: dict[str, Any], run_dir: Path,
                  fingerprint: str, model: torch.nn.Module) -> tuple[int, dict[str, int]]:
    """The first round to run and the saved site bindings; loads the ``latest`` checkpoint into ``model``."""
    if latest is not None and not run.get("resume"):
        raise ConfigError(f"{run_dir} already holds a run (checkpoints up to round {latest.state.round}); "
                          f"continue it with resume={run_dir} or choose another folder (hydra.run.dir=...)")
    if latest is None:
        if run.get("resume"):
            _progress(f"resume: {run_dir} has no finished round yet; starting from round 1")
        return 1, {}
    state = latest.state
    if state.config_fingerprint and state.config_fingerprint != fingerprint:
        raise ConfigError(f"{store.folder}: the checkpoint was made with another model architecture "
                          f"or class count; resume with the run's own config")
    model.load_state_dict(latest.weights)
    _progress(f"resuming {run_dir} after round {state.round}")
    return state.round + 1, dict(state.extra.get("site_bindings") or {})


def run_federation(grid: Grid, run: dict[str, Any], run_dir: Path | str) -> Path:
    """Run (or resume) ``run['federation']['rounds']`` rounds; returns the run folder.

    Raises ``FederationFailed`` (after writing ``status: failed`` and a checkpoint) when
    ``federation.max_failed_rounds`` rounds in a row had fewer than ``federation.min_sites`` valid replies.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = run["federation"]
    transport = str(fed["transport_dtype"])
    check_transport_dtype(transport)
    class_names = configured_class_names(run["data"])
    faults = parse_faults(run.get("faults"), int(fed["num_sites"]))  # checked here, injected by the hospitals
    if faults:
        _progress(f"fault injection (simulation): {len(faults)} fault(s) configured")
    model = build_model(dataclass_from_mapping(ModelConfig, run["model"], "model"), len(class_names),
                        seed=int(run["seed"]))
    fingerprint = _fingerprint(run, len(class_names))
    store = CheckpointStore(run_dir, int(fed.get("checkpoint_keep_last", 0)))
    latest = store.latest()
    start_round, bindings = _resume_point(latest, store, run, run_dir, fingerprint, model)
    min_sites = int(fed.get("min_sites", 1))
    max_failed = int(fed.get("max_failed_rounds", 3))
    if min_sites < 1 or max_failed < 1:
        raise ConfigError("federation.min_sites and federation.max_failed_rounds must be >= 1")
    timeout = float(fed.get("round_timeout_s", 3600))
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    registry = SiteRegistry(bindings)
    strategy = GroupedStrategy(reference, AggregationConfig.from_config(fed["aggregation"]), transport, json.dumps(run),
                               _limits(run, class_names), int(fed["num_sites"]), min_sites,
                               float(fed.get("wait_for_sites_s", 300)), timeout, registry)
    group_bytes = {g: state_nbytes({k: v for k, v in reference.items() if k.startswith(g + ".")}, transport)
                   for g in GROUPS}
    group_bytes_f32 = {g: state_nbytes({k: v for k, v in reference.items() if k.startswith(g + ".")}, "float32")
                       for g in GROUPS}
    summary = RunSummary(run_dir)
    summary.start(run, {"dtype": transport, "group_bytes": group_bytes, "group_bytes_float32": group_bytes_f32,
                        "sent_groups": strategy.sent_groups},
                  resumed_from=start_round - 1 if start_round > 1 else None,
                  warnings=latest.warnings if latest is not None else None)
    summary.data.pop("failure", None)
    summary.set("status", "running")
    strategy.summary()
    arrays = _to_arrays(reference)
    total_rounds = int(fed["rounds"])
    if start_round > total_rounds:
        _progress(f"{run_dir}: all {total_rounds} rounds are done; raise federation.rounds to continue")
    failed_in_a_row = 0
    for rnd in range(start_round, total_rounds + 1):
        started = time.perf_counter()
        _progress(f"[round {rnd}/{total_rounds}] training at the hospitals ...")
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid), timeout=timeout)
        phases = {"train": time.perf_counter() - started}  # sent, trained at the hospitals, received
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        train = strategy.train_record
        evaluate = None
        if new_arrays is not None:
            arrays = new_arrays
            failed_in_a_row = 0
            if fed.get("evaluate_each_round", True):
                sent = time.perf_counter()
                replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
                                                timeout=timeout)
                phases["evaluate"] = time.perf_counter() - sent
                strategy.aggregate_evaluate(rnd, replies)
                evaluate = strategy.evaluate_record
        else:
            failed_in_a_row += 1
        state = _to_state(arrays)
        checkpoint = store.save(rnd, state, fingerprint, {"train_aggregated": train.aggregated,
                                                          "site_bindings": registry.bindings})
        entry = _round_entry(rnd, 0.0, train, evaluate)
        if train.aggregated:
            model.load_state_dict(state)
            grid_path = save_generator_grid(model, class_names, run_dir / "samples" / f"round-{rnd:03d}.png",
                                            per_class=int(run.get("samples_per_class", 8)), seed=int(run["seed"]),
                                            title=f"global generator after round {rnd}")
            entry["samples"] = str(grid_path.relative_to(run_dir))
        if train.class_counts:
            write_partition_report(run_dir, train.class_counts)
        entry["seconds"] = time.perf_counter() - started
        entry["phase_seconds"] = phases
        entry["checkpoint"] = str(checkpoint.relative_to(run_dir))
        if strategy.notes:
            entry["notes"], strategy.notes = list(strategy.notes), []
        summary.data["site_bindings"] = dict(registry.bindings)
        summary.add_round(entry)
        _progress(_round_line(rnd, total_rounds, entry, train))
        if failed_in_a_row >= max_failed:
            message = (f"stopped after round {rnd}: {failed_in_a_row} round(s) in a row with fewer than "
                       f"federation.min_sites={min_sites} valid replies (federation.max_failed_rounds={max_failed}). "
                       f"Last: {train.failure}. The last checkpoint ({checkpoint.relative_to(run_dir)}) resumes the "
                       f"run once the hospitals are back: resume={run_dir}")
            _finish(summary, "failed", message)
            _progress(f"FAILED: {message}")
            raise FederationFailed(message)
    _finish(summary, "completed")
    if (run.get("privacy") or {}).get("enabled"):
        _privacy_report(run_dir)
    _progress(f"run folder: {run_dir}")
    return run_dir


def _round_line(rnd: int, total_rounds: int, entry: dict[str, Any], train: RoundRecord) -> str:
    """The console line of a finished round."""
    shown = "  ".join(f"{k} {entry['global'][k]:.3f}" for k in METRIC_NAMES
                      if isinstance(entry["global"].get(k), float) and np.isfinite(entry["global"][k]))
    stopped = f" ({len(train.budget_exhausted)} at their privacy budget)" if train.budget_exhausted else ""
    head = f"[round {rnd}/{total_rounds}] "
    if not train.aggregated:
        return head + f"NOT aggregated: {train.failure}; {len(entry['excluded'])} left out, {entry['seconds']:.1f} s"
    return (head + f"{len(train.sites)} hospitals aggregated, {len(entry['excluded'])} left out{stopped}, "
            f"{entry['seconds']:.1f} s  |  global (pooled): {shown or 'no evaluation'}")


def _finish(summary: RunSummary, status: str, failure: str | None = None) -> None:
    summary.data["completed_rounds"] = max([r["round"] for r in summary.data.get("rounds", [])], default=0)
    summary.data["status"] = status
    if failure:
        summary.data["failure"] = failure
    summary.write()
