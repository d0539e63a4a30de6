"""A clean console for ``fedvitgan simulate``: Ray started with quiet workers, known noise dropped,
and ``--quiet`` (only the per-round lines).

What is dropped, and why it is noise here:
- ``Manually terminating ClientAppActor`` (WARNING, from every Ray worker when Flower shuts its
  actor pool down at the end of a clean run): a filter on the ``flwr`` logger of each worker,
  installed by Ray's ``worker_process_setup_hook``;
- Flower's deprecation notice for ``run_simulation`` (the in-process engine this command uses on
  purpose) and alembic's INFO lines from Flower's in-memory state.
Errors and every other warning still reach the console.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

#: Flower log messages that are noise in a simulation (matched at the start of the message).
FLOWER_NOISE: tuple[str, ...] = ("Manually terminating", "DEPRECATED FEATURE: The `run_simulation` function")
#: Lines ``--quiet`` keeps: the one line per round that ends a round (server/federation.py).
ROUND_LINE = re.compile(r"^\[round \d+/\d+\] \d+ hospitals aggregated")
WORKER_SETUP_HOOK = "simulations.console.setup_ray_worker"
QUIET_ENV = "FEDVITGAN_QUIET"  # set in the Ray workers' environment by ``start_ray(quiet=True)``


class DropFlowerNoise(logging.Filter):
    """Drops the Flower records listed in ``FLOWER_NOISE``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith(FLOWER_NOISE)


def _add_filter_once(logger: logging.Logger) -> None:
    if not any(isinstance(f, DropFlowerNoise) for f in logger.filters):
        logger.addFilter(DropFlowerNoise())


def setup_ray_worker() -> None:
    """Ray ``worker_process_setup_hook``: runs in every Ray worker before any actor starts."""
    _add_filter_once(logging.getLogger("flwr"))
    if os.environ.get(QUIET_ENV) == "1":  # --quiet: the hospitals' workers print errors only
        logging.getLogger().setLevel(logging.ERROR)
        from flwr.common.logger import update_console_handler

        update_console_handler(level=logging.ERROR)


def quiet_driver_logging(quiet: bool) -> None:
    """In this process: drop Flower's noise, alembic's INFO; with ``quiet`` only errors on the console
    (the run folder's simulate.log still receives everything Hydra logs)."""
    _add_filter_once(logging.getLogger("flwr"))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if not quiet:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    from flwr.common.logger import update_console_handler

    update_console_handler(level=logging.ERROR)


def start_ray(backend: dict[str, Any], quiet: bool = False) -> None:
    """Start Ray as Flower's simulation engine would, plus the worker setup hook.

    Flower starts Ray itself only when it is not running yet; starting it here is the one way to
    give the workers a setup hook (Flower passes its own ``runtime_env``).
    """
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath
    init_args = dict(backend.get("init_args") or {})
    init_args.setdefault("include_dashboard", False)
    init_args.setdefault("logging_level", logging.ERROR)
    env = {"PYTHONPATH": pythonpath, QUIET_ENV: "1" if quiet else "0"}
    ray.init(runtime_env={"env_vars": env, "worker_process_setup_hook": WORKER_SETUP_HOOK}, **init_args)


def stop_ray() -> None:
    """Shut Ray down if it still runs (Flower does so itself after a normal run)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


class RoundLinesOnly(io.TextIOBase):
    """A text stream that passes on only the per-round lines (``ROUND_LINE``) to ``target``."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if ROUND_LINE.match(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()


@contextmanager
def round_lines_only(enabled: bool) -> Iterator[None]:
    """While active and ``enabled``, stdout shows only the per-round lines."""
    if not enabled:
        yield
        return
    original = sys.stdout
    sys.stdout = RoundLinesOnly(original)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = original
