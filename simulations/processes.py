"""Background processes with a log file each, stopped by process id with all their descendants.

Flower's SuperLink and SuperNode start helper processes of their own (``flower-superexec``, then
``flwr-serverapp`` / ``flwr-clientapp`` per run or message) in new sessions, so stopping a process
group is not enough: :meth:`ProcessGroup.stop` walks ``/proc`` for each started process's
descendants, terminates them all, waits, then kills what is left. A process id is only signalled
while its start time still matches the one recorded, so a reused id is never hit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago (bound to port 0, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the starting process dies (even by SIGKILL), so a
    killed test run leaves no SuperLink behind. Linux only (prctl PR_SET_PDEATHSIG survives exec).
    The signal follows the starting *thread*: a thread that starts processes must outlive them."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def _alive(pid: int, started: int | None) -> bool:
    """True while ``pid`` is the same process (same start time) and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def descendants(pid: int) -> list[tuple[int, int | None]]:
    """(pid, start time) of every descendant of ``pid``, children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[tuple[int, int | None]] = []
    queue = list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append((child, _start_time(child)))
        queue.extend(children.get(child, []))
    return found


@dataclass
class ManagedProcess:
    """One started process: its name (for messages), command, log file and Popen handle."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    started: int | None
    seen: dict[int, int | None] = field(default_factory=dict)  # descendants ever observed
    running_command: list[str] = field(default_factory=list)  # /proc cmdline (after a script's exec)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code, or None while running; also records current descendants."""
        code = self.popen.poll()
        if code is None:
            self.seen.update(descendants(self.pid))
            try:
                raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
                self.running_command = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
            except OSError:
                pass
        return code

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ProcessGroup:
    """Starts processes with their output in log files; :meth:`stop` ends every one of them."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def start(self, name: str, command: Sequence[str], log_path: Path, env: Mapping[str, str],
              cwd: Path | None = None) -> ManagedProcess:
        """Start ``command`` with stdout and stderr appended to ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            try:
                popen = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd,
                                         preexec_fn=_die_with_parent)  # noqa: PLW1509 - started from one thread
            except OSError as error:
                raise OSError(f"cannot start {name} ({command[0]}): {error}") from error
        process = ManagedProcess(name, list(command), log_path, popen, _start_time(popen.pid))
        self.processes.append(process)
        return process

    def all_pids(self) -> dict[int, int | None]:
        """Every started process and every descendant seen so far (pid -> start time)."""
        pids: dict[int, int | None] = {}
        for process in self.processes:
            pids[process.pid] = process.started
            pids.update(process.seen)
            if process.popen.poll() is None:
                pids.update(descendants(process.pid))
        return pids

    def stop(self, grace_s: float = 10.0) -> dict[int, int | None]:
        """SIGTERM every process and descendant, wait up to ``grace_s``, SIGKILL the rest.

        Returns the pids handled (pid -> start time) so callers can check that none is left.
        """
        return self._terminate(self.processes, self.all_pids, grace_s)

    def stop_one(self, process: ManagedProcess, grace_s: float = 10.0, hard: bool = False) -> dict[int, int | None]:
        """Stop one started process and its descendants (``hard``: SIGKILL at once, as a crash would)."""
        def pids() -> dict[int, int | None]:
            found = {process.pid: process.started, **process.seen}
            if process.popen.poll() is None:
                found.update(descendants(process.pid))
            return found

        return self._terminate([process], pids, 0.0 if hard else grace_s, signal.SIGKILL if hard else signal.SIGTERM)

    @staticmethod
    def _terminate(processes: Sequence[ManagedProcess], pids: Callable[[], dict[int, int | None]], grace_s: float,
                   first: signal.Signals = signal.SIGTERM) -> dict[int, int | None]:
        targets = pids()
        for pid, started in targets.items():
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, first)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for process in processes:
                process.popen.poll()  # reap our direct children
            if not any(_alive(pid, started) for pid, started in targets.items()):
                break
            time.sleep(0.2)
        # Descendants may have started new processes while terminating.
        for pid, started in {**targets, **pids()}.items():
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=5)
        return targets


def still_running(pids: Mapping[int, int | None]) -> list[int]:
    """The pids among ``pids`` that are still the same live process."""
    return [pid for pid, started in pids.items() if _alive(pid, started)]
