"""Stream a full-size PCam training file through the loader: throughput and bounded memory.

Writes a PCam-format HDF5 pair (``camelyonpatch_level_2_split_train_{x,y}.h5``, key ``x``:
(N, 96, 96, 3) uint8 random bytes, key ``y``: (N, 1, 1, 1)) in chunks to a temporary folder, then
streams it, in a fresh process that does nothing else, through a DataLoader over the PCam data set
(patches resized to ``--image-size``), and reports that process's peak RSS (``ru_maxrss``). For
scale it then times the tiny preset's unified training step at the same batch size in this
process and prints how many times faster the loader is. The file is deleted at the end.

    python benchmarks/pcam_stream.py [--patches 262144] [--image-size 32] [--batch-size 32]

Ends with the line ``peak RSS MiB: M, patches/s: P``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATCH = 96
X_FILE = "camelyonpatch_level_2_split_train_x.h5"
Y_FILE = "camelyonpatch_level_2_split_train_y.h5"


def write_pcam(folder: Path, patches: int, block: int, chunked: bool, seed: int = 0) -> float:
    """Write the x/y pair block by block (memory: one block); returns the seconds it took."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    with h5py.File(folder / X_FILE, "w") as xf, h5py.File(folder / Y_FILE, "w") as yf:
        x = xf.create_dataset("x", shape=(patches, PATCH, PATCH, 3), dtype=np.uint8,
                              chunks=(1, PATCH, PATCH, 3) if chunked else None)
        y = yf.create_dataset("y", shape=(patches, 1, 1, 1), dtype=np.uint8)
        for first in range(0, patches, block):
            n = min(block, patches - first)
            x[first : first + n] = np.frombuffer(rng.bytes(n * PATCH * PATCH * 3), np.uint8).reshape(n, PATCH, PATCH, 3)
            y[first : first + n] = rng.integers(0, 2, size=(n, 1, 1, 1), dtype=np.uint8)
    return time.perf_counter() - start


def _stream(root: str, image_size: int, batch_size: int, workers: int, queue) -> None:
    """Child process: stream every patch once; report count, seconds and peak RSS."""
    import torch
    from torch.utils.data import DataLoader

    from common.data.registry import load_dataset

    torch.set_num_threads(1)
    start = time.perf_counter()
    dataset = load_dataset({"name": "pcam", "root": root}, "train", image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    seen = 0
    for images, labels in loader:
        assert images.shape[1:] == (3, image_size, image_size) and images.dtype == torch.float32
        seen += len(labels)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB on Linux
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    queue.put((seen, seconds, max(rss, child_rss)))


def stream(root: Path, image_size: int, batch_size: int, workers: int) -> tuple[int, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_stream, args=(str(root), image_size, batch_size, workers, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def unified_images_per_s(batch_size: int, steps: int) -> float:
    """Real images/s of the tiny preset's unified step (median step time, this process)."""
    import torch

    from common.model import build_model, model_preset
    from common.train import LocalTrainer, TrainConfig

    cfg = model_preset("tiny")
    trainer = LocalTrainer(build_model(cfg, 2, seed=0), TrainConfig())
    trainer.global_step = trainer.cfg.selection.warmup_steps
    images = torch.rand(batch_size, 3, cfg.image_size, cfg.image_size) * 2 - 1
    labels = torch.arange(batch_size) % 2
    for _ in range(3):
        trainer.unified_step(images, labels)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.unified_step(images, labels)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=262_144, help="patches in the file (default: 262144)")
    parser.add_argument("--image-size", type=int, default=32, help="size patches are resized to (default: 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0)")
    parser.add_argument("--block", type=int, default=4096, help="patches written per block (default: 4096)")
    parser.add_argument("--contiguous", action="store_true", help="write x contiguous instead of one chunk per patch")
    parser.add_argument("--steps", type=int, default=10, help="timed unified steps (default: 10; 0 skips)")
    parser.add_argument("--dir", default=None, help="folder for the temporary file (default: system temp)")
    args = parser.parse_args()

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, "
          f"python {platform.python_version()}, h5py {h5py.__version__}")
    with tempfile.TemporaryDirectory(prefix="pcam_stream_", dir=args.dir) as tmp:
        folder = Path(tmp)
        seconds = write_pcam(folder, args.patches, args.block, not args.contiguous)
        size_gib = (folder / X_FILE).stat().st_size / 2**30
        print(f"wrote {args.patches} patches ({size_gib:.2f} GiB, "
              f"{'contiguous' if args.contiguous else 'one chunk per patch'}) in {seconds:.1f} s")
        seen, seconds, rss = stream(folder, args.image_size, args.batch_size, args.workers)
    assert seen == args.patches, f"streamed {seen} of {args.patches} patches"
    rate = seen / seconds
    print(f"streamed {seen} patches at {args.image_size} px, batch {args.batch_size}, "
          f"{args.workers} workers, in {seconds:.1f} s (file deleted)")
    if args.steps > 0:
        unified = unified_images_per_s(args.batch_size, args.steps)
        print(f"tiny unified step: {unified:.0f} real images/s at batch {args.batch_size}; "
              f"loader/step ratio: {rate / unified:.1f}x")
    print(f"peak RSS MiB: {rss:.0f}, patches/s: {rate:.0f}")


if __name__ == "__main__":
    main()
