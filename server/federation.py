"""The federated run: rounds of train + evaluate, checkpoints, sample grids, summary, resume.

A round waits once for the hospitals, then trains and evaluates, each phase with its own deadline
(``federation.round_timeout_s``; hospitals that miss it are named as stragglers). A round with
fewer than ``federation.min_sites`` valid train replies keeps the global model; after
``federation.max_failed_rounds`` such rounds in a row the run stops: ``summary.json`` says
``status: failed`` and why, the last checkpoint resumes it, and ``FederationFailed`` is raised.

Why a loop of our own rather than Flower's ``Strategy.start``: ``GroupedStrategy`` implements
Flower's Strategy API (``configure_train``/``aggregate_train``/``configure_evaluate``/
``aggregate_evaluate``), and this module drives it as ``Strategy.start`` does, but ``start`` (flwr
1.42) cannot carry what a run here needs: its rounds always run from 1 to ``num_rounds`` (a resumed
run continues at round N + 1, and hospitals key their local state by the server round); it has no
way to stop early (``federation.max_failed_rounds``) other than an exception from a callback; it
always sends the evaluate instruction, also after a round that kept the global model or with
``federation.evaluate_each_round=false``; and its one per-round hook, ``evaluate_fn(round, arrays)``,
runs after evaluation (and once before round 1), without the round's train and evaluate records or
its start time that the checkpoint, sample grid and summary entry are made from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.config import ConfigError
from common.data.registry import configured_class_names
from common.durable import atomic_write_json
from common.evaluation import METRIC_NAMES, save_generator_grid
from common.federation_config import FederationConfig
from common.model import initial_model, split_groups
from common.records import arrayrecord_to_tensors, state_nbytes, tensors_to_arrayrecord
from common.run_config import RunConfig, run_config
from common.secure_aggregation import check_secure_aggregation
from server.checkpoint import CheckpointStore, LatestCheckpoint
from server.collect import send_and_collect
from server.identity import SiteRegistry
from server.partition_report import write_partition_report
from server.replies import ReplyLimits
from server.run_lock import run_folder_lock
from server.secure_round import secure_train_phase
from server.strategy import AggregationConfig, GroupedStrategy, RoundRecord
from server.summary import CONFIG_COPY, RunSummary

logger = logging.getLogger("fedvitgan.server")


class FederationFailed(RuntimeError):
    """The run stopped: too many rounds in a row without enough valid replies (the message says more)."""


def _fingerprint(run: dict[str, Any], num_classes: int) -> str:
    """Identifies the model architecture a checkpoint belongs to."""
    payload = json.dumps({"model": run["model"], "num_classes": num_classes}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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


def _limits(typed: RunConfig, class_names: tuple[str, ...]) -> ReplyLimits:
    fed = typed.federation
    return ReplyLimits(tuple(class_names), fed.score_bins, fed.max_site_examples, typed.train.local_steps,
                       fed.max_abs_value, typed.privacy.enabled)


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
        **({"secure_aggregation": train.secure_aggregation} if train.secure_aggregation is not None else {}),
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


@dataclass
class _Federation:
    """What every round of a run uses: its config, the model, checkpoints, strategy and summary."""

    run: dict[str, Any]
    fed: FederationConfig
    run_dir: Path
    class_names: tuple[str, ...]
    model: torch.nn.Module
    fingerprint: str
    store: CheckpointStore
    registry: SiteRegistry
    strategy: GroupedStrategy
    summary: RunSummary
    start_round: int
    initial: ArrayRecord


def run_federation(grid: Grid, run: dict[str, Any], run_dir: Path | str) -> Path:
    """Run (or resume) ``run['federation']['rounds']`` rounds; returns the run folder.

    Raises ``FederationFailed`` (after writing ``status: failed`` and a checkpoint) when
    ``federation.max_failed_rounds`` rounds in a row had fewer than ``federation.min_sites`` valid replies.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(run_dir):  # one ServerApp per run folder
        return _run_locked(grid, run, run_dir)


