"""A hospital's per-message overhead beyond its training and evaluation, in simulation and deployment.

Overhead = the wall time of one hospital-message minus the time of its training steps (the reply's
``seconds``) and of its evaluation, taken as the evaluation of a hospital whose data set is already
in memory (forward passes and the confusion/score summary: the median over the evaluate messages of
the in-process, cache-on run below). Loading or rebuilding anything counts as overhead.

- **simulation** (the figure of the last line): ``fedvitgan simulate``, Flower's simulation engine
  (Ray), with one worker (``federation.backend.num_cpus`` = all cores) so that hospital-messages run
  one at a time; per phase, the server's wall time from sending to the last reply
  (``phase_seconds`` in summary.json) minus the hospitals' training and evaluation, divided by the
  hospitals. Median over the phases after round 1 (round 1 builds every hospital and starts Ray's
  worker; printed apart).
- **in process**: the real ServerApp loop and the real ClientApp handlers driven in this process
  (``tests/fakes.py``'s in-process grid), each message timed around the ClientApp call: the
  hospital's own share of the overhead, without Ray's message passing.

  Both run twice, same seed and data: with the hospitals kept between messages
  (``client.cache=true``, the default) and rebuilt for every message (``client.cache=false``).
- **deployment**: ``simulations.deploy_loopback`` (SuperLink + one SuperNode per hospital on
  127.0.0.1, TLS, node authentication); per phase, ``phase_seconds`` minus the slowest hospital's
  training ``seconds``, or for evaluation the evaluation of a fresh hospital for the same config
  (measured here). Every message is a new ClientApp process, so the hospital cache cannot act there.
  Two modes, side by side: **cold**, Flower's SuperExec (a new ``flwr-clientapp`` per message, which
  imports torch and timm again), and **warm**, ``deploy/supernode.sh --warm`` (each ClientApp a fork
  of ``fedvitgan superexec``'s fork server, which imported them once).

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/client_overhead.py
    PYTHONPATH=. .venv/bin/python benchmarks/client_overhead.py --sites 100 --rounds 2 --skip-deployment

    PYTHONPATH=. .venv/bin/python benchmarks/client_overhead.py --skip-simulation --deploy-modes warm,cold

Last line: ``per-message overhead: simulation S s, deployment D s`` (cache on; D: the warm mode's
median when it ran). Targets: S <= 0.3 s, D <= 3 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_SIMULATION_S = 0.3
TARGET_DEPLOYMENT_S = 3.0


@dataclass
class Timed:
    """Per-message wall, training and evaluation seconds of one run."""

    kind: list[str] = field(default_factory=list)
    round: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    work: list[float] = field(default_factory=list)  # training seconds (the reply's)
    evaluation: list[float] = field(default_factory=list)  # measured around the evaluation calls

    def evaluation_seconds(self) -> float:
        """Median evaluation of an evaluate message after round 1 (the data set in memory when kept)."""
        return _median([e for k, r, e in zip(self.kind, self.round, self.evaluation) if "evaluate" in k and r > 1])

    def overhead(self, first_round: bool, evaluation_s: float) -> list[float]:
        return [w - c - (evaluation_s if "evaluate" in k else 0.0)
                for k, r, w, c in zip(self.kind, self.round, self.wall, self.work) if (r == 1) == first_round]


def _timer(store: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store.append(time.perf_counter() - start)
    return timed


def simulate_in_process(folder: Path, overrides: list[str]) -> tuple[Timed, dict[str, Any]]:
    """One federation with the ClientApp in this process; every hospital-message timed."""
    import client.local_run as local_run
    from client.app import app as client_app
    from client.site_cache import SITE_CACHE
    from common import protocol
    from common.config import compose_config, plain_config
    from server.federation import run_federation
    from tests.fakes import InProcessGrid

    SITE_CACHE.clear()
    evaluating: list[float] = []
    originals = local_run.predict_probabilities, local_run.summarise_predictions
    local_run.predict_probabilities = _timer(evaluating, originals[0])
    local_run.summarise_predictions = _timer(evaluating, originals[1])
    timed = Timed()

    class TimedGrid(InProcessGrid):
        def answer(self, msg):  # noqa: ANN001, ANN202 - Flower's Message
            evaluating.clear()
            start = time.perf_counter()
            reply = super().answer(msg)
            timed.wall.append(time.perf_counter() - start)
            timed.kind.append(msg.metadata.message_type)
            timed.round.append(int(msg.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND]))
            metrics = reply.content.metric_records.get(protocol.METRICS) if not reply.has_error() else None
            training = float(metrics.get("seconds", 0.0)) if metrics is not None and "train" in timed.kind[-1] else 0.0
            timed.work.append(training)
            timed.evaluation.append(sum(evaluating))
            return reply

    run = plain_config(compose_config(overrides))
    run["output_dir"] = str(folder)
    builds = SITE_CACHE.builds
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(folder.parent / f"{folder.name}.log", "w") as log, contextlib.redirect_stdout(log):
            run_federation(TimedGrid(client_app, int(run["federation"]["num_sites"])), run, folder)
    finally:
        local_run.predict_probabilities, local_run.summarise_predictions = originals
    kept = {"hospitals_built": SITE_CACHE.builds - builds, "hospitals_kept": len(SITE_CACHE),
            "kept_mib": SITE_CACHE.nbytes() / 2**20}
    SITE_CACHE.clear()
    return timed, kept


def simulate_engine(folder: Path, overrides: list[str], evaluation_s: float) -> tuple[list[float], list[float]]:
    """``fedvitgan simulate`` with one Ray worker; per-message overhead per phase (round 1, later rounds)."""
    cores = os.cpu_count() or 1
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--quiet", *overrides,
               f"federation.backend.num_cpus={cores}", f"hydra.run.dir={folder}"]
    with open(folder.parent / f"{folder.name}.log", "w") as log:
        subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=log,
                       check=True)
    summary = json.loads((folder / "summary.json").read_text())
    first, later = [], []
    for entry in summary["rounds"]:
        sites = [s for s in entry["sites"].values() if "train" in s]
        phases = entry["phase_seconds"]
        overheads = [(phases["train"] - sum(s["train"]["seconds"] for s in sites)) / len(sites)]
        if "evaluate" in phases:
            overheads.append(phases["evaluate"] / len(sites) - evaluation_s)
        (first if entry["round"] == 1 else later).extend(overheads)
    return first, later


def deployment(folder: Path, args: argparse.Namespace, eval_s: float, warm: bool) -> list[float]:
    """Per-message overhead of a loopback deployment (one figure per phase and round); ``warm``: the
    SuperNodes run ``deploy/supernode.sh --warm`` (ClientApps forked from ``fedvitgan superexec``)."""
    from simulations.deploy_loopback import LoopbackOptions, run_loopback
    from simulations.deployment import FINISHED_COMPLETED

    options = LoopbackOptions(out=folder, rounds=args.deploy_rounds, sites=args.deploy_sites,
                              local_steps=args.local_steps, train_per_site=args.deploy_train,
                              test_per_site=args.deploy_test, overrides=["samples_per_class=1"], warm=warm)
    result = run_loopback(options)
    if result.error or result.status != FINISHED_COMPLETED:
        raise SystemExit(f"the loopback deployment did not complete: {result.error or result.status} (see {folder})")
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    overheads = []
    for entry in summary["rounds"]:
        phases = entry["phase_seconds"]
        trained = max(s["train"]["seconds"] for s in entry["sites"].values() if "train" in s)
        overheads.append(phases["train"] - trained)
        if "evaluate" in phases:
            overheads.append(phases["evaluate"] - eval_s)
    return overheads


def fresh_import_seconds() -> float:
    """Seconds a fresh interpreter needs to import the ClientApp (what every deployed message pays)."""
    code = "import time; t = time.perf_counter(); import client.app; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                 check=True).stdout.strip()) for _ in range(3)]
    return statistics.median(runs)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _deploy_modes(text: str) -> list[str]:
    """``--deploy-modes``: a comma-separated list of cold and warm, checked before anything runs."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("cold", "warm")]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes are cold and warm, got {text!r}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=10, help="simulated hospitals (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="simulated rounds (default 3)")
    parser.add_argument("--local-steps", type=int, default=2, help="train.local_steps, both modes (default 2)")
    parser.add_argument("--deploy-sites", type=int, default=1,
                        help="hospitals (SuperNodes) in the deployment (default 1: one message at a time)")
    parser.add_argument("--deploy-rounds", type=int, default=3, help="deployment rounds (default 3)")
    parser.add_argument("--deploy-train", type=int, default=64, help="data.train_per_site in the deployment (default 64)")
    parser.add_argument("--deploy-test", type=int, default=32, help="data.test_per_site in the deployment (default 32)")
    parser.add_argument("--skip-deployment", action="store_true", help="simulation only")
    parser.add_argument("--skip-simulation", action="store_true", help="deployment only")
    parser.add_argument("--deploy-modes", type=_deploy_modes, default="cold,warm",
                        help="deployments to run, in this order: cold (Flower's flwr-clientapp per message), warm "
                             "(deploy/supernode.sh --warm); default cold,warm. The last line reports warm if run")
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="client-overhead-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, "
          f"python {platform.python_version()}, torch {torch.__version__}; folders under {out}")
    common = ["model=tiny", f"train.local_steps={args.local_steps}", "samples_per_class=1", "console.progress=off",
              f"federation.num_sites={args.sites}", f"federation.rounds={args.rounds}"]
    switches = {"cache on": "client.cache=true", "cache off": "client.cache=false"}
    print(f"{args.sites} hospitals x {args.rounds} rounds x {args.local_steps} local steps, tiny preset, synthetic "
          f"data (600 training and 300 test patches per hospital)")
    figures: dict[str, dict[str, Any]] = {}
    evaluation_s = float("nan")
    simulated = {} if args.skip_simulation else switches
    for label, switch in simulated.items():
        started = time.perf_counter()
        timed, kept = simulate_in_process(out / f"in-process-{label.replace(' ', '-')}", [*common, switch])
        if label == "cache on":
            evaluation_s = timed.evaluation_seconds()
            print(f"evaluation of a hospital with its data in memory: {evaluation_s:.3f} s (median)")
        warm, cold = timed.overhead(False, evaluation_s), timed.overhead(True, evaluation_s)
        figures[f"in process, {label}"] = f = {
            "later": _median(warm), "round1": _median(cold), "wall": _median(timed.wall), "messages": len(timed.wall),
            "minutes": (time.perf_counter() - started) / 60, **kept}
        print(f"in process, {label:9s}: overhead per hospital-message {f['later']:.3f} s after round 1 (median of "
              f"{len(warm)} messages), {f['round1']:.3f} s in round 1; wall per message {f['wall']:.3f} s; "
              f"{f['hospitals_built']} hospitals built, {f['hospitals_kept']} kept at the end ({f['kept_mib']:.0f} MiB); "
              f"{f['minutes']:.1f} min")
    print(f"  peak memory of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    for label, switch in simulated.items():
        started = time.perf_counter()
        first, later = simulate_engine(out / f"simulation-{label.replace(' ', '-')}", [*common, switch], evaluation_s)
        figures[f"simulation, {label}"] = f = {"later": _median(later), "round1": _median(first),
                                               "minutes": (time.perf_counter() - started) / 60}
        print(f"simulation (Flower engine, 1 worker), {label:9s}: overhead per hospital-message {f['later']:.3f} s "
              f"after round 1 (median of {len(later)} phases), {f['round1']:.3f} s in round 1; {f['minutes']:.1f} min")
    for where in ("in process", "simulation") if simulated else ():
        on, off = figures[f"{where}, cache on"]["later"], figures[f"{where}, cache off"]["later"]
        print(f"{where}: cache off / cache on overhead ratio {off / on:.1f}x ({off:.3f} s / {on:.3f} s)")
    simulation_s = figures["simulation, cache on"]["later"] if figures else float("nan")
    deployment_s = float("nan")
    deployments: dict[str, dict[str, Any]] = {}
    if not args.skip_deployment:
        # Evaluation time of a fresh hospital (a deployed message's situation) for the deployment's config.
        probe, _ = simulate_in_process(out / "deployment-eval-probe", [
            "model=tiny", f"train.local_steps={args.local_steps}", "samples_per_class=1", "console.progress=off",
            "federation.num_sites=1", "federation.rounds=1", f"data.train_per_site={args.deploy_train}",
            f"data.test_per_site={args.deploy_test}", "client.cache=false"])
        eval_s = sum(e for k, e in zip(probe.kind, probe.evaluation) if "evaluate" in k)
        imports = fresh_import_seconds()
        print(f"deployment: loopback, {args.deploy_sites} SuperNode(s) x {args.deploy_rounds} rounds x "
              f"{args.local_steps} local steps; evaluation of one fresh hospital {eval_s:.3f} s; importing the "
              f"ClientApp in a fresh interpreter {imports:.2f} s (median of 3); "
              f"FLWR_SUPEREXEC_TASK_POLL_INTERVAL={os.environ.get('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', 'unset: 1 s cold, 0.2 s warm')}")
        for mode in args.deploy_modes:
            started = time.perf_counter()
            overheads = deployment(out / f"deployment-{mode}", args, eval_s, warm=mode == "warm")
            mean = sum(overheads) / len(overheads)
            deployments[mode] = {"median": _median(overheads), "mean": mean, "phases": overheads}
            print(f"  {mode}: overhead per message {_median(overheads):.2f} s (median of {len(overheads)} phases; "
                  f"{', '.join(f'{o:.2f}' for o in overheads)}; mean {mean:.2f} s); "
                  f"{(time.perf_counter() - started) / 60:.1f} min")
        if "cold" in deployments and "warm" in deployments:
            cold, warm = deployments["cold"], deployments["warm"]
            print(f"deployment: warm / cold overhead ratio {warm['median'] / cold['median']:.2f} (medians "
                  f"{warm['median']:.2f} s / {cold['median']:.2f} s; means {warm['mean']:.2f} s / {cold['mean']:.2f} s)")
        deployment_s = deployments.get("warm", deployments.get("cold", {})).get("median", float("nan"))
    (out / "client_overhead.json").write_text(json.dumps({"simulation": figures, "deployment_s": deployment_s,
                                                          "deployments": deployments,
                                                          "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    verdict = {True: "met", False: "NOT met"}
    deployment_verdict = "not measured" if args.skip_deployment else verdict[deployment_s <= TARGET_DEPLOYMENT_S]
    simulation_verdict = "not measured" if args.skip_simulation else verdict[simulation_s <= TARGET_SIMULATION_S]
    print(f"targets: simulation <= {TARGET_SIMULATION_S} s {simulation_verdict}, "
          f"deployment <= {TARGET_DEPLOYMENT_S} s {deployment_verdict}")
    print(f"per-message overhead: simulation {simulation_s:.3f} s, deployment {deployment_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
