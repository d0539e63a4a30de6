"""Durable file writes: a file is either its old content or its complete new content, even after a
crash or a power cut, never a mix or a truncated copy.

``atomic_write`` writes to a temporary file in the same folder, flushes and fsyncs it, renames it
over the target and fsyncs the folder (so the rename itself survives a power cut). Checkpoints,
hospital state, ``summary.json``, the partition report and the privacy ledger's marker all go
through it; the ledger's appends use ``append_line`` (locked by the caller).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def fsync_folder(folder: Path | str) -> None:
    """fsync a folder, so that renames and new entries in it are durable (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_with(path: Path | str, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Let ``write(tmp)`` create a temporary file, then make it ``path`` durably and atomically.

    For writers that insist on a file name (``safetensors.torch.save_file``, ``matplotlib``). The
    temporary file is removed if ``write`` fails; the old ``path`` is untouched then.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(target)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)
    return target


def atomic_write(path: Path | str, data: bytes | str, mode: int = 0o644) -> Path:
    """Write ``data`` (str as UTF-8) to ``path``: temp file, fsync, rename, fsync the folder.

    The temporary file is created with ``O_EXCL | O_NOFOLLOW`` and ``mode`` before any byte is
    written, so a private file (``mode=0o600``) is never readable by others, even briefly.
    """
    payload = data.encode() if isinstance(data, str) else bytes(data)

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked for
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)

    return atomic_write_with(path, write)


def atomic_write_json(path: Path | str, payload: Any, **dumps: Any) -> Path:
    """``atomic_write`` of ``json.dumps(payload, indent=2, **dumps)``."""
    return atomic_write(path, json.dumps(payload, indent=2, **dumps))


@contextlib.contextmanager
def locked(path: Path | str) -> Iterator[int]:
    """An exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` block; yields its fd.

    Advisory: every writer of the guarded file must take it. Released when the block ends or the
    process dies (so a crashed writer never leaves the file locked).
    """
    import fcntl

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def append_line(fd: int, line: str) -> None:
    """Append one line (a trailing newline is added) to the open file ``fd`` and fsync it.

    A line left without its newline by a writer that died mid-write is cut off first, so every
    complete line stays one record. The caller holds the file's lock.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    if size > 0:
        os.lseek(fd, size - 1, os.SEEK_SET)
        if os.read(fd, 1) != b"\n":
            os.ftruncate(fd, _last_newline_end(fd, size))
    payload = (line.rstrip("\n") + "\n").encode()
    os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _last_newline_end(fd: int, size: int, chunk: int = 65536) -> int:
    """Offset just past the last newline before ``size`` (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        os.lseek(fd, start, os.SEEK_SET)
        block = os.read(fd, end - start)
        index = block.rfind(b"\n")
        if index >= 0:
            return start + index + 1
        end = start
    return 0
