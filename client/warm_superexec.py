"""A hospital's SuperExec whose ClientApp processes start warm: ``fedvitgan superexec``.

Flower 1.42's SuperExec starts every message's ClientApp as a new ``flwr-clientapp`` process, which
spends about 3 s of a 2-core machine starting Python and importing Flower, torch and timm before it
looks at the message. This SuperExec is Flower's own (same flags, same polling loop, same Runtime API
and authentication) with one change, the executor: a *fork server* (Python's ``multiprocessing``
``forkserver``) imports those libraries once when the SuperExec starts, and each ClientApp task is a
fork of it that runs Flower's ``run_clientapp`` exactly as ``flwr-clientapp`` would. Every message
still gets a process of its own (nothing of one message's memory reaches the next; the FAB's code
is imported in the task, as before); only the imports are shared, copy-on-write. Other task types
(a ServerApp, a simulation) are started as Flower starts them.

Use it beside a SuperNode started with ``--isolation process``, with ``--parent-pid`` the
SuperNode's pid: it stops with the SuperNode, and its tasks watch the SuperNode rather than it.
``deploy/supernode.sh --warm`` starts both (the SuperNode as ``fedvitgan supernode``)::

    fedvitgan superexec --runtime-api-address 127.0.0.1:9094 --parent-pid SUPERNODE_PID \\
        --root-certificates runtime-ca.pem --superexec-auth-secret-file superexec.secret

``fedvitgan superexec --help`` lists Flower's flags; ``--preload`` changes what the fork server
imports (``--preload ''``: nothing, a cold start per message, which ``deploy/supernode.sh`` uses
without ``--warm``). Every task checks the run's FAB against the node config's ``app-sha256``
before installing it (``client.app_pin``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess

from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

LOG = logging.getLogger(__name__)

#: What the fork server imports once: everything slow that the ClientApp imports (torch and timm,
#: through timm torchvision) and Flower's ClientApp runtime. The project's own modules are not
#: preloaded: each task imports them from its run's FAB, as ``flwr-clientapp`` does.
DEFAULT_PRELOAD = ("numpy", "torch", "torchvision", "timm", "safetensors.torch", "flwr.app", "flwr.clientapp",
                   "flwr.supernode.runtime.run_clientapp")


#: Flower's SuperExec asks its SuperNode for a task every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` s (its
#: default 1 s); a local request, so this SuperExec asks every 0.2 s unless the variable is set.
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_TASK_POLL_S = 0.2


def run_clientapp_task(runtime_api_address: str, token: str, insecure: bool, root_certificates_path: str | None,
                       parent_pid: int | None, runtime_dependency_install: bool, suppress_output: bool) -> None:
    """A forked task: what ``flwr-clientapp --token ...`` does after parsing its arguments."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    from client.app_pin import pin_clientapp_runtime

    pin_clientapp_runtime()  # the FAB is checked against the node config's app-sha256 before it is installed

    if suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=insecure,
                  certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
                  parent_pid=parent_pid, runtime_dependency_install=runtime_dependency_install)


def _started() -> None:
    """The fork server's first task: nothing (it only makes the server import its preload)."""


TaskFunction = Callable[[str, str, bool, "str | None", "int | None", bool, bool], None]


