"""Flower 1.42 deployment commands: SuperLink, SuperNodes, the ``flwr`` CLI and its connection file.

The SuperLink and SuperNode commands are the shell scripts in ``deploy/`` (what a coordinator and a
hospital run, documented in ``docs/deployment.md``), so the loopback deployment and its tests run
exactly those; the flags are the ones the installed ``--help`` prints (checked by a test).
The ``flwr`` CLI reads SuperLink connections from ``$FLWR_HOME/config.toml`` (a
``[superlink.<name>]`` table with ``address`` and an absolute ``root-certificates`` path).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The project root (holds pyproject.toml with [tool.flwr.app]): the APP argument of ``flwr run``.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: What a FAB of this project needs: the app's packages (``[tool.flwr.app.components]``) and metadata.
APP_PACKAGES: tuple[str, ...] = ("client", "common", "server", "conf")
APP_FILES: tuple[str, ...] = ("pyproject.toml", "README.md")
#: The ``flwr list`` status of a run that ended without error (others: finished:failed, finished:stopped).
FINISHED_COMPLETED = "finished:completed"


class DeploymentError(RuntimeError):
    """A deployment step failed; the message names the process, port or file at fault."""


def flower_bin(name: str) -> str:
    """Path of a Flower executable next to this Python (the virtualenv's bin), else the bare name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path, threads: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process: private FLWR_HOME, telemetry off, no runtime installs."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # flower-superexec, flwr-clientapp, ...
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


def stage_app(dest: Path, root: Path = PROJECT_ROOT) -> Path:
    """Copy only the app's files to ``dest`` and return it (the APP argument of ``flwr run``).

    ``flwr run <dir>`` walks every file under <dir> before filtering (a project-local .venv costs
    seconds) and ships whatever the include patterns match; a staged copy ships exactly the app.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        shutil.copy2(root / name, dest / name)
    for package in APP_PACKAGES:
        shutil.copytree(root / package, dest / package, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


# ----------------------------------------------------------------------------- node config
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (double quotes, escapes)


def node_config_string(config: Mapping[str, Any]) -> str:
    """``--node-config`` value: space-separated ``key=value``, strings double-quoted as Flower needs."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in config.items())


def run_config_overrides(overrides: Sequence[str]) -> str:
    """``--run-config`` value carrying Hydra overrides in the app's ``overrides`` key."""
    return "overrides=" + json.dumps(" ".join(overrides))


# ----------------------------------------------------------------------------- commands
#: Shell scripts with the exact Flower commands a coordinator and a hospital run (docs/deployment.md).
SCRIPTS_DIR = PROJECT_ROOT / "deploy"


def superlink_command(certs_dir: Path, state_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """``deploy/superlink.sh``: it ``exec``s ``flower-superlink`` with TLS from ``certs_dir``
    (ca.pem, superlink.pem, superlink.key), ``--enable-supernode-auth``,
    ``--disable-runtime-dependency-installation`` and ``--database <state_dir>/state.db``."""
    return ["bash", str(SCRIPTS_DIR / "superlink.sh"), str(certs_dir), str(state_dir), host, str(port)]


def supernode_command(superlink: str, ca_cert: Path, private_key: Path, node_config: Mapping[str, Any],
                      extra: Sequence[str] = ()) -> list[str]:
    """``deploy/supernode.sh``: it ``exec``s ``flower-supernode`` for one hospital with
    ``--root-certificates``, ``--auth-supernode-private-key`` and ``--node-config`` (+ ``extra`` flags)."""
    return ["bash", str(SCRIPTS_DIR / "supernode.sh"), superlink, str(ca_cert), str(private_key),
            node_config_string(node_config), *extra]


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path, default: bool = True) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one TLS SuperLink connection ``[superlink.<name>]``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    lines = ["[superlink]"]
    if default:
        lines.append(f"default = {json.dumps(name)}")
    lines += ["", f"[superlink.{name}]", f"address = {json.dumps(address)}",
              f"root-certificates = {json.dumps(str(ca_cert.resolve()))}", ""]
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- flwr CLI
class FlwrCli:
    """Runs ``flwr`` subcommands against one named connection with a private FLWR_HOME."""

    def __init__(self, flwr_home: Path, connection: str, log_path: Path | None = None, timeout_s: float = 120.0):
        self.flwr_home = flwr_home
        self.connection = connection
        self.log_path = log_path
        self.timeout_s = timeout_s

    def __call__(self, *args: str, cwd: Path | None = None) -> str:
        """Run ``flwr ARGS`` and return stdout; raise DeploymentError naming the command on failure."""
        command = [flower_bin("flwr"), *args]
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=cwd,
                                  env=flower_env(self.flwr_home), timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as error:
            raise DeploymentError(f"`{' '.join(command)}` did not finish within {self.timeout_s:.0f} s") from error
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as log:
                log.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}(exit {done.returncode})\n")
        if done.returncode != 0:
            raise DeploymentError(f"`{' '.join(command)}` failed with exit code {done.returncode}:\n"
                                  f"{(done.stdout + done.stderr).strip()[-2000:]}")
        return done.stdout

    def json(self, *args: str, cwd: Path | None = None) -> dict[str, Any]:
        """Run a ``flwr`` subcommand with ``--format json`` and parse its answer."""
        out = self(*args, "--format", "json", cwd=cwd)
        try:
            data = json.loads(out[out.index("{"):])
        except ValueError as error:
            raise DeploymentError(f"`flwr {' '.join(args)}` printed no JSON: {out[-500:]!r}") from error
        if not data.get("success", False):
            raise DeploymentError(f"`flwr {' '.join(args)}` reported failure: {data}")
        return data

    def register(self, public_key: Path) -> int:
        """``flwr supernode register KEY.pub CONNECTION``; returns the node id."""
        return int(self.json("supernode", "register", str(public_key), self.connection)["node-id"])

    def supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list CONNECTION``: node id, status (registered/online/offline), ..."""
        return list(self.json("supernode", "list", self.connection)["nodes"])

    def run(self, overrides: Sequence[str], app: Path = PROJECT_ROOT) -> int:
        """``flwr run APP CONNECTION --run-config "overrides='...'"``; returns the run id."""
        data = self.json("run", str(app), self.connection, "--run-config", run_config_overrides(overrides), cwd=app)
        return int(data["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run's entry of ``flwr list --run-id`` (``status``, ``status-details``, times, traffic)."""
        runs = self.json("list", self.connection, "--run-id", str(run_id))["runs"]
        if not runs:
            raise DeploymentError(f"`flwr list` knows no run {run_id}")
        return dict(runs[0])

    def run_status(self, run_id: int) -> str:
        """The run's status from ``flwr list --run-id``, e.g. ``running`` or ``finished:completed``."""
        return str(self.run_info(run_id)["status"])

    def log(self, run_id: int) -> str:
        """The run's ServerApp log (``flwr log RUN CONNECTION --show``)."""
        return self("log", str(run_id), self.connection, "--show")
