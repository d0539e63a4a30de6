"""SecAgg+ against plain FedAvg: round time and bytes for 3, 10 and 30 simulated hospitals (issue 27).

Both runs use the real ServerApp loop and the real ClientApp in one process (``tests.fakes.InProcessGrid``:
no Ray, no sockets, hospitals answer one after another), the tiny preset, the same data, seeds and
local steps, and the same aggregation (FedAvg with the server-side bounds off, as
``federation=secaggplus`` sets them). Each run is two rounds without evaluation; round 2 is timed
(round 1 also builds every hospital's data and model). The runs of one size alternate plain and
secure, ``--repeats`` times each; the figures are medians.

Bytes are everything each round sends and receives: instructions and replies, and for SecAgg+ its
key stages (setup, share_keys, unmask) as well.

    PYTHONPATH=. .venv/bin/python benchmarks/secure_aggregation.py [--sizes 3 10 30] [--repeats 3] [--local-steps 5]

The last line reads ``secure/plain round time: R3, R10, R30; bytes: B3, B10, B30``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from client.app import app as client_app
from common.config import compose_config, plain_config
from server.federation import run_federation
from tests.fakes import InProcessGrid

COMMON = ["model=tiny", "data=synthetic", "device=cpu", "federation.rounds=2", "federation.evaluate_each_round=false",
          "federation.aggregation.clip_update_norm=null", "federation.aggregation.max_weight_share=1.0",
          "samples_per_class=1", "console.progress=off"]
MODES = {"plain": [], "secure": ["federation.secure_aggregation=secaggplus"]}


def one_run(mode: str, hospitals: int, local_steps: int, train_per_site: int) -> dict[str, float]:
    """Round 2's seconds (training phase) and bytes each way of one two-round run."""
    overrides = [*COMMON, *MODES[mode], f"federation.num_sites={hospitals}", f"train.local_steps={local_steps}",
                 f"data.train_per_site={train_per_site}", "data.test_per_site=8"]
    run = plain_config(compose_config(overrides))
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        run["output_dir"], run["resume"] = folder, None
        run_federation(InProcessGrid(client_app, hospitals), run, folder)
        entry = json.loads((Path(folder) / "summary.json").read_text())["rounds"][1]
    if not entry["aggregated"]:
        raise RuntimeError(f"{mode}, {hospitals} hospitals: round 2 not aggregated: {entry['failure']}")
    to_sites = int(entry["bytes"]["train_to_sites"])
    from_sites = int(entry["bytes"]["train_from_sites"])
    secure = entry.get("secure_aggregation")
    if secure is not None:  # the key stages; the training stage's own traffic is counted above
        keys = {s: b for s, b in secure["bytes"].items() if s != "collect_masked_vectors"}
        to_sites += sum(int(b["to_sites"]) for b in keys.values())
        from_sites += sum(int(b["from_sites"]) for b in keys.values())
    return {"seconds": float(entry["phase_seconds"]["train"]), "bytes": float(to_sites + from_sites),
            "to": float(to_sites), "from": float(from_sites)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 10, 30], help="hospitals per run (default 3 10 30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode and size, alternating (default 3)")
    parser.add_argument("--local-steps", type=int, default=5, help="train.local_steps (default 5)")
    parser.add_argument("--train-per-site", type=int, default=32, help="data.train_per_site (default 32)")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"device: cpu ({platform.machine()}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"tiny preset, {args.local_steps} local steps, {args.train_per_site} patches per hospital, "
          f"{args.repeats} runs per mode, round 2 timed")
    time_ratios, byte_ratios = [], []
    for hospitals in args.sizes:
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                started = time.perf_counter()
                results[mode].append(one_run(mode, hospitals, args.local_steps, args.train_per_site))
                results[mode][-1]["wall"] = time.perf_counter() - started
        medians: dict[str, dict[str, Any]] = {
            mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for mode, runs in results.items()}
        time_ratio = medians["secure"]["seconds"] / medians["plain"]["seconds"]
        byte_ratio = medians["secure"]["bytes"] / medians["plain"]["bytes"]
        time_ratios.append(time_ratio)
        byte_ratios.append(byte_ratio)
        for mode, m in medians.items():
            print(f"  {hospitals:>3} hospitals  {mode:<6}  round {m['seconds']:7.2f} s   "
                  f"MB to {m['to'] / 2**20:8.2f}   MB from {m['from'] / 2**20:8.2f}")
        print(f"  {hospitals:>3} hospitals  secure/plain  time {time_ratio:.2f}  bytes {byte_ratio:.2f}")
    print("secure/plain round time: " + ", ".join(f"{r:.2f}" for r in time_ratios)
          + "; bytes: " + ", ".join(f"{r:.2f}" for r in byte_ratios))


if __name__ == "__main__":
    main()
