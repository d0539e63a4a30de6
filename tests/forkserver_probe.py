"""Imported by a fork server in tests/test_warm_superexec.py: each import and each task leaves a line.

When ``FEDVITGAN_PROBE_LOG`` names a file, it gets ``import <pid>`` whenever this module is
imported and ``task <pid> <token> <parent_pid>`` from each forked task: a task that had to import the module
itself (not inherited from the fork server) adds an ``import`` line with its own pid.
"""

from __future__ import annotations

import os
import time


def _write(line: str) -> None:
    with open(os.environ["FEDVITGAN_PROBE_LOG"], "a", encoding="utf-8") as log:
        log.write(line + "\n")


if "FEDVITGAN_PROBE_LOG" in os.environ:
    _write(f"import {os.getpid()}")


def record_task(runtime_api_address: str, token: str, insecure: bool, root_certificates_path: str | None,
                parent_pid: int | None, runtime_dependency_install: bool, suppress_output: bool) -> None:
    """A forked task that records itself and the parent pid it was given, then sleeps 2 s if its token is ``sleep``."""
    _write(f"task {os.getpid()} {token} {parent_pid}")
    if token == "sleep":
        time.sleep(2)
