"""The federated run: rounds of train + evaluate, checkpoints, sample grids, summary, resume."""

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
from common.model import GROUPS, ModelConfig, build_model
from common.records import check_transport_dtype, state_nbytes
from server.checkpoint import CheckpointStore
from server.partition_report import write_partition_report
from server.strategy import GroupedFedAvg, GroupRule
from server.summary import RunSummary

logger = logging.getLogger("fedvitgan.server")


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


def run_federation(grid: Grid, run: dict[str, Any], run_dir: Path | str) -> Path:
    """Run (or resume) ``run['federation']['rounds']`` rounds; returns the run folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = run["federation"]
    transport = str(fed["transport_dtype"])
    check_transport_dtype(transport)
    class_names = configured_class_names(run["data"])
    model = build_model(dataclass_from_mapping(ModelConfig, run["model"], "model"), len(class_names),
                        seed=int(run["seed"]))
    fingerprint = _fingerprint(run, len(class_names))
    store = CheckpointStore(run_dir, int(fed.get("checkpoint_keep_last", 0)))
    start_round = 1
    latest = store.latest()
    if latest is not None and not run.get("resume"):
        raise ConfigError(f"{run_dir} already holds a run (checkpoints up to round {latest.state.round}); "
                          f"continue it with resume={run_dir} or choose another folder (hydra.run.dir=...)")
    if latest is None and run.get("resume"):
        _progress(f"resume: {run_dir} has no finished round yet; starting from round 1")
    if latest is not None:
        state, weights = latest.state, latest.weights
        if state.config_fingerprint and state.config_fingerprint != fingerprint:
            raise ConfigError(f"{store.folder}: the checkpoint was made with another model architecture "
                              f"or class count; resume with the run's own config")
        model.load_state_dict(weights)
        start_round = state.round + 1
        _progress(f"resuming {run_dir} after round {state.round}")
    rules = {g: dataclass_from_mapping(GroupRule, fed["aggregation"][g], f"federation.aggregation.{g}") for g in GROUPS}
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = GroupedFedAvg(reference, rules, transport, json.dumps(run), int(fed["num_sites"]),
                             int(fed.get("min_sites", 1)), float(fed.get("wait_for_sites_s", 300)))
    group_bytes = {g: state_nbytes({k: v for k, v in reference.items() if k.startswith(g + ".")}, transport)
                   for g in GROUPS}
    group_bytes_f32 = {g: state_nbytes({k: v for k, v in reference.items() if k.startswith(g + ".")}, "float32")
                       for g in GROUPS}
    summary = RunSummary(run_dir)
    summary.start(run, {"dtype": transport, "group_bytes": group_bytes, "group_bytes_float32": group_bytes_f32,
                        "sent_groups": strategy.sent_groups},
                  resumed_from=start_round - 1 if start_round > 1 else None,
                  warnings=latest.warnings if latest is not None else None)
    strategy.summary()
    arrays = _to_arrays(reference)
    total_rounds = int(fed["rounds"])
    if start_round > total_rounds:
        _progress(f"{run_dir}: all {total_rounds} rounds are done; raise federation.rounds to continue")
    timeout = float(fed.get("round_timeout_s", 3600))
    for rnd in range(start_round, total_rounds + 1):
        started = time.perf_counter()
        _progress(f"[round {rnd}/{total_rounds}] training at the hospitals ...")
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid), timeout=timeout)
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        train = strategy.train_record
        global_metrics: dict[str, float] = {}
        evaluate = None
        if fed.get("evaluate_each_round", True):
            replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
                                            timeout=timeout)
            aggregated = strategy.aggregate_evaluate(rnd, replies)
            global_metrics = {k: float(v) for k, v in aggregated.items()} if aggregated is not None else {}
            evaluate = strategy.evaluate_record
        state = _to_state(arrays)
        checkpoint = store.save(rnd, state, fingerprint, {"train_aggregated": train.aggregated})
        model.load_state_dict(state)
        grid_path = save_generator_grid(model, class_names, run_dir / "samples" / f"round-{rnd:03d}.png",
                                        per_class=int(run.get("samples_per_class", 8)), seed=int(run["seed"]),
                                        title=f"global generator after round {rnd}")
        if train.class_counts:
            write_partition_report(run_dir, train.class_counts)
        seconds = time.perf_counter() - started
        sites: dict[str, dict[str, Any]] = {}
        for name, metrics in train.sites.items():
            sites.setdefault(name, {})["train"] = metrics
        if evaluate is not None:
            for name, metrics in evaluate.sites.items():
                sites.setdefault(name, {})["evaluate"] = metrics
        summary.add_round({
            "round": rnd,
            "seconds": seconds,
            "global": {k: global_metrics.get(k, float("nan")) for k in (*METRIC_NAMES, "examples")},
            "sites": sites,
            "aggregated": train.aggregated,
            "excluded": train.excluded + ([{**e, "phase": "evaluate"} for e in evaluate.excluded] if evaluate else []),
            "budget_exhausted": train.budget_exhausted,
            "bytes": {
                "train_to_sites": train.bytes_to_sites,
                "train_from_sites": train.bytes_from_sites,
                "evaluate_to_sites": evaluate.bytes_to_sites if evaluate else 0,
            },
            "checkpoint": str(checkpoint.relative_to(run_dir)),
            "samples": str(grid_path.relative_to(run_dir)),
        })
        shown = "  ".join(f"{k} {global_metrics[k]:.3f}" for k in METRIC_NAMES
                          if k in global_metrics and np.isfinite(global_metrics[k]))
        excluded = len(summary.data["rounds"][-1]["excluded"])
        stopped = f" ({len(train.budget_exhausted)} at their privacy budget)" if train.budget_exhausted else ""
        _progress(f"[round {rnd}/{total_rounds}] {len(train.sites)} hospitals aggregated, {excluded} left out{stopped}, "
                  f"{seconds:.1f} s  |  global: {shown or 'no evaluation'}")
    summary.set("completed_rounds", max([r["round"] for r in summary.data.get("rounds", [])], default=0))
    if (run.get("privacy") or {}).get("enabled"):
        _privacy_report(run_dir)
    _progress(f"run folder: {run_dir}")
    return run_dir
