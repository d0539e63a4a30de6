"""A real Flower deployment on this machine: SuperLink + one SuperNode per hospital on 127.0.0.1.

    python -m simulations.deploy_loopback --rounds 2 --out /tmp/fedvitgan-loopback
    python -m simulations.deploy_loopback --rounds 2 --out /tmp/lb --with-intruders
    python -m simulations.deploy_loopback --rounds 3 --restart-after-round 1 --kill-supernode-in-round 2 \
        --override privacy.enabled=true --out /tmp/lb-restart

Unlike ``fedvitgan simulate`` this runs the processes a real federation runs, with TLS and SuperNode
authentication: ``fedvitgan certs`` material, ``flower-superlink`` (persistent database, no runtime
dependency installation), ``flwr supernode register`` for each hospital key, one
``flower-supernode`` per hospital, ``flwr run`` of this project with the tiny preset on synthetic
data, then it waits for the run to finish and checks the run folder. ``--with-intruders`` also
starts a SuperNode whose key was never registered and one that trusts another CA; both must be
refused while the run completes with the registered hospitals.

``--restart-after-round N`` stops the SuperLink (and with it the run's ServerApp) once round N is in
``summary.json``, starts it again on the same database, stops the dead run, submits the run again
with ``resume=<run folder>`` and waits for the remaining rounds: one run folder, one
``summary.json``. ``--kill-supernode-in-round R`` kills the last hospital's SuperNode and its
ClientApp (SIGKILL, as a crash would) while it trains round R (with DP: after its first DP step is
in its ledger), starts it again once round R is over (the SuperLink reports the node unavailable
after about a minute without heartbeats, and the round goes on without it), and expects it back in
the next round.

Everything lands under ``--out``::

    certs/                 CA, SuperLink certificate, hospital keys (private keys 0600)
    coordinator/           the SuperLink's database and FLWR_HOME (config.toml for the flwr CLI),
                           app/ (the staged app that `flwr run` packs into a FAB)
    hospitals/<site>/      each hospital's FLWR_HOME and local state (state-dir)
    logs/                  one log per process, plus flwr-cli.log (every flwr command and its answer)
    run/                   the run folder: summary.json, checkpoints/, samples/, flwr-log.txt,
                           report.md and curves.png (the run report)
    deployment.json        run id, status, ports, process ids and exit codes

Every process started here is stopped when the script ends, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from client.app_pin import fab_hash_of
from simulations.certs import CA_CERT, SITES_DIR, write_bundle
from simulations.deployment import (
    FINISHED_COMPLETED,
    DeploymentError,
    FlwrCli,
    flower_env,
    stage_app,
    superlink_command,
    supernode_command,
    write_connection,
)
from simulations.processes import ManagedProcess, ProcessGroup, descendants, free_ports, still_running
from simulations.report import write_run_report

CONNECTION = "loopback"
#: Signs, in a failed run's status details, that Flower's own state failed (not the app).
FLOWER_STATE_FAILURES = ("500 Internal Server Error", "database is locked")
INTRUDER = "intruder"  # a SuperNode whose key is never registered
FOREIGN = "foreign-ca"  # a SuperNode with a registered key that trusts another CA


@dataclass
class LoopbackOptions:
    """What the loopback deployment runs (CLI flags of the same names)."""

    out: Path
    rounds: int = 2
    sites: int = 2
    local_steps: int = 5
    train_per_site: int = 64
    test_per_site: int = 32
    overrides: list[str] = field(default_factory=list)
    with_intruders: bool = False
    threads: int = 1
    timeout_s: float = 900.0
    poll_s: float = 1.0
    status_every_s: float = 30.0
    restart_after_round: int | None = None
    kill_supernode_in_round: int | None = None
    warm: bool = False
    allow_any_app: bool = False  # hospitals pin no app-sha256 (supernode.sh --allow-any-app)
    tampered_app: bool = False  # the coordinator ships an app whose client/policy.py it edited (must be refused)
    secure_aggregation: bool = False  # federation=secaggplus: the coordinator sees only the sum of the updates


@dataclass
class ProcessReport:
    """A started process: pid, command line (as last seen running), log, exit code, how it ended."""

    name: str
    pid: int
    command: list[str]
    log: str
    exit_code: int | None
    exited_by_itself: bool


@dataclass
class LoopbackResult:
    """Outcome of a loopback deployment."""

    out: str
    run_dir: str
    superlink_port: int
    run_id: int | None = None
    status: str | None = None
    run_ids: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    node_ids: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ProcessReport] = field(default_factory=dict)
    pids_left_running: list[int] = field(default_factory=list)
    error: str | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


# ----------------------------------------------------------------------------- steps
def run_overrides(options: LoopbackOptions, run_dir: Path) -> list[str]:
    """The Hydra overrides the ServerApp receives: tiny model, synthetic data, small and CPU-only."""
    return [
        "model=tiny", "data=synthetic", "seed=0", "device=cpu",
        f"train.local_steps={options.local_steps}",
        f"data.train_per_site={options.train_per_site}", f"data.test_per_site={options.test_per_site}",
        f"federation.num_sites={options.sites}", f"federation.rounds={options.rounds}",
        f"output_dir={shlex.quote(str(run_dir))}",
        *(["federation=secaggplus"] if options.secure_aggregation else []),
        *options.overrides,
    ]


def wait_for_tls(process: ManagedProcess, port: int, ca_cert: Path, timeout_s: float = 90.0) -> None:
    """Wait until the SuperLink answers a TLS handshake on 127.0.0.1:port verified against ``ca_cert``."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"{process.name} (pid {process.pid}) exited with code {process.popen.returncode} "
                                  f"before listening on 127.0.0.1:{port}; see {process.log_path}:\n"
                                  f"{process.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock, \
                    context.wrap_socket(sock, server_hostname="127.0.0.1"):
                return
        except (OSError, ssl.SSLError) as error:
            last = error
            time.sleep(0.5)
    raise DeploymentError(f"{process.name} (pid {process.pid}) did not accept TLS connections on 127.0.0.1:{port} "
                          f"within {timeout_s:.0f} s (last error: {last}); see {process.log_path}")


