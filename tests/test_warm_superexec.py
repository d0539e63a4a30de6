"""``fedvitgan superexec``'s executor: ClientApp tasks forked from a process that imported the heavy modules once.

Python keeps one fork server per process, started with the first executor's preload and the
environment of that moment, so the tests share one executor (module scope).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

from client.warm_superexec import DEFAULT_PRELOAD, ForkServerExecutor, _parse_preload
from tests.forkserver_probe import record_task

WATCHED = 4242  # the pid tasks are told to watch (the SuperNode's, in fedvitgan superexec)


def _spec(task_id: int, token: str, task_type: TaskType = TaskType.CLIENT_APP) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9094", token=token, insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                         suppress_output=False, task_id=task_id)


def _wait_for(condition, timeout_s: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), "forked tasks did not get there in time"


@pytest.fixture(scope="module")
def probe_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("forkserver") / "probe.log"
    os.environ["FEDVITGAN_PROBE_LOG"] = str(log)  # before the fork server starts: it keeps this environment
    yield log
    del os.environ["FEDVITGAN_PROBE_LOG"]


@pytest.fixture(scope="module")
def executor(probe_log: Path) -> Iterator[ForkServerExecutor]:
    warm = ForkServerExecutor(preload=["tests.forkserver_probe"], task=record_task, task_parent_pid=WATCHED)
    warm.warm_up()
    yield warm
    warm.close()


def _lines(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()]


def test_each_task_is_a_fork_of_a_server_that_imported_the_preload_once(executor: ForkServerExecutor,
                                                                         probe_log: Path) -> None:
    assert [kind for kind, *_ in _lines(probe_log)] == ["import"]  # warm_up: the server imported it
    for task_id, token in ((1, "first"), (2, "second")):
        assert executor.launch(_spec(task_id, token)) == LaunchResult.accepted()
    _wait_for(lambda: not executor.running())
    lines = _lines(probe_log)
    imports = [pid for kind, pid, *_ in lines if kind == "import"]
    tasks = {token: pid for kind, pid, token, _ in (line for line in lines if line[0] == "task")}
    assert {watched for kind, _, _, watched in (line for line in lines if line[0] == "task")} == {str(WATCHED)}
    assert len(imports) == 1, f"a forked task imported the preloaded module again: {lines}"
    assert set(tasks) == {"first", "second"}
    assert len(set(tasks.values())) == 2, "each task must be a process of its own"
    assert imports[0] not in tasks.values() and str(os.getpid()) not in {*tasks.values(), *imports}


def test_reconcile_forgets_finished_tasks_and_close_lets_running_ones_finish(executor: ForkServerExecutor) -> None:
    # Stopping a task would leave Flower's SuperNode waiting for its reply for good.
    executor.launch(_spec(4, "sleep"))
    executor.launch(_spec(5, "quick"))
    _wait_for(lambda: executor.running() == [4])
    executor.reconcile()
    assert list(executor._tasks) == [4]
    sleeping = executor._tasks[4]
    started = time.monotonic()
    executor.close()
    assert time.monotonic() - started < 1 and not executor._tasks and sleeping.is_alive()
    sleeping.join(timeout=30)
    assert sleeping.exitcode == 0


def test_other_task_types_are_started_as_flower_starts_them(executor: ForkServerExecutor,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[ExecutionSpec] = []
    monkeypatch.setattr(SubprocessExecutor, "launch", lambda self, spec: started.append(spec) or LaunchResult.accepted())
    spec = _spec(6, "serverapp", TaskType.SERVER_APP)
    assert executor.launch(spec) == LaunchResult.accepted()
    assert started == [spec] and executor.running() == []


def test_preload_flag_is_taken_out_of_flowers_flags() -> None:
    assert _parse_preload(["--insecure", "--preload", "torch, timm", "--runtime-api-address", "a:1"]) == (
        ["torch", "timm"], ["--insecure", "--runtime-api-address", "a:1"])
    assert _parse_preload(["--insecure"]) == (list(DEFAULT_PRELOAD), ["--insecure"])


def test_the_default_preload_does_not_touch_cuda() -> None:
    """A fork of a process that initialised CUDA cannot use the GPU: importing the preload must not."""
    probe = textwrap.dedent("""
        import importlib, sys, torch
        touched = []
        count, lazy_init = torch._C._cuda_getDeviceCount, torch.cuda._lazy_init
        torch._C._cuda_getDeviceCount = lambda *a: touched.append("device count") or count(*a)
        torch.cuda._lazy_init = lambda *a: touched.append("lazy init") or lazy_init(*a)
        for module in sys.argv[1:]:
            importlib.import_module(module)
        print("touched:", touched)
    """)
    done = subprocess.run([sys.executable, "-c", probe, *DEFAULT_PRELOAD], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "touched: []"


def test_the_parent_pid_flag_is_read_for_the_tasks() -> None:
    from client.warm_superexec import _flag_int

    assert _flag_int(["--insecure", "--parent-pid", "77"], "--parent-pid") == 77
    assert _flag_int(["--parent-pid=78"], "--parent-pid") == 78
    assert _flag_int(["--insecure"], "--parent-pid") is None
