"""Images per second, peak GPU memory and model FLOP utilisation of the unified and classifier steps.

Both steps are the trainer's own (``common.train.LocalTrainer``): ``method=unified`` and
``method=supervised`` (the same trunk and head trained as a plain classifier), on the same batch of
real images, with the speed switches under test (``train.amp``, ``train.compile``). They run
interleaved in blocks after warm-up steps (which include compilation). FLOPs per step are counted
once per kind with ``torch.utils.flop_counter.FlopCounterMode`` on an eager copy of the same
trainer (matrix products, convolutions and attention, forward and backward); model FLOP utilisation
(MFU) is FLOPs per step / median step time / the card's peak, which you give with ``--peak-tflops``
(dense bf16: 989 for an H100 SXM or H200; the FP32 peak when ``--amp none``).

    python benchmarks/gpu_throughput.py --preset base --peak-tflops 989
    python benchmarks/gpu_throughput.py --preset tiny --device cpu --steps 3   # the CPU path (amp, compile off)

The real images sit on the device (data already loaded); the labels stay on the host, as a data
loader yields them, so the step's masks need no wait for the GPU. ``--profile`` adds, per kind, how
much of a step's wall time the GPU spends in kernels and which kernels take it (``torch.profiler``).

Ends with ``unified MFU: M % (F TFLOP/s of P)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.profiling import profile_kind, sync_points  # noqa: E402
from benchmarks.timing import describe_device, interleaved_medians, step_timing_parser, sync  # noqa: E402
from common.model import build_model, model_preset  # noqa: E402
from common.train import LocalTrainer, TrainConfig  # noqa: E402

NUM_CLASSES = 5
KINDS = ("classifier", "unified")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = step_timing_parser(__doc__)
    parser.set_defaults(preset="base", batch_size=128, steps=20, warmup=10)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--amp", choices=("none", "bf16"), default="bf16" if on_gpu else "none",
                        help="train.amp (default: bf16 on a GPU, none on the CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=on_gpu,
                        help="train.compile (default: on with a GPU, off on the CPU)")
    parser.add_argument("--generator-update", choices=("after_discriminator", "same_pass"),
                        default="after_discriminator", help="train.generator_update of the unified step")
    parser.add_argument("--generated-batch-size", type=int, default=None,
                        help="generated images per unified step (default: half the real batch, the default's ratio)")
    parser.add_argument("--sync-points", action="store_true",
                        help="after timing, list where one step of each kind makes the host wait for the GPU")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many steps of each kind after timing: GPU busy share and top kernels")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's peak TFLOP/s for --amp's precision (dense bf16: 989 on an H100 SXM or "
                             "H200); without it MFU is not printed")
    return parser.parse_args(argv)


def _trainer(method: str, args: argparse.Namespace, device: torch.device, eager: bool = False) -> LocalTrainer:
    cfg = TrainConfig(method=method, batch_size=args.batch_size, generated_batch_size=_generated(args),
                      amp=args.amp, compile=args.compile and not eager, generator_update=args.generator_update)
    model = build_model(model_preset(args.preset), NUM_CLASSES, seed=0)
    trainer = LocalTrainer(model, cfg, seed=0, device=device)
    trainer.global_step = cfg.selection.warmup_steps  # the full step: selection active
    return trainer


def _generated(args: argparse.Namespace) -> int:
    return args.generated_batch_size or max(1, args.batch_size // 2)


def _batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    size = model_preset(args.preset).image_size
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch_size, 3, size, size, generator=gen) * 2 - 1).to(device)
    labels = torch.arange(args.batch_size) % NUM_CLASSES
    return images, labels.pin_memory() if device.type == "cuda" else labels


def flops_per_step(trainer: LocalTrainer, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one step (forward and backward), counted on an eager trainer after one untimed step:
    (all, those of attention)."""
    trainer.step(images, labels)
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(images, labels)
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(f for op, f in by_op.items() if "attention" in str(op))
    return int(counter.get_total_flops()), int(attention)


def peak_memory_gib(step, images: torch.Tensor, labels: torch.Tensor, device: torch.device, steps: int = 3) -> float:
    """Peak GPU memory allocated over a few steps of one kind alone (0 on the CPU)."""
    if device.type != "cuda":
        return 0.0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step(images, labels)
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _print_ceiling(kind: str, families: dict[str, float], flops: int, attention: int, peak: float | None) -> None:
    """What the matrix-product and attention kernels achieve alone, and the MFU if nothing else ran."""
    products_ms, attention_ms = families.get("matrix products", 0.0), families.get("attention", 0.0)
    if products_ms <= 0 or attention_ms <= 0:
        return
    line = (f"  {kind}: matrix products {(flops - attention) / products_ms / 1e9:.0f} TFLOP/s, attention "
            f"{attention / attention_ms / 1e9:.0f} TFLOP/s")
    if peak:
        ceiling = 100.0 * flops / ((products_ms + attention_ms) / 1e3) / 1e12 / peak
        line += f"; MFU if only these kernels ran: {ceiling:.1f} %"
    print(line)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images, labels = _batch(args, device)
    print(describe_device(device))
    print(f"preset: {args.preset}, batch: {args.batch_size} real (+{_generated(args)} generated in the unified step), "
          f"amp: {args.amp}, compile: {args.compile}, generator_update: {args.generator_update}, "
          f"timed steps each: {args.steps}", flush=True)
    flops, attention_flops = {}, {}
    for kind in KINDS:
        eager = _trainer("supervised" if kind == "classifier" else "unified", args, device, eager=True)
        flops[kind], attention_flops[kind] = flops_per_step(eager, images, labels)
        del eager
    trainers = {kind: _trainer("supervised" if kind == "classifier" else "unified", args, device) for kind in KINDS}
    steps = {kind: trainer.step for kind, trainer in trainers.items()}
    medians = interleaved_medians(steps, images, labels, warmup=args.warmup, timed=args.steps, block=args.block,
                                  device=device)
    mfu = {}
    for kind in KINDS:
        memory = peak_memory_gib(steps[kind], images, labels, device)
        achieved = flops[kind] / medians[kind] / 1e12
        line = (f"{kind:>10} step: median {medians[kind] * 1e3:9.2f} ms, {args.batch_size / medians[kind]:9.1f} real "
                f"images/s, {flops[kind] / 1e12:7.3f} TFLOP/step, {achieved:8.2f} TFLOP/s, peak memory {memory:6.2f} GiB")
        if args.peak_tflops:
            mfu[kind] = 100.0 * achieved / args.peak_tflops
            line += f", MFU {mfu[kind]:5.1f} %"
        print(line, flush=True)
    if args.sync_points:
        for kind in KINDS:
            sync_points(kind, steps[kind], images, labels)
    if args.profile:
        for kind in KINDS:
            families = profile_kind(kind, steps[kind], images, labels, device, args.profile)
            _print_ceiling(kind, families, flops[kind], attention_flops[kind], args.peak_tflops)
    print(f"unified/classifier step time ratio: {medians['unified'] / medians['classifier']:.2f}")
    if args.peak_tflops:
        achieved = flops["unified"] / medians["unified"] / 1e12
        print(f"unified MFU: {mfu['unified']:.1f} % ({achieved:.1f} TFLOP/s of {args.peak_tflops:g})")
    else:
        print("unified MFU: not computed (give --peak-tflops)")


if __name__ == "__main__":
    main()
