"""Where a step's GPU time goes: kernel time by family and the top kernels, with ``torch.profiler``.

Shared by the benchmark scripts' ``--profile`` options. The busy share (kernel time over the
profiled wall time) says how much of a step the GPU waits for the host; the profiler's own
overhead lowers it a little.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.timing import sync

#: Kernel families, by a piece of the kernel's name (first match wins).
KERNEL_FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matrix products", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "cublas", "convolve")),
    ("optimiser", ("adam", "multi_tensor", "foreach")),
    ("copies", ("memcpy", "memset")),
    ("fused elementwise (compiled)", ("triton",)),
)


def kernel_family(name: str) -> str:
    """The family of a kernel's name (``other elementwise / reductions`` when none matches)."""
    lowered = name.lower()
    for family, pieces in KERNEL_FAMILIES:
        if any(piece in lowered for piece in pieces):
            return family
    return "other elementwise / reductions"


def profile_kind(kind: str, step: Callable[[torch.Tensor, torch.Tensor], object], images: torch.Tensor,
                 labels: torch.Tensor, device: torch.device, steps: int, top: int = 12) -> dict[str, float]:
    """Profile ``steps`` steps; print the GPU's busy share, kernel time per family and the top
    kernels; return the milliseconds per step of each family."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(images, labels)
        sync(device)
        wall = (time.perf_counter() - start) / steps * 1e3
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA] or \
        [e for e in averages if e.self_device_time_total > 0 and e.self_cpu_time_total == 0]
    if not kernels:  # the CPU: where the host's time goes instead
        cpu_ops = sorted((e for e in averages if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in cpu_ops) / steps / 1e3
        print(f"profile {kind}: {wall:.2f} ms per step (profiled), operators {total:.2f} ms of CPU time")
        for e in cpu_ops[:top]:
            print(f"    {e.self_cpu_time_total / steps / 1e3:7.2f} ms  x{e.count // steps:<4} {e.key[:90]}")
        return {}
    busy = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    print(f"profile {kind}: {wall:.2f} ms per step (profiled), GPU kernels {busy:.2f} ms "
          f"({100 * busy / wall:.0f} % busy)")
    families: dict[str, float] = {}
    for e in kernels:
        family = kernel_family(e.key)
        families[family] = families.get(family, 0.0) + e.self_device_time_total / steps / 1e3
    for family, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {family:<32} {ms:8.2f} ms  {100 * ms / busy if busy else 0.0:5.1f} %")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"    {e.self_device_time_total / steps / 1e3:7.2f} ms  x{e.count // steps:<4} {e.key[:90]}")
    return families


def sync_points(kind: str, step: Callable[[torch.Tensor, torch.Tensor], object], images: torch.Tensor,
                labels: torch.Tensor, top: int = 15) -> None:
    """Run one step under CUDA's sync debug mode and print where it made the host wait for the GPU
    (file:line of the Python code that asked, with counts)."""
    import warnings

    if not torch.cuda.is_available():
        print(f"sync points {kind}: no CUDA device")
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(images, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            place = f"{Path(w.filename).name}:{w.lineno}"
            places[place] = places.get(place, 0) + 1
    print(f"sync points {kind}: {sum(places.values())} in one step")
    for place, count in sorted(places.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    x{count:<3} {place}")


def flop_breakdown(step: Callable[[torch.Tensor, torch.Tensor], object], images: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, int]:
    """FLOPs of one step by operator (``torch.utils.flop_counter``: matrix products, convolutions and,
    where the kernel reports them, attention), after one uncounted step."""
    from torch.utils.flop_counter import FlopCounterMode

    step(images, labels)
    counter = FlopCounterMode(display=False)
    with counter:
        step(images, labels)
    return {str(op).removeprefix("aten."): int(f) for op, f in counter.get_flop_counts().get("Global", {}).items()}

