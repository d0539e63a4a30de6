"""A hospital's per-message overhead beyond its training and evaluation, in simulation and deployment.

Overhead = the wall time of one hospital-message minus the time spent in training steps (the
reply's ``seconds``) and in evaluation (forward passes and the confusion/score summary).

- **simulation**: the real ServerApp loop and the real ClientApp handlers driven in this one
  process, one message after another (``tests/fakes.py``'s in-process grid: what a simulation
  worker does for each of its hospitals, without Ray's message passing). Each message is timed
  around the ClientApp call; evaluation is timed around ``predict_probabilities`` and
  ``summarise_predictions``. Run twice, same seed and data: the process keeps its hospitals
  (``client.cache=true``, the default) and rebuilds them for every message (``client.cache=false``).
  The figure is the median over the messages after round 1 (round 1 builds every hospital).
- **deployment**: ``simulations.deploy_loopback`` (SuperLink + one SuperNode per hospital on
  127.0.0.1, TLS, node authentication). Per phase the server's wall time from sending to the last
  reply (``phase_seconds`` in summary.json) minus the slowest hospital's training ``seconds``, or
  for evaluation the evaluation time of the same hospital in a fresh process (measured here, in
  process, for the same config). Flower starts a new ClientApp process for every message, so the
  hospital cache cannot act there; the overhead is Flower's polling plus process start and imports.

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/client_overhead.py
    PYTHONPATH=. .venv/bin/python benchmarks/client_overhead.py --sites 100 --rounds 2 --skip-deployment

Last line: ``per-message overhead: simulation S s, deployment D s`` (cache on). Targets: S <= 0.3 s,
D <= 3 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
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
    work: list[float] = field(default_factory=list)  # training or evaluation seconds

    def overhead(self, first_round: bool) -> list[float]:
        return [w - c for r, w, c in zip(self.round, self.wall, self.work) if (r == 1) == first_round]


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
    from client.hospital_cache import HOSPITALS
    from common import protocol
    from common.config import compose_config, plain_config
    from server.federation import run_federation
    from tests.fakes import InProcessGrid

    HOSPITALS.clear()
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
            timed.work.append(training + sum(evaluating))
            return reply

    run = plain_config(compose_config(overrides))
    run["output_dir"] = str(folder)
    builds = HOSPITALS.builds
    try:
        run_federation(TimedGrid(client_app, int(run["federation"]["num_sites"])), run, folder)
    finally:
        local_run.predict_probabilities, local_run.summarise_predictions = originals
    kept = {"hospitals_built": HOSPITALS.builds - builds, "hospitals_kept": len(HOSPITALS),
            "kept_mib": HOSPITALS.nbytes() / 2**20}
    HOSPITALS.clear()
    return timed, kept


def deployment(folder: Path, args: argparse.Namespace, eval_s: float) -> list[float]:
    """Per-message overhead of a loopback deployment (one figure per phase and round)."""
    from simulations.deploy_loopback import LoopbackOptions, run_loopback

    options = LoopbackOptions(out=folder, rounds=args.deploy_rounds, sites=args.deploy_sites,
                              local_steps=args.local_steps, train_per_site=args.deploy_train,
                              test_per_site=args.deploy_test, overrides=["samples_per_class=1"])
    result = run_loopback(options)
    if result.error or result.status != "completed":
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
    print(f"simulation: {args.sites} hospitals x {args.rounds} rounds x {args.local_steps} local steps, tiny preset, "
          f"synthetic data; ClientApp handlers driven in this process, one message at a time")
    figures: dict[str, dict[str, Any]] = {}
    for label, switch in (("cache on", "client.cache=true"), ("cache off", "client.cache=false")):
        started = time.perf_counter()
        timed, kept = simulate_in_process(out / f"simulation-{label.replace(' ', '-')}", [*common, switch])
        warm, cold = timed.overhead(first_round=False), timed.overhead(first_round=True)
        figures[label] = {"warm": _median(warm), "cold": _median(cold), "wall": _median(timed.wall),
                          "messages": len(timed.wall), "minutes": (time.perf_counter() - started) / 60, **kept}
        f = figures[label]
        print(f"  {label:9s}: overhead per hospital-message {f['warm']:.3f} s after round 1 (median of "
              f"{len(warm)}), {f['cold']:.3f} s in round 1; wall per message {f['wall']:.3f} s; "
              f"{f['hospitals_built']} hospitals built, {f['hospitals_kept']} kept ({f['kept_mib']:.0f} MiB); "
              f"{f['minutes']:.1f} min")
    ratio = figures["cache off"]["warm"] / figures["cache on"]["warm"]
    print(f"  cache off / cache on overhead ratio: {ratio:.1f}x; peak memory of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    simulation_s = figures["cache on"]["warm"]
    deployment_s = float("nan")
    if not args.skip_deployment:
        # Evaluation time of a fresh hospital (a deployed message's situation) for the deployment's config.
        probe, _ = simulate_in_process(out / "deployment-eval-probe", [
            "model=tiny", f"train.local_steps={args.local_steps}", "samples_per_class=1", "console.progress=off",
            "federation.num_sites=1", "federation.rounds=1", f"data.train_per_site={args.deploy_train}",
            f"data.test_per_site={args.deploy_test}", "client.cache=false"])
        eval_s = sum(w for k, w in zip(probe.kind, probe.work) if "evaluate" in k)
        imports = fresh_import_seconds()
        print(f"deployment: loopback, {args.deploy_sites} SuperNode(s) x {args.deploy_rounds} rounds x "
              f"{args.local_steps} local steps; evaluation of one fresh hospital {eval_s:.3f} s; importing the "
              f"ClientApp in a fresh interpreter {imports:.2f} s (median of 3); "
              f"FLWR_SUPEREXEC_TASK_POLL_INTERVAL={os.environ.get('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', '1.0 (default)')}")
        started = time.perf_counter()
        overheads = deployment(out / "deployment", args, eval_s)
        deployment_s = _median(overheads)
        print(f"  overhead per message {deployment_s:.2f} s (median of {len(overheads)} phases; "
              f"{', '.join(f'{o:.2f}' for o in overheads)}); {(time.perf_counter() - started) / 60:.1f} min")
    (out / "client_overhead.json").write_text(json.dumps({"simulation": figures, "deployment_s": deployment_s,
                                                          "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    met = simulation_s <= TARGET_SIMULATION_S and (args.skip_deployment or deployment_s <= TARGET_DEPLOYMENT_S)
    print(f"targets (simulation <= {TARGET_SIMULATION_S} s, deployment <= {TARGET_DEPLOYMENT_S} s): "
          f"{'met' if met else 'NOT met'}")
    print(f"per-message overhead: simulation {simulation_s:.3f} s, deployment {deployment_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
