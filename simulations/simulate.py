"""``fedvitgan simulate``: N hospitals on one machine with Flower's simulation engine.

    fedvitgan simulate [hydra overrides]
    fedvitgan simulate federation.num_sites=5 federation.rounds=10 train.local_steps=100
    fedvitgan simulate partition=dirichlet partition.alpha=0.3 data.labeled_fraction=0.1
    fedvitgan simulate hydra.run.dir=runs/demo
    fedvitgan simulate resume=runs/demo federation.rounds=20     # continue a stopped run

The run folder (printed at the end) holds summary.json, checkpoints/, samples/, partition.md and
the hospitals' state folders (sites/). ``--help`` lists the config groups; ``--cfg job`` prints
the composed config without running.
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
from server.resume import resolve_resume  # noqa: E402

logger = logging.getLogger("fedvitgan.simulate")

def run_simulation_from_config(run: dict[str, Any]) -> Path:
    """Start Flower's simulation engine with ``num_sites`` virtual SuperNodes."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    fed = run["federation"]
    backend = fed.get("backend", {})
    backend_config = {
        "client_resources": {"num_cpus": float(backend.get("num_cpus", 1)), "num_gpus": float(backend.get("num_gpus", 0.0))},
        "init_args": {"logging_level": "ERROR", "log_to_driver": True},
    }
    run_simulation(server_app=make_server_app(run), client_app=client_app, num_supernodes=int(fed["num_sites"]),
                   backend_config=backend_config)
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
        run = resolve_resume(run["resume"], overrides)
    else:
        run["output_dir"] = str(Path(HydraConfig.get().runtime.output_dir).resolve())
    folder = run_simulation_from_config(run)
    summary = folder / "summary.json"
    if not summary.is_file():
        raise SystemExit(f"the simulation ended without writing {summary}; see the log above")
    rounds = json.loads(summary.read_text()).get("rounds", [])
    print(f"\nrun folder: {folder}  ({len(rounds)} rounds in summary.json)")


def main(argv: list[str]) -> int:
    """Run ``fedvitgan simulate`` with ``argv`` (Hydra overrides and Hydra flags)."""
    # A resumed run writes into its own folder, not a new timestamped one.
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if resume and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv = [*argv, f"hydra.run.dir={resume[-1]}"]
    sys.argv = ["fedvitgan simulate", *argv]
    try:
        _hydra_entry()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            return 1
        return int(stop.code or 0)
    return 0
