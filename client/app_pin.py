"""A hospital runs only the ClientApp code it approved: the FAB's SHA-256 against its node config.

``flwr run`` ships the coordinator's copy of this project (a FAB) to every SuperNode, and Flower
installs it and imports ``client.app:app`` from it: the hospital's policy checks (``client.policy``)
are code, and code the coordinator sends can be edited. A hospital that reviewed a release pins its
FAB's hash in its node config (``app-sha256``, printed by ``fedvitgan fab hash``). The project's
SuperExec (``fedvitgan superexec``, which ``deploy/supernode.sh`` starts cold or ``--warm``) checks
each task's FAB against it after Flower pulls the FAB and **before** it is installed or any of its
code imported; a mismatch ends the task with an error naming both hashes, which the coordinator
sees as that hospital's failed reply, and nothing of the FAB runs.

What it does not protect: a hospital that pins a FAB it never reviewed, or that starts its
SuperNode with ``--allow-any-app`` (no pin), trusts the coordinator's code as before.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOG = logging.getLogger("fedvitgan.client")

NODE_KEY = "app-sha256"
RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp"


class AppNotApproved(RuntimeError):
    """The run's FAB is not the one this hospital pinned."""


def fab_sha256(content: bytes) -> str:
    """The hash Flower itself gives a FAB (``Fab.hash_str``): SHA-256 of its bytes."""
    return hashlib.sha256(content).hexdigest()


def fab_hash_of(path: Path | str) -> str:
    """The hash of a built ``.fab`` file, or of the FAB ``flwr run`` would build from an app folder."""
    target = Path(path).expanduser()
    if target.is_dir():
        from flwr.cli.build import build_fab_from_disk

        return fab_sha256(build_fab_from_disk(target))
    return fab_sha256(target.read_bytes())


def check_fab(content: bytes, pinned: str | None) -> None:
    """``AppNotApproved`` (naming both hashes) unless ``content`` hashes to ``pinned``; None: no pin."""
    if pinned is None:
        return
    actual = fab_sha256(content)
    if actual != str(pinned).strip().lower():
        raise AppNotApproved(f"this hospital runs only the app it approved: the run's FAB has sha256 {actual}, "
                             f"the node config's {NODE_KEY} is {pinned}; nothing of it was installed or run")


def pin_clientapp_runtime() -> None:
    """Make Flower's ClientApp runtime (in this process) check every FAB against the task's node
    config before installing it: wraps ``pull_task_input`` (to learn the pin from the task's
    context) and ``install_from_fab`` (to check before anything is unpacked or imported)."""
    import importlib

    runtime = importlib.import_module(RUN_CLIENTAPP)
    if getattr(runtime, "_fedvitgan_pinned", False):
        return
    pulled: dict[str, Any] = {}
    original_pull: Callable[..., Any] = runtime.pull_task_input
    original_install: Callable[..., Any] = runtime.install_from_fab

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = original_pull(client)
        pulled["pin"] = (context.node_config or {}).get(NODE_KEY)
        return message, context, run, fab

    def install_from_fab(content: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            check_fab(content, pulled.get("pin"))
        except AppNotApproved as error:
            LOG.error("%s", error)
            raise
        return original_install(content, *args, **kwargs)

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab
    runtime._fedvitgan_pinned = True


def fab_command(argv: list[str]) -> int:
    """``fedvitgan fab hash [DIR|FAB]``: the SHA-256 a hospital pins as ``app-sha256``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="fedvitgan fab", description="The FAB hash a hospital pins in its node config (app-sha256): the "
                                          "SHA-256 of the FAB `flwr run` ships from an app folder, or of a built "
                                          ".fab file. Review the code, then pin its hash.")
    sub = parser.add_subparsers(dest="command", required=True)
    hashed = sub.add_parser("hash", help="print the FAB hash of an app folder (default: this project) or a .fab file")
    hashed.add_argument("path", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args(argv)
    target = Path(args.path)
    if not target.exists():
        print(f"fedvitgan fab hash: {target} does not exist", flush=True)
        return 2
    print(fab_hash_of(target))
    return 0