def _run_locked(grid: Grid, run: dict[str, Any], run_dir: Path) -> Path:
    # 1. The typed config (every section checked: a run no hospital could train stops here, once), the
    #    model (from the last checkpoint when resuming), strategy and summary.
    typed = run_config(run)
    federation = _set_up(run, typed, run_dir)
    fed, arrays = federation.fed, federation.initial
    if federation.start_round > fed.rounds:
        _progress(f"{run_dir}: all {fed.rounds} rounds are done; raise federation.rounds to continue")
    # 2. The rounds: train, evaluate, then checkpoint, sample grid and summary entry of each.
    failed_in_a_row = 0
    for rnd in range(federation.start_round, fed.rounds + 1):
        arrays, train, checkpoint = _play_round(grid, federation, rnd, arrays)
        failed_in_a_row = 0 if train.aggregated else failed_in_a_row + 1
        # 3. Too many rounds in a row without enough valid replies: stop, resumable.
        if failed_in_a_row >= fed.max_failed_rounds:
            _stop_failed(federation, rnd, failed_in_a_row, train, checkpoint)
    # 4. Done: the status, the privacy report of a run with DP on, where it all is.
    _finish(federation.summary, "completed")
    if typed.privacy.enabled:
        _privacy_report(run_dir)
    _progress(f"run folder: {run_dir}")
    return run_dir


def _set_up(run: dict[str, Any], typed: RunConfig, run_dir: Path) -> _Federation:
    """Build the model, find where the run stands, and open strategy and summary."""
    fed = typed.federation
    class_names = configured_class_names(run["data"])
    faults = typed.faults  # checked here, injected by the hospitals
    if faults:
        _progress(f"fault injection (simulation): {len(faults)} fault(s) configured")
    model = initial_model(typed.model, len(class_names), seed=typed.seed)
    fingerprint = _fingerprint(run, len(class_names))
    store = CheckpointStore(run_dir, fed.checkpoint_keep_last)
    latest = store.latest()
    start_round, bindings = _resume_point(latest, store, run, run_dir, fingerprint, model)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    registry = SiteRegistry(bindings)
    aggregation = AggregationConfig.from_config(fed.aggregation)
    warnings = list(latest.warnings) if latest is not None and latest.warnings else []
    for note in aggregation.small_federation_warnings(fed.num_sites):
        logger.warning("%s", note)
        _progress(f"WARNING: {note}")
        warnings.append(note)
    strategy = GroupedStrategy(reference, aggregation, fed.transport_dtype,
                               json.dumps(run), _limits(typed, class_names), fed.num_sites, fed.min_sites,
                               fed.wait_for_sites_s, fed.round_timeout_s, registry)
    atomic_write_json(store.folder / CONFIG_COPY, run)  # a resume can start without summary.json
    summary = RunSummary(run_dir)
    if summary.damaged is not None:
        note = f"{summary.damage}; summary.json rebuilt from the checkpoints (their rounds' metrics are in the damaged copy)"
        logger.warning("%s", note)
        _progress(f"WARNING: {note}")
        warnings.append(note)
        summary.data = {"config": run, "rounds": [{"round": r, "checkpoint": str(store.path(r).relative_to(run_dir)),
                                                   "rebuilt": True} for r in store.rounds() if r < start_round],
                        "sessions": []}
    summary.start(run, _transport_entry(fed.transport_dtype, reference, strategy.sent_groups),
                  resumed_from=start_round - 1 if start_round > 1 else None,
                  warnings=warnings or None)
    summary.data.pop("failure", None)
    summary.set("status", "running")
    strategy.summary()
    return _Federation(run, fed, run_dir, class_names, model, fingerprint, store, registry, strategy, summary,
                       start_round, tensors_to_arrayrecord(reference))


def _transport_entry(transport: str, reference: dict[str, torch.Tensor], sent_groups: list[str]) -> dict[str, Any]:
    """summary.json's ``transport``: the dtype, and each group's bytes in it and in float32."""
    groups = split_groups(reference)
    return {"dtype": transport, "group_bytes": {g: state_nbytes(e, transport) for g, e in groups.items()},
            "group_bytes_float32": {g: state_nbytes(e, "float32") for g, e in groups.items()},
            "sent_groups": sent_groups}