class ForkServerExecutor:
    """Flower's executor interface; ClientApp tasks are forks of a process that imported ``preload``.

    Python keeps one fork server per process: the first executor's ``preload`` (and the environment
    of that moment) is the one every task inherits.

    ``task`` is what a forked task runs, given the launch's Runtime API address, token, TLS settings,
    parent pid, dependency-install and output switches (``run_clientapp_task``; tests pass their own).

    ``task_parent_pid``: the process whose end stops a task (Flower's ClientApp watches it). Flower
    gives its SuperExec's pid, so a task dies with the SuperExec; a task stopped that way tells the
    SuperNode it failed but sends no reply, and Flower 1.42's SuperNode then waits for that reply
    for good. ``fedvitgan superexec`` passes the SuperNode's pid instead: a task outlives a
    SuperExec that stops (and is started again) and replies as usual.
    """

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD, task: TaskFunction = run_clientapp_task,
                 task_parent_pid: int | None = None) -> None:
        self.preload = tuple(preload)
        self.task = task
        self.task_parent_pid = task_parent_pid
        self._context: ForkServerContext = multiprocessing.get_context("forkserver")  # type: ignore[assignment]
        self._context.set_forkserver_preload(list(self.preload))
        self._cold = SubprocessExecutor()
        self._tasks: dict[int, BaseProcess] = {}

    def warm_up(self) -> float:
        """Start the fork server now (it imports ``preload``) rather than at the first message; seconds taken."""
        started = time.perf_counter()
        first = self._context.Process(target=_started, name="fedvitgan-forkserver-warm-up")
        first.start()
        first.join()
        if first.exitcode != 0:
            raise RuntimeError(f"the fork server's first process exited with {first.exitcode}")
        return time.perf_counter() - started

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        """Every task type can start at once (as with Flower's subprocess executor)."""
        return self._cold.get_eligible_capacity(supported_task_types, insecure=insecure,
                                                root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        """No capacity gate."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """A ClientApp task forked from the warm server; any other task type as Flower launches it."""
        if spec.task_type != TaskType.CLIENT_APP:
            return self._cold.launch(spec)
        task = self._context.Process(
            target=self.task, name=f"flwr-clientapp-task-{spec.task_id}",
            args=(spec.runtime_api_address, spec.token, spec.insecure, spec.root_certificates_path,
                  spec.parent_pid if self.task_parent_pid is None else self.task_parent_pid,
                  spec.runtime_dependency_install, spec.suppress_output))
        try:
            task.start()
        except OSError as error:  # the fork server could not fork (memory, process limit)
            return LaunchResult.failed(f"could not fork the ClientApp task from the fork server: {error}")
        self._tasks[spec.task_id] = task
        return LaunchResult.accepted()

    def running(self) -> list[int]:
        """Task ids whose process is still running."""
        return [task_id for task_id, task in self._tasks.items() if task.is_alive()]

    def reconcile(self) -> None:
        """Reap finished tasks (Flower's Runtime API already knows how each ended)."""
        for task_id, task in list(self._tasks.items()):
            if not task.is_alive():
                task.join()
                if task.exitcode not in (0, None):
                    LOG.warning("ClientApp task %d exited with status %s", task_id, task.exitcode)
                del self._tasks[task_id]

    def close(self) -> None:
        """Forget the tasks; those still running finish their message (or end with their watched parent).

        Stopping them here would leave their SuperNode waiting for replies that never come."""
        self._tasks.clear()


def _flag_int(argv: list[str], flag: str) -> int | None:
    """The integer value of ``flag`` in ``argv`` (``--flag N`` or ``--flag=N``), or None."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(flag, type=int, default=None)
    return vars(parser.parse_known_args(argv)[0])[flag.lstrip("-").replace("-", "_")]


def _parse_preload(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--preload A,B`` (ours) split from the rest (Flower's ``flower-superexec`` flags)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preload", default=",".join(DEFAULT_PRELOAD))
    ours, rest = parser.parse_known_args(argv)
    modules = [m.strip() for m in ours.preload.split(",") if m.strip()]
    return modules, rest


def main(argv: list[str] | None = None) -> int:
    """``fedvitgan superexec``: Flower's ``flower-superexec`` with the fork-server executor."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip() if __doc__ else "", end="\n\n")
        print(f"--preload MODULES   comma-separated modules the fork server imports (default: "
              f"{','.join(DEFAULT_PRELOAD)})\n\nFlower's flags:")
    preload, flower_args = _parse_preload(args)
    flower_cli = importlib.import_module("flwr.supercore.cli.flower_superexec")
    flower_loop = importlib.import_module("flwr.supercore.superexec.run_superexec")

    def warm_executor(executor_type: ExecutorType, *_args: object, **_kwargs: object) -> ForkServerExecutor:
        if executor_type != ExecutorType.SUBPROCESS:  # Flower turns the ValueError into a clean exit
            raise ValueError(f"fedvitgan superexec replaces the subprocess executor; for --executor {executor_type} "
                             "use flower-superexec")
        executor = ForkServerExecutor(preload, task_parent_pid=_flag_int(flower_args, "--parent-pid"))
        seconds = executor.warm_up()
        if preload:
            print(f"fedvitgan superexec: fork server ready ({', '.join(preload)} imported in {seconds:.1f} s)",
                  flush=True)
        else:
            print("fedvitgan superexec: cold (--preload ''): each ClientApp imports its libraries itself", flush=True)
        return executor

    flower_loop.get_executor = warm_executor  # the one change to Flower's SuperExec: its executor
    os.environ.setdefault(TASK_POLL_ENV, str(DEFAULT_TASK_POLL_S))
    sys.argv = ["fedvitgan superexec", *flower_args]
    flower_cli.flower_superexec()
    return 0
