"""Time the unified step against a classifier-only step on the same trunk, batch and input.

Both steps run interleaved in one process (alternating blocks, so drift in machine load hits both),
and each is timed per step; the medians are compared. Memory of each step is measured on its
own: on CUDA with ``max_memory_allocated``; on the CPU in a child process that runs only that step,
as its peak RSS (dominated by importing torch) and the growth of its RSS over the steps.

    python benchmarks/unified_step.py [--preset tiny] [--batch-size 32] [--steps 40]
    python benchmarks/unified_step.py --train generator_update=same_pass --train generated_batch_size=16 --with-default

``--train KEY=VALUE`` sets a ``TrainConfig`` field of the timed unified step (repeatable);
``--with-default`` also times the unified step with the default config in the same interleaving.
``--flops`` also counts each kind's FLOPs per step by operator (``torch.utils.flop_counter``; on the
CPU it does not see the attention kernel) and prints their ratio: where the time ratio exceeds it,
the extra time is in how the unified step's work runs (smaller products, more small operators, a
third optimiser), not in its amount.

Ends with the line ``unified/classifier step time ratio: R`` (for the unified step as configured).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.profiling import flop_breakdown  # noqa: E402
from benchmarks.timing import describe_device, interleaved_medians, step_timing_parser, sync  # noqa: E402
from common.model import build_model, model_preset  # noqa: E402
from common.train import LocalTrainer, TrainConfig  # noqa: E402
from common.train.augment import diff_augment  # noqa: E402


class ClassifierOnly:
    """The same trunk and head trained as a plain classifier (no GAN), same optimisers and input."""

    def __init__(self, preset: str, num_classes: int, device: torch.device) -> None:
        self.model = build_model(model_preset(preset), num_classes, seed=0).to(device)
        self.cfg = TrainConfig()
        o = self.cfg.optim
        self.opt_trunk = torch.optim.Adam(self.model.discriminator.parameters(), lr=o.lr_discriminator, betas=o.gan_betas)
        self.opt_head = torch.optim.AdamW(self.model.classifier.parameters(), lr=o.lr_classifier)
        self.rng = torch.Generator().manual_seed(0)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        logits = self.model.classify(diff_augment(images, self.cfg.augment, self.rng))
        loss = F.cross_entropy(logits, labels)
        self.opt_trunk.zero_grad(set_to_none=True)
        self.opt_head.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_trunk.step()
        self.opt_head.step()


def train_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as TrainConfig fields (values read as YAML: 16, null, same_pass, true)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in TrainConfig.__dataclass_fields__:
            raise SystemExit(f"--train {pair!r}: expected KEY=VALUE with KEY a train config field")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _make(kind: str, preset: str, num_classes: int, device: torch.device, overrides: dict[str, Any] | None = None):
    if kind == "classifier":
        return ClassifierOnly(preset, num_classes, device).step
    model = build_model(model_preset(preset), num_classes, seed=0)
    trainer = LocalTrainer(model, replace(TrainConfig(), **(overrides or {})), seed=0, device=device)
    trainer.global_step = trainer.cfg.selection.warmup_steps  # time the full step, selection active
    return trainer.unified_step


def _batch(preset: str, batch: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    size = model_preset(preset).image_size
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    return images, (torch.arange(batch) % num_classes).to(device)


def _peak_rss_child(kind: str, preset: str, batch: int, num_classes: int, steps: int, queue,
                    overrides: dict[str, Any]) -> None:
    torch.set_num_threads(torch.get_num_threads())
    device = torch.device("cpu")
    step = _make(kind, preset, num_classes, device, overrides)
    images, labels = _batch(preset, batch, num_classes, device)
    before = _current_rss_mib()
    highest = before
    for _ in range(steps):
        step(images, labels)
        highest = max(highest, _current_rss_mib())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB on Linux
    queue.put((peak, highest - before))


def _current_rss_mib() -> float:
    """Resident set size now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_mib(kind: str, preset: str, batch: int, num_classes: int, device: torch.device,
                    overrides: dict[str, Any]) -> tuple[float, float]:
    """(peak, growth during the steps) in MiB: CUDA allocations, or a fresh process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = _make(kind, preset, num_classes, device, overrides)
        images, labels = _batch(preset, batch, num_classes, device)
        before = torch.cuda.memory_allocated() / 2**20
        for _ in range(3):
            step(images, labels)
        sync(device)
        peak = torch.cuda.max_memory_allocated() / 2**20
        return peak, peak - before
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(kind, preset, batch, num_classes, 3, queue, overrides))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def main() -> None:
    parser = step_timing_parser(__doc__)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                        help="a train config field of the timed unified step (repeatable)")
    parser.add_argument("--with-default", action="store_true",
                        help="also time the unified step with the default train config, side by side")
    parser.add_argument("--flops", action="store_true",
                        help="after timing, count each kind's FLOPs per step by operator (torch.utils.flop_counter)")
    args = parser.parse_args()
    device = torch.device(args.device)
    overrides = train_overrides(args.train)
    configs = {"unified": overrides, "classifier": {}}
    if args.with_default:
        configs["default unified"] = {}

    steps = {kind: _make(kind.split()[-1], args.preset, args.num_classes, device, config)
             for kind, config in configs.items()}
    images, labels = _batch(args.preset, args.batch_size, args.num_classes, device)
    timed = interleaved_medians(steps, images, labels, warmup=args.warmup, timed=args.steps, block=args.block,
                                device=device)
    print(describe_device(device))
    print(f"preset: {args.preset}, batch: {args.batch_size}, timed steps each: {args.steps}, "
          f"unified step's train overrides: {overrides or 'none'}")
    for kind in ("classifier", "default unified", "unified"):
        if kind not in timed:
            continue
        median = timed[kind]
        peak, growth = peak_memory_mib(kind.split()[-1], args.preset, args.batch_size, args.num_classes, device,
                                       configs[kind])
        label = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB (own process)"
        print(f"{kind:>15} step: median {median * 1e3:8.2f} ms, {args.batch_size / median:9.1f} real images/s, "
              f"{label}: {peak:.0f}, growth over the steps: {growth:.1f}")
    if args.flops:
        counts = {kind: flop_breakdown(step, images, labels) for kind, step in steps.items()}
        for kind, by_op in counts.items():
            ops = ", ".join(f"{op} {flops / 1e9:.3f}" for op, flops in sorted(by_op.items(), key=lambda kv: -kv[1]))
            print(f"{kind:>15} FLOPs per step: {sum(by_op.values()) / 1e9:.3f} G ({ops})")
        print(f"unified/classifier FLOP ratio: {sum(counts['unified'].values()) / sum(counts['classifier'].values()):.3f}")
    if args.with_default:
        print(f"default unified/classifier step time ratio: {timed['default unified'] / timed['classifier']:.2f}")
    print(f"unified/classifier step time ratio: {timed['unified'] / timed['classifier']:.2f}")


if __name__ == "__main__":
    main()
