"""The coordinator's Flower ServerApp.

Under ``flwr run`` the run config's ``overrides`` string carries Hydra overrides (the same ones
``fedvitgan simulate`` takes); the simulation CLI builds its ServerApp with ``make_server_app``.
``resume=RUN`` continues a stopped run with its own frozen config (``server.resume``), exactly as
``fedvitgan simulate resume=RUN`` does.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from common.config import compose_config, plain_config  # noqa: E402
from server.federation import run_federation  # noqa: E402
from server.resume import resolve_resume  # noqa: E402


def run_from_overrides(grid: Grid, overrides: str) -> Path:
    """Compose the config from Hydra overrides (or, with ``resume=RUN``, reload the stopped run's)
    and run the federation."""
    given = shlex.split(overrides)
    run = plain_config(compose_config(given))
    if run.get("resume"):
        run = resolve_resume(run["resume"], given)
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
        run_federation(grid, run, run["output_dir"])

    return server_app