def _train_and_evaluate(grid: Grid, federation: _Federation, rnd: int, arrays: ArrayRecord
                        ) -> tuple[ArrayRecord, RoundRecord, RoundRecord | None, dict[str, float]]:
    """One round's phases: the new global arrays (or the old ones), the train and evaluate records,
    and each phase's seconds (sent, worked on at the hospitals, received)."""
    strategy, fed = federation.strategy, federation.fed
    started = time.perf_counter()
    secure = check_secure_aggregation(fed.secure_aggregation, fed.secaggplus, fed.aggregation, fed.num_sites)
    if secure is not None:
        new_arrays = secure_train_phase(grid, strategy, fed, secure, rnd, arrays)
    else:
        replies = send_and_collect(grid, strategy.configure_train(rnd, arrays, ConfigRecord(), grid),
                                   timeout_s=fed.round_timeout_s, poll_s=fed.reply_poll_s)
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
    phases = {"train": time.perf_counter() - started}
    if new_arrays is None:
        return arrays, strategy.train_record, None, phases
    if not fed.evaluate_each_round:
        return new_arrays, strategy.train_record, None, phases
    sent = time.perf_counter()
    replies = send_and_collect(grid, strategy.configure_evaluate(rnd, new_arrays, ConfigRecord(), grid),
                               timeout_s=fed.round_timeout_s, poll_s=fed.reply_poll_s)
    phases["evaluate"] = time.perf_counter() - sent
    strategy.aggregate_evaluate(rnd, replies)
    return new_arrays, strategy.train_record, strategy.evaluate_record, phases


def _play_round(grid: Grid, federation: _Federation, rnd: int, arrays: ArrayRecord
                ) -> tuple[ArrayRecord, RoundRecord, Path]:
    """Round ``rnd``: its phases, then its checkpoint, sample grid, partition report and summary entry."""
    run, run_dir, total_rounds = federation.run, federation.run_dir, federation.fed.rounds
    started = time.perf_counter()
    _progress(f"[round {rnd}/{total_rounds}] training at the hospitals ...")
    arrays, train, evaluate, phases = _train_and_evaluate(grid, federation, rnd, arrays)
    state = arrayrecord_to_tensors(arrays)
    checkpoint = federation.store.save(rnd, state, federation.fingerprint,
                                       {"train_aggregated": train.aggregated,
                                        "site_bindings": federation.registry.bindings})
    entry = _round_entry(rnd, 0.0, train, evaluate)
    if train.aggregated:
        federation.model.load_state_dict(state)
        grid_path = save_generator_grid(federation.model, federation.class_names,
                                        run_dir / "samples" / f"round-{rnd:03d}.png",
                                        per_class=int(run["samples_per_class"]), seed=int(run["seed"]),
                                        title=f"global generator after round {rnd}")
        entry["samples"] = str(grid_path.relative_to(run_dir))
    if train.class_counts:
        write_partition_report(run_dir, train.class_counts)
    entry["seconds"] = time.perf_counter() - started
    entry["phase_seconds"] = phases
    entry["checkpoint"] = str(checkpoint.relative_to(run_dir))
    strategy = federation.strategy
    if strategy.notes:
        entry["notes"], strategy.notes = list(strategy.notes), []
    federation.summary.data["site_bindings"] = dict(federation.registry.bindings)
    federation.summary.add_round(entry)
    _progress(_round_line(rnd, total_rounds, entry, train))
    return arrays, train, checkpoint


def _stop_failed(federation: _Federation, rnd: int, failed_in_a_row: int, train: RoundRecord,
                 checkpoint: Path) -> None:
    """Record ``status: failed`` with the reason and how to resume, and raise ``FederationFailed``."""
    fed, run_dir = federation.fed, federation.run_dir
    message = (f"stopped after round {rnd}: {failed_in_a_row} round(s) in a row with fewer than "
               f"federation.min_sites={fed.min_sites} valid replies (federation.max_failed_rounds="
               f"{fed.max_failed_rounds}). Last: {train.failure}. The last checkpoint "
               f"({checkpoint.relative_to(run_dir)}) resumes the run once the hospitals are back: resume={run_dir}")
    _finish(federation.summary, "failed", message)
    _progress(f"FAILED: {message}")
    raise FederationFailed(message)


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
