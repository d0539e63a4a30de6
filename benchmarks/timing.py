"""Side-by-side timing shared by the benchmark scripts: interleaved blocks, per-step medians."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch

Step = Callable[[torch.Tensor, torch.Tensor], object]


def step_timing_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the options every step-timing script shares: preset, batch, timed and warm-up
    steps, block length, device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset in conf/model (default: tiny)")
    parser.add_argument("--batch-size", type=int, default=32, help="real images per step (default: 32)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind (default: 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each kind first (default: 5)")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block (default: 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(steps: Mapping[str, Step], images: torch.Tensor, labels: torch.Tensor, *, warmup: int,
                        timed: int, block: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each kind, timed in alternating blocks after ``warmup`` steps each,
    so drift in machine load hits every kind alike."""
    for step in steps.values():
        for _ in range(warmup):
            step(images, labels)
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    while min(len(t) for t in times.values()) < timed:
        for kind, step in steps.items():
            for _ in range(block):
                sync(device)
                start = time.perf_counter()
                step(images, labels)
                sync(device)
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(t[:timed]) for kind, t in times.items()}


def describe_device(device: torch.device) -> str:
    """The line naming the device, torch version and thread count."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return f"device: {device.type} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