def _check_alive(processes: list[ManagedProcess]) -> None:
    for process in processes:
        code = process.poll()
        if code is not None:
            raise DeploymentError(f"{process.name} (pid {process.pid}) exited with code {code} during the run; "
                                  f"see {process.log_path}:\n{process.log_tail()}")


def _completed_rounds(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "summary.json").read_text()).get("completed_rounds", 0))
    except (OSError, ValueError):
        return 0


def _max_round(run_dir: Path) -> int:
    try:
        return max((int(r["round"]) for r in json.loads((run_dir / "summary.json").read_text()).get("rounds", [])),
                   default=0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@dataclass
class Event:
    """Something to do once during the run: ``fire()`` when ``due()``; ``missed()``: too late now."""

    name: str
    due: Callable[[], bool]
    fire: Callable[[], object]
    missed: Callable[[], bool] = lambda: False
    done: bool = False
    fired: bool = False


class EventRunner(threading.Thread):
    """Fires events as they fall due, in a thread of its own, so that a slow ``flwr`` call in the main
    loop (seconds on a loaded machine) never lets a short moment, such as a two-step round, pass."""

    def __init__(self, events: Sequence[Event], poll_s: float, on_missed: Callable[[Event], None]) -> None:
        super().__init__(name="loopback-events", daemon=True)
        self.events = list(events)
        self.poll_s = poll_s
        self.on_missed = on_missed
        self.error: BaseException | None = None
        self.busy = False
        self.stopping = threading.Event()

    @property
    def pending(self) -> bool:
        return any(not e.done for e in self.events)

    def run(self) -> None:
        try:
            while self.pending and not self.stopping.is_set():
                for event in self.events:
                    if event.done:
                        continue
                    if event.due():
                        self.busy = True
                        try:
                            event.fire()
                            event.fired = True
                        finally:
                            event.done, self.busy = True, False
                    elif event.missed():
                        event.done = True
                        self.on_missed(event)
                self.stopping.wait(self.poll_s)
            # Stay alive until the run ends: the processes an event started (a restarted SuperLink or
            # SuperNode) get SIGTERM when the thread that started them exits (PR_SET_PDEATHSIG).
            self.stopping.wait()
        except BaseException as error:  # reported by the main loop
            self.error = error


def wait_for_run(cli: FlwrCli, current_run: Callable[[], int], run_dir: Path, rounds: int,
                 alive: Callable[[], None], others: list[ManagedProcess], options: LoopbackOptions,
                 runner: EventRunner | None = None, watchdog: Callable[[str], bool] | None = None) -> str:
    """Poll the run folder (cheap) and ``flwr list`` (now and then) until the run finishes (an event
    of ``runner`` may replace the run: ``current_run()`` names it). ``alive()`` raises if a process
    that must live died; ``watchdog`` sees every status read and returns True when it recovered
    something (the wait goes on); a ``flwr list`` that fails or times out is retried later."""
    deadline = time.monotonic() + options.timeout_s
    next_status = time.monotonic() + options.status_every_s
    status = "pending"
    while time.monotonic() < deadline:
        if runner is not None and runner.error is not None:
            raise DeploymentError(f"a scheduled step failed: {runner.error}") from runner.error
        alive()
        for process in others:
            process.poll()
        pending = runner is not None and runner.pending
        done = _completed_rounds(run_dir) >= rounds and not pending
        if done or time.monotonic() >= next_status:
            next_status = time.monotonic() + (2.0 if done else options.status_every_s)
            run_id = current_run()
            try:
                status = cli.run_status(run_id)
            except DeploymentError as error:
                print(f"warning: {error}; asking again later", file=sys.stderr)
                continue
            busy = runner is not None and (runner.busy or run_id != current_run())
            if busy or (watchdog is not None and watchdog(status)):
                continue
            if status == FINISHED_COMPLETED and pending:
                continue  # a disruption is still due (it is recorded as missed when its moment passes)
            if status.startswith("finished"):
                return status
        time.sleep(options.poll_s)
    raise DeploymentError(f"run {current_run()} did not finish within {options.timeout_s:.0f} s (last status "
                          f"{status!r}, {_completed_rounds(run_dir)}/{rounds} rounds in {run_dir / 'summary.json'})")


def has_live_descendant(process: ManagedProcess, name: str) -> bool:
    """Whether a running descendant of ``process`` has ``name`` in its command line."""
    for pid, _ in descendants(process.pid):
        try:
            if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def training_started(ledger_folder: Path, server_round: int) -> bool:
    """Whether the hospital's ledger holds an unfinished training attempt of ``server_round`` that has
    taken at least one DP step."""
    from common.privacy.ledger import LedgerError, PrivacyLedger

    try:
        content = PrivacyLedger.in_folder(ledger_folder).load()
    except (LedgerError, OSError):
        return False
    return any(a.kind == "sgd" and a.round == server_round and not a.finished and a.steps >= 1
               for attempts in content.attempts.values() for a in attempts)


@dataclass(frozen=True)
class TrainMessage:
    """One train message a SuperNode's log says it received: its round, ID and what became of it.

    ``confirmed``: the SuperNode logged "Received successfully", so a ClientApp trains on it.
    ``ignored``: the SuperNode logged "Ignoring message" (its run stopped). Flower 1.42 logs this
    also when the run stops *after* the message and its contents were stored (while confirming its
    receipt), and then a ClientApp may still train on it, so an ignored message may or may not
    have a DP attempt in the ledger; a confirmed one always has one.
    """

    round: int | None
    message_id: str
    confirmed: bool
    ignored: bool


def train_messages(log: Path) -> list[TrainMessage]:
    """Every train message a SuperNode's log (all its restarts appended) says it received."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found: list[tuple[int | None, str]] = []
    confirmed: set[str] = set()
    ignored: set[str] = set()
    current: str | None = None  # the message whose receipt the next "Received successfully" confirms
    for previous, line in zip(["", *lines], lines):
        if "Receiving: " in line and "(ID: " in line:
            current = line.split("(ID: ", 1)[1].split(")", 1)[0]
            if "Receiving: train message" in line:
                found.append((_round_of(previous), current))
        elif "Received successfully" in line and current is not None:
            confirmed.add(current)
            current = None
        elif "Ignoring message " in line:
            ignored.add(line.split("Ignoring message ", 1)[1].split()[0].rstrip(".,"))
    return [TrainMessage(rnd, mid, mid in confirmed, mid in ignored) for rnd, mid in found]


def _round_of(line: str) -> int | None:
    """The round of a SuperNode log line ``[RUN <id>, ROUND <n>]``, else None."""
    if "ROUND " not in line:
        return None
    digits = line.split("ROUND ", 1)[1].split("]", 1)[0].strip()
    return int(digits) if digits.isdigit() else None


def received_train_messages(log: Path, server_round: int | None = None) -> int:
    """Train messages a SuperNode's log says it received and did not ignore (of one round, when
    given): those a ClientApp surely trains on, once their receipt is confirmed."""
    return sum(1 for m in train_messages(log)
               if not m.ignored and (server_round is None or m.round == server_round))


def check_run_folder(run_dir: Path, rounds: int) -> None:
    """The run folder holds what a simulation's does: summary, one checkpoint and sample grid per round."""
    missing = [p for p in [run_dir / "summary.json",
                           *(run_dir / "checkpoints" / f"round-{r:04d}.safetensors" for r in range(1, rounds + 1)),
                           *(run_dir / "samples" / f"round-{r:03d}.png" for r in range(1, rounds + 1))]
               if not p.is_file()]
    if missing:
        raise DeploymentError(f"the run folder {run_dir} lacks " + ", ".join(str(p) for p in missing))
    if _completed_rounds(run_dir) != rounds:
        raise DeploymentError(f"{run_dir / 'summary.json'} reports {_completed_rounds(run_dir)} completed rounds, "
                              f"expected {rounds}")


