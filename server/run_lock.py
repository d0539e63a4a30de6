"""One ServerApp per run folder: an exclusive lock held while a run (or its resume) is going on.

Two coordinators writing one run folder would interleave checkpoints and ``summary.json``. The lock
is an ``fcntl.flock`` on ``<run>/.server.lock``, taken without waiting: a second ServerApp stops
at once with an error that names the folder. The kernel releases it when the process ends, so a
crashed coordinator never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from common.config import ConfigError

LOCK_FILE = ".server.lock"


@contextlib.contextmanager
def run_folder_lock(run_dir: Path | str) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block; ``ConfigError`` if another process holds it."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{run_dir} is being run by another ServerApp (it holds {path}); wait for it to "
                              f"end, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
