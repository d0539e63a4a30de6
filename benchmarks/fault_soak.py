"""Fault soak: does the federation end where a clean one ends when hospitals break or attack?

Runs `fedvitgan simulate` (Flower's simulation engine) four times, same seed and data:

- clean: no faults, FedAvg;
- faults: a share (``--fault-rate``, 10 %) of all hospital-rounds, drawn at random, crash, hang,
  send NaN or send a wrong-shaped tensor (kinds spread evenly), FedAvg;
- byzantine-robust: one hospital sends ``global + scale x (update - global)`` every round, every
  group is aggregated with ``--robust-rule`` (trimmed mean by default), and a round needs 3 valid
  replies (``federation.min_sites=3``: a robust rule over fewer replies is no defence);
- byzantine-fedavg: the same attack against plain FedAvg (to show the harm).

Target: faults and byzantine-robust end within 3 points of the clean run's final balanced accuracy
(pooled over the hospitals' held-out patches). One line per scenario, then
``fault soak: clean B0, faults B1, byzantine-robust B2, byzantine-fedavg B3``. Each run's folder
(summary.json, simulate.log) is kept under ``--out``; ``fault_soak.json`` there holds the figures.

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/fault_soak.py [--local-steps 15] [--rounds 20]

It measures accuracy, which other processes' load does not change; its minutes depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RANDOM_KINDS = ("crash", "hang", "nan", "shape")
TARGET_POINTS = 0.03


def random_faults(sites: int, rounds: int, rate: float, seed: int) -> list[dict[str, Any]]:
    """``rate`` of all (site, round) pairs, drawn without replacement, each with a kind of RANDOM_KINDS
    (spread evenly, in random order)."""
    rng = np.random.default_rng(seed)
    count = int(round(rate * sites * rounds))
    picks = rng.choice(sites * rounds, size=count, replace=False)
    kinds = [RANDOM_KINDS[i % len(RANDOM_KINDS)] for i in range(count)]
    rng.shuffle(kinds)
    return [{"site": int(p % sites), "kind": kind, "rounds": [int(p // sites) + 1]}
            for p, kind in sorted(zip(picks, kinds), key=lambda pk: (pk[0] // sites, pk[0] % sites))]


def faults_override(faults: list[dict[str, Any]]) -> str:
    """The Hydra command-line form of a fault list."""
    entries = ("{" + ",".join(f"{k}:{v if isinstance(v, str) else json.dumps(v).replace(' ', '')}"
                              for k, v in fault.items()) + "}" for fault in faults)
    return "faults=[" + ",".join(entries) + "]"


def scenarios(args: argparse.Namespace) -> dict[str, list[str]]:
    attacker = f"faults=[{{site:{args.attacker},kind:scale,scale:{args.scale:g},rounds:all}}]"
    robust = [f"federation.aggregation.{g}.rule={args.robust_rule}" for g in ("generator", "discriminator", "classifier")]
    return {
        "clean": [],
        "faults": [faults_override(random_faults(args.sites, args.rounds, args.fault_rate, args.seed))],
        "byzantine-robust": [attacker, *robust, "federation.min_sites=3"],
        "byzantine-fedavg": [attacker],
    }


def run_scenario(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    folder = args.out / name
    common = [f"federation.num_sites={args.sites}", f"federation.rounds={args.rounds}",
              f"train.local_steps={args.local_steps}", f"federation.round_timeout_s={args.round_timeout}",
              f"seed={args.seed}", "model=tiny", "samples_per_class=2", f"hydra.run.dir={folder}"]
    command = [sys.executable, "-m", "simulations.cli", "simulate", *common, *overrides]
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "simulate.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    minutes = (time.perf_counter() - started) / 60
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{name}: no summary.json (exit {done.returncode}); see {folder / 'simulate.log'}")
    summary = json.loads(summary_path.read_text())
    rounds = summary.get("rounds", [])
    evaluated = [r for r in rounds if r["global"].get("balanced_accuracy") is not None]
    final = evaluated[-1]["global"]["balanced_accuracy"] if evaluated else float("nan")
    return {
        "scenario": name,
        "overrides": overrides,
        "exit": done.returncode,
        "status": summary.get("status"),
        "rounds": len(rounds),
        "final_balanced_accuracy": final,
        "final_accuracy": evaluated[-1]["global"]["accuracy"] if evaluated else float("nan"),
        "last3_mean_balanced_accuracy": float(np.mean([r["global"]["balanced_accuracy"] for r in evaluated[-3:]]))
        if evaluated else float("nan"),
        "last_evaluated_round": evaluated[-1]["round"] if evaluated else None,
        "left_out": sum(len(r["excluded"]) for r in rounds),
        "failed_rounds": sum(1 for r in rounds if not r["aggregated"]),
        "minutes": minutes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=15, help="unified steps per round at each hospital")
    parser.add_argument("--fault-rate", type=float, default=0.1, help="share of hospital-rounds with a random fault")
    parser.add_argument("--scale", type=float, default=1e4, help="the byzantine hospital's update scale")
    parser.add_argument("--attacker", type=int, default=1, help="the byzantine hospital")
    parser.add_argument("--robust-rule", choices=("median", "trimmed_mean"), default="trimmed_mean")
    parser.add_argument("--round-timeout", type=float, default=300.0,
                        help="federation.round_timeout_s: what a hang sleeps past; keep it well above a normal phase "
                             "(the first includes the simulation's start-up) on a loaded machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated scenarios to run (default: all four)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / time.strftime("fault-soak-%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    plan = scenarios(args)
    chosen = [s for s in args.only.split(",") if s] or list(plan)
    unknown = sorted(set(chosen) - set(plan))
    if unknown:
        parser.error(f"--only: unknown scenario(s) {unknown}; choose from {list(plan)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, python {platform.python_version()}; "
          f"{args.sites} hospitals x {args.rounds} rounds, {args.local_steps} local steps, tiny preset, seed {args.seed}",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in chosen:
        result = run_scenario(name, plan[name], args)
        results[name] = result
        print(f"{name:<17} final balanced accuracy {result['final_balanced_accuracy']:.3f} "
              f"(accuracy {result['final_accuracy']:.3f}, round {result['last_evaluated_round']}; "
              f"mean of the last 3 rounds {result['last3_mean_balanced_accuracy']:.3f}), "
              f"status {result['status']}, {result['left_out']} replies left out, "
              f"{result['failed_rounds']} rounds not aggregated, {result['minutes']:.1f} min", flush=True)
        (args.out / "fault_soak.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                              "results": results}, indent=2))
    b = {name: f"{results[name]['final_balanced_accuracy']:.3f}" if name in results else "not run" for name in plan}
    print(f"fault soak: clean {b['clean']}, faults {b['faults']}, byzantine-robust {b['byzantine-robust']}, "
          f"byzantine-fedavg {b['byzantine-fedavg']}")
    if "clean" not in results:
        return 0
    clean = results["clean"]["final_balanced_accuracy"]
    checks = {name: abs(results[name]["final_balanced_accuracy"] - clean) <= TARGET_POINTS
              for name in ("faults", "byzantine-robust") if name in results}
    for name, met in checks.items():
        print(f"  {name}: {100 * (results[name]['final_balanced_accuracy'] - clean):+.1f} points vs clean -> "
              f"target (within 3) {'met' if met else 'NOT met'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