# ----------------------------------------------------------------------------- the deployment
def _check_options(options: LoopbackOptions) -> None:
    if options.rounds < 1 or options.sites < 1:
        raise DeploymentError(f"need at least 1 round and 1 site (got --rounds {options.rounds}, "
                              f"--sites {options.sites})")
    restart, kill = options.restart_after_round, options.kill_supernode_in_round
    if restart is not None and not 1 <= restart < options.rounds:
        raise DeploymentError(f"--restart-after-round {restart} must be between 1 and --rounds - 1 = {options.rounds - 1}")
    if kill is not None and not 1 <= kill < options.rounds:
        raise DeploymentError(f"--kill-supernode-in-round {kill} must be between 1 and --rounds - 1 = {options.rounds - 1} "
                              f"(the hospital must have a round left to rejoin)")


class LoopbackDeployment:
    """The processes of one loopback deployment, the processes that must stay alive (by role), and
    the scheduled disruptions (restart, kill). Roles: ``superlink`` and each site's name."""

    def __init__(self, options: LoopbackOptions, out: Path) -> None:
        self.app_hash: str | None = None  # the staged app's FAB hash, pinned by every hospital
        self.options, self.out = options, out
        self.certs, self.logs, self.run_dir = out / "certs", out / "logs", out / "run"
        self.coordinator_home = out / "coordinator" / "flwr-home"
        self.sites = [f"site-{i}" for i in range(options.sites)]
        self.extra_keys = [INTRUDER, FOREIGN] if options.with_intruders else []
        self.superlink_port, *self.node_ports = free_ports(1 + len(self.sites) + len(self.extra_keys))
        self.address = f"127.0.0.1:{self.superlink_port}"
        self.result = LoopbackResult(str(out), str(self.run_dir), self.superlink_port)
        self.group = ProcessGroup()
        self.cli = FlwrCli(self.coordinator_home, CONNECTION, log_path=self.logs / "flwr-cli.log", timeout_s=300.0)
        self.live: dict[str, ManagedProcess] = {}
        self.others: list[ManagedProcess] = []
        self.lock = threading.Lock()
        self.disrupting = threading.RLock()  # one restart or kill at a time (event thread or watchdog)
        self.revived = 0
        self.waiting_without_superexec = 0

    # ------------------------------------------------------------------ processes
    def start_superlink(self, label: str) -> ManagedProcess:
        process = self.group.start(
            label, superlink_command(self.certs, self.out / "coordinator", host="127.0.0.1", port=self.superlink_port),
            self.logs / "superlink.log", flower_env(self.coordinator_home, self.options.threads),
            cwd=self.out / "coordinator")
        wait_for_tls(process, self.superlink_port, self.certs / CA_CERT)
        return process

    def start_supernode(self, name: str, label: str) -> ManagedProcess:
        site_id = self.sites.index(name)
        home = self.out / "hospitals" / name
        node_config = {"site-id": site_id, "num-sites": len(self.sites), "site-name": name,
                       "dataset": "synthetic", "state-dir": str(home / "state"), "device": "cpu", **self.pin()}
        return self.group.start(
            label, supernode_command(self.address, self.certs / CA_CERT, self.certs / SITES_DIR / name, node_config,
                                     ["--port", str(self.node_ports[site_id]), *(["--warm"] if self.options.warm else []),
                                      *self.any_app_flag()]),
            self.logs / f"{name}.log", flower_env(home / "flwr-home", self.options.threads), cwd=home)

    def pin(self) -> dict[str, str]:
        """The node config entry that pins the staged app (none with ``allow_any_app``)."""
        return {} if self.app_hash is None else {"app-sha256": self.app_hash}

    def any_app_flag(self) -> list[str]:
        return ["--allow-any-app"] if self.options.allow_any_app else []

    def start_intruders(self) -> None:
        ports = {INTRUDER: self.node_ports[-2], FOREIGN: self.node_ports[-1]}
        trusted = {INTRUDER: self.certs / CA_CERT, FOREIGN: self.out / "foreign-ca" / CA_CERT}
        for name in (INTRUDER, FOREIGN):
            home = self.out / "hospitals" / name
            node_config = {"site-id": 0, "num-sites": len(self.sites), "site-name": name, "state-dir": str(home / "state"),
                           **self.pin()}
            self.others.append(self.group.start(
                f"SuperNode {name}",
                supernode_command(self.address, trusted[name], self.certs / SITES_DIR / name, node_config,
                                  ["--port", str(ports[name]), *self.any_app_flag()]),
                self.logs / f"{name}.log", flower_env(home / "flwr-home", self.options.threads), cwd=home))

    def release(self, role: str) -> ManagedProcess:
        """Take ``role``'s process off the must-live list (before stopping it on purpose)."""
        with self.lock:
            return self.live.pop(role)

    def adopt(self, role: str, process: ManagedProcess) -> None:
        with self.lock:
            self.live[role] = process

    def check_alive(self) -> None:
        with self.lock:
            processes = list(self.live.values())
        _check_alive(processes)

    def new_run(self, run_id: int) -> None:
        with self.lock:
            self.result.run_id = run_id
            self.result.run_ids.append(run_id)
        self.result.write(self.out / "deployment.json")

    def current_run(self) -> int:
        with self.lock:
            assert self.result.run_id is not None
            return self.result.run_id

    # ------------------------------------------------------------------ disruptions
    def restart_superlink(self, why: str = "", label: str = "SuperLink (restarted)") -> None:
        """Stop the SuperLink and its ServerApp, start it again, stop the dead run, resume the run."""
        with self.disrupting:
            old = self.release("superlink")
            self.group.stop_one(old)
            self.result.events.append(f"stopped the SuperLink (pid {old.pid}) and its ServerApp "
                                      f"{why or f'after round {_max_round(self.run_dir)} was in summary.json'}")
            self.adopt("superlink", self.start_superlink(label))
            dead = self.current_run()
            try:  # the dead run's messages must not reach the hospitals any more
                self.cli("stop", str(dead), CONNECTION)
                self.result.events.append(f"stopped the dead run {dead}")
            except DeploymentError as error:
                self.result.events.append(f"could not stop the dead run {dead}: {error}")
            run_id = self.cli.run([f"resume={shlex.quote(str(self.run_dir))}", f"federation.rounds={self.options.rounds}"],
                                  app=self.out / "coordinator" / "app")
            self.new_run(run_id)
            self.result.events.append(f"resubmitted as run {run_id} with resume={self.run_dir}")

    @property
    def victim(self) -> str:
        return self.sites[-1]

    def kill_supernode(self) -> None:
        with self.disrupting:
            process = self.release(self.victim)
            self.group.stop_one(process, hard=True)
            self.result.events.append(f"killed SuperNode {self.victim} (pid {process.pid}) and its ClientApp while it "
                                      f"trained round {self.options.kill_supernode_in_round}")

    def restart_supernode(self) -> None:
        with self.disrupting:
            self.adopt(self.victim, self.start_supernode(self.victim, f"SuperNode {self.victim} (restarted)"))
            self.result.events.append(f"restarted SuperNode {self.victim} after round {_max_round(self.run_dir)} "
                                      f"was in summary.json")

    def events(self) -> list[Event]:
        """The scheduled disruptions of ``options``."""
        options, events = self.options, []
        if options.kill_supernode_in_round is not None:
            rnd = options.kill_supernode_in_round
            ledger_folder = self.out / "hospitals" / self.victim / "state" / self.victim
            dp = any(o.replace(" ", "") == "privacy.enabled=true" for o in options.overrides)
            due = ((lambda: training_started(ledger_folder, rnd)) if dp else
                   (lambda: received_train_messages(self.logs / f"{self.victim}.log", rnd) > 0))
            killed = Event("kill", due, self.kill_supernode, missed=lambda: _max_round(self.run_dir) >= rnd)
            events += [killed, Event("restart SuperNode", lambda: killed.fired and _max_round(self.run_dir) >= rnd,
                                     self.restart_supernode, missed=lambda: killed.done and not killed.fired)]
        if options.restart_after_round is not None:
            after = options.restart_after_round
            events.append(Event("restart", lambda: _max_round(self.run_dir) >= after, self.restart_superlink))
        return events

    def missed(self, event: Event) -> None:
        self.result.events.append(f"MISSED: {event.name} (its moment passed before it could be done)")

    def watchdog(self, status: str) -> bool:
        """Recover from Flower's own failures on an overloaded machine, twice at most, and say so in
        the events: its SQLite state can fail with "database is locked", which kills the SuperExec (no
        ServerApp is ever started) or the ServerApp itself (the run fails with a 500 error). The first
        is revived by restarting the SuperLink, the second by restarting it and resuming the run."""
        with self.disrupting:
            with self.lock:
                superlink = self.live["superlink"]
            run_id = self.current_run()
            if status == "finished:failed":
                try:
                    details = str(self.cli.run_info(run_id).get("status-details", ""))
                except DeploymentError:
                    return False
                if not any(marker in details for marker in FLOWER_STATE_FAILURES) or self.revived >= 2:
                    return False
                self.revived += 1
                self.restart_superlink(f"because run {run_id} failed inside Flower's SuperLink ({details.splitlines()[0]})",
                                       f"SuperLink (revived {self.revived})")
                return True
            if status not in ("pending", "starting") or has_live_descendant(superlink, "flower-superexec"):
                self.waiting_without_superexec = 0
                return False
            self.waiting_without_superexec += 1
            if self.waiting_without_superexec < 2 or self.revived >= 2:  # one more interval first: it may be starting
                return False
            self.revived, self.waiting_without_superexec = self.revived + 1, 0
            old = self.release("superlink")
            self.group.stop_one(old)
            self.adopt("superlink", self.start_superlink(f"SuperLink (revived {self.revived})"))
            self.result.events.append(f"the SuperLink's SuperExec had died while run {run_id} was {status}: "
                                      f"restarted the SuperLink (pid {old.pid})")
            return True

    # ------------------------------------------------------------------ the whole run
    def run(self) -> LoopbackResult:
        """The deployment as numbered steps; every process is stopped however it ends."""
        runner: EventRunner | None = None
        try:
            # 1. Certificates, the SuperLink (TLS + node authentication) and the hospitals' keys.
            self.start_coordinator()
            # 2. The app the coordinator ships, and its hash, which every hospital pins (app-sha256).
            app = stage_app(self.out / "coordinator" / "app")
            self.app_hash = None if self.options.allow_any_app else fab_hash_of(app)
            if self.options.tampered_app:  # the hospitals pinned the reviewed app; this one differs
                policy = app / "client" / "policy.py"
                policy.write_text(policy.read_text() + "\n# edited by the coordinator after the hospitals' review\n")
            # 3. The hospitals: one SuperNode each (and, if asked, the intruders that must be refused).
            self.start_sites()
            # 4. The run; the ServerApp waits (federation.wait_for_sites_s) until the hospitals are online.
            self.new_run(self.cli.run(run_overrides(self.options, self.run_dir), app=app))
            events = self.events()
            if events:  # restarts and kills scheduled by the options
                runner = EventRunner(events, min(self.options.poll_s, 0.5), self.missed)
                runner.start()
            self.result.status = wait_for_run(self.cli, self.current_run, self.run_dir, self.options.rounds,
                                              self.check_alive, self.others, self.options, runner, self.watchdog)
            # 5. Its log, the checks of the run folder, and the run report.
            self.finish_run()
        except BaseException as error:
            self.result.error = f"{type(error).__name__}: {error}"
            raise
        finally:
            if runner is not None:
                runner.stopping.set()
                runner.join(timeout=60)
            self.stop_everything()
        return self.result

    def start_coordinator(self) -> None:
        """Certificates and keys, the flwr CLI's connection, the SuperLink, and every key registered."""
        write_bundle(self.certs, ["localhost"], self.sites + self.extra_keys)
        if self.options.with_intruders:
            write_bundle(self.out / "foreign-ca", ["localhost"], [])
        write_connection(self.coordinator_home, CONNECTION, self.address, self.certs / CA_CERT)
        self.adopt("superlink", self.start_superlink("SuperLink"))
        registered = [*self.sites, *([FOREIGN] if self.options.with_intruders else [])]
        with ThreadPoolExecutor(max_workers=len(registered)) as pool:  # independent CLI calls
            node_ids = pool.map(lambda name: self.cli.register(self.certs / SITES_DIR / f"{name}.pub"), registered)
            self.result.node_ids = dict(zip(registered, node_ids))

    def start_sites(self) -> None:
        """One SuperNode per hospital, with its CA certificate, private key and node config."""
        for name in self.sites:
            self.adopt(name, self.start_supernode(name, f"SuperNode {name}"))
        if self.options.with_intruders:
            self.start_intruders()

    def finish_run(self) -> None:
        """Save ``flwr log``, fail on a run that did not complete, check the run folder, write its report."""
        try:
            (self.run_dir / "flwr-log.txt").write_text(self.cli.log(self.current_run()))
        except (DeploymentError, OSError) as error:
            print(f"warning: could not fetch `flwr log {self.result.run_id}`: {error}", file=sys.stderr)
        if self.result.status != FINISHED_COMPLETED:
            raise DeploymentError(f"run {self.result.run_id} ended with status {self.result.status!r}; "
                                  f"see {self.run_dir / 'flwr-log.txt'} and {self.logs}")
        check_run_folder(self.run_dir, self.options.rounds)
        write_run_report(self.run_dir)

    def stop_everything(self) -> None:
        group, result = self.group, self.result
        for process in group.processes:
            process.poll()
        ended = {p.name: p.popen.returncode for p in group.processes}
        handled = group.stop()
        result.pids_left_running = still_running(handled)
        result.processes = {p.name: ProcessReport(p.name, p.pid, p.running_command or p.command, str(p.log_path),
                                                  p.popen.returncode, ended[p.name] is not None)
                            for p in group.processes}
        result.write(self.out / "deployment.json")


