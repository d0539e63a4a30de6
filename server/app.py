"""The coordinator's Flower ServerApp.

Under ``flwr run`` the run config's ``overrides`` string carries Hydra overrides (the same ones
``fedvitgan simulate`` takes); the simulation CLI builds its ServerApp with ``make_server_app``.
``resume=RUN`` continues a stopped run with its own frozen config (``server.resume``), exactly as
``fedvitgan simulate resume=RUN`` does.
Fault injection (``faults``) is for ``fedvitgan simulate`` only: ``flwr run`` refuses it.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from common.config import ConfigError, compose_config, plain_config  # noqa: E402
from server.federation import FederationFailed, run_federation  # noqa: E402
from server.resume import resolve_resume  # noqa: E402

logger = logging.getLogger("fedvitgan.server")


def refuse_faults(run: dict[str, Any]) -> None:
    """Fault injection outside ``fedvitgan simulate`` (a deployment, ``flwr run``) is a config error."""
    if run.get("faults"):
        raise ConfigError("faults: fault injection is for `fedvitgan simulate` only and is refused under "
                          "`flwr run` (a deployment); remove the faults=[...] override")


def run_from_overrides(grid: Grid, overrides: str) -> Path:
    """Compose the config from Hydra overrides (or, with ``resume=RUN``, reload the stopped run's)
    and run the federation; a config with faults is refused."""
    given = shlex.split(overrides)
    run = plain_config(compose_config(given))
    refuse_faults(run)
    if run.get("resume"):
        run = resolve_resume(run["resume"], given, newer_keys_from=run)
        refuse_faults(run)  # a simulated run's own faults do not come back under flwr run
    if not run.get("output_dir"):
        run["output_dir"] = str(Path("runs") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    run["output_dir"] = str(Path(run["output_dir"]).resolve())
    return run_federation(grid, run, run["output_dir"])


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: overrides from the run config key ``overrides``."""
    run_from_overrides(grid, str(context.run_config.get("overrides", "")))


def make_server_app(run: dict[str, Any]) -> ServerApp:
    """A ServerApp bound to an already resolved config (used by ``fedvitgan simulate``)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, run, run["output_dir"])
        except FederationFailed as stop:  # recorded in summary.json, which the CLI reads for its exit code
            logger.error("%s", stop)

    return server_app
