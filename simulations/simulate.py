"""``fedvitgan simulate``: N hospitals on one machine with Flower's simulation engine.

    fedvitgan simulate [hydra overrides]
    fedvitgan simulate federation.num_sites=5 federation.rounds=10 train.local_steps=100
    fedvitgan simulate partition=dirichlet partition.alpha=0.3 data.labeled_fraction=0.1
    fedvitgan simulate hydra.run.dir=runs/demo
    fedvitgan simulate resume=runs/demo federation.rounds=20     # continue a stopped run
    fedvitgan simulate --quiet tracking=mlflow                    # per-round lines only; log to MLflow
    fedvitgan simulate -m seed=0,1,2                              # Hydra multirun: one run folder per job
    fedvitgan simulate 'faults=[{site:1,kind:scale,scale:1e4,rounds:all}]' \
        federation.aggregation.discriminator.rule=median          # a hostile hospital (simulation only)

The run folder (printed at the end) holds summary.json, checkpoints/, samples/, partition.md, the
run report (report.md, curves.png) and the hospitals' state folders (sites/). ``--help`` lists the
config groups; ``--cfg job`` prints the composed config without running. A run that stops after
``federation.max_failed_rounds`` failed rounds exits with status 3 (``status: failed`` in
summary.json) and can be resumed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from common.config import CONF_DIR, ConfigError, plain_config  # noqa: E402
from common.data.errors import DataError  # noqa: E402
from common.data.registry import configured_class_names  # noqa: E402
from common.faults import parse_faults  # noqa: E402
from common.federation_config import federation_config  # noqa: E402
from server.resume import resolve_resume  # noqa: E402
from simulations.commands import run_hydra_main  # noqa: E402
from simulations.console import quiet_driver_logging, round_lines_only, start_ray, stop_ray  # noqa: E402
from simulations.report import write_run_report  # noqa: E402
from simulations.tracking import open_tracker  # noqa: E402

logger = logging.getLogger("fedvitgan.simulate")

QUIET_FLAG = "--quiet"
#: Exit status of a run that stopped after federation.max_failed_rounds failed rounds.
EXIT_FAILED = 3


def run_simulation_from_config(run: dict[str, Any]) -> Path:
    """Start Flower's simulation engine with ``num_sites`` virtual SuperNodes."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    fed = federation_config(run["federation"])
    backend_config = {
        "client_resources": {"num_cpus": float(fed.backend["num_cpus"]), "num_gpus": float(fed.backend["num_gpus"])},
        "init_args": {"logging_level": "ERROR", "log_to_driver": True},
    }
    start_ray(backend_config, quiet=bool((run.get("console") or {}).get("quiet")))
    try:
        run_simulation(server_app=make_server_app(run), client_app=client_app, num_supernodes=fed.num_sites,
                       backend_config=backend_config)
    finally:
        stop_ray()
    return Path(run["output_dir"])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    try:
        _simulate(cfg)
    except (ConfigError, DataError) as error:
        print(f"fedvitgan simulate: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _simulate(cfg: DictConfig) -> None:
    run = plain_config(cfg)
    overrides = list(HydraConfig.get().overrides.task)
    if run.get("resume"):
        run = resolve_resume(run["resume"], overrides, current=run)
    else:
        run["output_dir"] = str(Path(HydraConfig.get().runtime.output_dir).resolve())
        if run["data"].get("name") != "synthetic" and not run["data"].get("class_names"):
            # Named once, from the class folders: recorded in summary.json, the same at every hospital.
            run["data"]["class_names"] = list(configured_class_names(run["data"]))
    fed = federation_config(run["federation"])  # a missing, unknown or bad key stops here, named
    parse_faults(run.get("faults"), fed.num_sites)  # a bad entry stops here, named
    quiet = bool((run.get("console") or {}).get("quiet"))
    quiet_driver_logging(quiet)
    tracker = open_tracker(run)
    if tracker is not None:
        tracker.follow()
    succeeded = False
    report: dict[str, Path] = {}
    try:
        with round_lines_only(quiet):
            folder = run_simulation_from_config(run)
        summary = folder / "summary.json"
        if not summary.is_file():
            raise SystemExit(f"the simulation ended without writing {summary}; see the log above")
        written = json.loads(summary.read_text())
        succeeded = written.get("status") != "failed"
        report = _write_report(folder)
    finally:
        if tracker is not None:
            tracker.finish(succeeded, report)
    rounds = written.get("rounds", [])
    print(f"\nrun folder: {folder}  ({len(rounds)} rounds in summary.json)")
    if report:
        print(f"run report: {report['md']}")
    if (folder / "privacy" / "report.md").is_file():
        print(f"privacy report: {folder / 'privacy' / 'report.md'}")
    if tracker is not None:
        print(f"MLflow run {tracker.run_id} at {tracker.uri}")
    if not succeeded:
        print(f"fedvitgan simulate: {written.get('failure', 'the run failed')}; resume it with resume={folder}",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_FAILED)


def _write_report(folder: Path) -> dict[str, Path]:
    """The run report; a failure is said, not raised (the run itself is done and saved)."""
    try:
        return write_run_report(folder)
    except Exception:
        logger.exception("could not write the run report")
        print(f"run report FAILED (see the log); retry with: fedvitgan report {folder}", file=sys.stderr)
        return {}


def main(argv: list[str]) -> int:
    """Run ``fedvitgan simulate`` with ``argv`` (Hydra overrides and Hydra flags)."""
    if QUIET_FLAG in argv:  # and Hydra's own lines (multirun's "Launching jobs") off
        argv = [a for a in argv if a != QUIET_FLAG] + ["console.quiet=true", "hydra/hydra_logging=disabled"]
    # A resumed run writes into its own folder, not a new timestamped one.
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if resume and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv = [*argv, f"hydra.run.dir={resume[-1]}"]
    return run_hydra_main(_hydra_entry, "fedvitgan simulate", argv)