def run_loopback(options: LoopbackOptions) -> LoopbackResult:
    """Run the whole loopback deployment; every process is stopped before returning or raising.

    Raises DeploymentError (after stopping everything) when a step fails; the partial result is in
    ``<out>/deployment.json``.
    """
    _check_options(options)
    out = options.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise DeploymentError(f"--out {out} is not empty; choose a new folder (certificates and the run folder "
                              f"are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    return LoopbackDeployment(options, out).run()


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.deploy_loopback",
        description="Run a real Flower deployment on 127.0.0.1: SuperLink with TLS and SuperNode "
                    "authentication, one SuperNode per hospital, the tiny preset on synthetic data.",
        epilog="Results: <out>/run (summary.json, checkpoints/, samples/, flwr-log.txt); process logs: <out>/logs.",
    )
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder for everything")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    parser.add_argument("--sites", type=int, default=2, help="hospitals, one SuperNode each (default 2)")
    parser.add_argument("--local-steps", type=int, default=5, help="train.local_steps (default 5)")
    parser.add_argument("--train-per-site", type=int, default=64, help="data.train_per_site (default 64)")
    parser.add_argument("--test-per-site", type=int, default=32, help="data.test_per_site (default 32)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra Hydra override for the run (repeatable)")
    parser.add_argument("--with-intruders", action="store_true",
                        help="also start a SuperNode with an unregistered key and one trusting another CA "
                             "(both must be refused)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/MKL threads per Flower process (default 1: the ClientApps share the CPU)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run (default 900)")
    parser.add_argument("--restart-after-round", type=int, metavar="N",
                        help="stop the SuperLink and its ServerApp once round N is done, start it again and resume "
                             "the run (resume=<run folder>) for the remaining rounds")
    parser.add_argument("--kill-supernode-in-round", type=int, metavar="R",
                        help="kill the last hospital's SuperNode while it trains round R (with DP: after its first "
                             "DP step), restart it, and expect it back in the next round")
    parser.add_argument("--allow-any-app", action="store_true",
                        help="hospitals pin no app-sha256 (deploy/supernode.sh --allow-any-app); by default each pins "
                             "the hash of the app this run ships")
    parser.add_argument("--tampered-app", action="store_true",
                        help="ship an app whose client/policy.py was edited after the hospitals pinned the reviewed "
                             "one: every hospital must refuse it (the run fails)")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="federation=secaggplus: the hospitals' updates are summed with SecAgg+, so the "
                             "coordinator never sees one hospital's update (needs --sites >= 2)")
    parser.add_argument("--warm", action="store_true",
                        help="start each SuperNode with deploy/supernode.sh --warm: its ClientApps are forks of a "
                             "process that imported torch once (fedvitgan superexec)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks on `kill PID`
    options = LoopbackOptions(args.out, args.rounds, args.sites, args.local_steps, args.train_per_site,
                              args.test_per_site, args.override, args.with_intruders, args.threads, args.timeout,
                              restart_after_round=args.restart_after_round,
                              kill_supernode_in_round=args.kill_supernode_in_round, warm=args.warm,
                              allow_any_app=args.allow_any_app, tampered_app=args.tampered_app,
                              secure_aggregation=args.secure_aggregation)
    started = time.monotonic()
    try:
        result = run_loopback(options)
    except (DeploymentError, OSError) as error:
        print(f"deploy_loopback: {error}", file=sys.stderr)
        return 1
    print(f"run {result.run_id}: {result.status} in {time.monotonic() - started:.0f} s over TLS with "
          f"SuperNode authentication on 127.0.0.1:{result.superlink_port}")
    for event in result.events:
        print(f"  {event}")
    for report in result.processes.values():
        how = f"exited by itself with code {report.exit_code}" if report.exited_by_itself else "stopped"
        print(f"  {report.name:<22} pid {report.pid:<7} {how:<32} log {report.log}")
    if result.pids_left_running:
        print(f"warning: processes still running: {result.pids_left_running}", file=sys.stderr)
    print(f"run folder: {result.run_dir}")
    print(f"run report: {Path(result.run_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
