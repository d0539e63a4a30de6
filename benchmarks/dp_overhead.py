"""DP-SGD overhead of the unified step: no DP vs DP on the classifier head vs DP on the discriminator
(with book-keeping clipping, the default, and with torch.func per-sample gradients, ``vmap``).

All three run interleaved in one process (alternating blocks, so drift in machine load hits each),
on the same preset, batch and input, and each is timed per step; the medians are compared. The DP
steps use the real mechanism (``common/privacy``: per-sample gradients with torch.func, clipping,
Gaussian noise, accounting); the real batch has the expected size B on every step, so the three
do the same amount of work per step (Poisson batches only vary around B).

    python benchmarks/dp_overhead.py [--preset tiny] [--batch-size 32] [--steps 40]

Ends with the lines ``dp-discriminator/no-dp step time ratio: R`` (target: <= 1.1) and
``dp-head/no-dp step time ratio: R`` (target: <= 1.3). Every kind uses the default training config
(``train.generated_batch_size`` generated images per step, DP or not). ``--flops`` also counts
each kind's FLOPs per step by operator: where the time ratio exceeds the FLOP ratio, the extra time
is in how the work runs (batched per-example products, memory-bound passes), not in its amount.

``--bookkeeping-baseline FILE`` times one more kind beside them: scope=discriminator with the
``Bookkeeping`` class of FILE, e.g. an earlier commit's (``git show REV:common/privacy/bookkeeping.py
> FILE``), so that a change to book-keeping is measured against the code before it in one run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import MethodType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.profiling import flop_breakdown, profile_kind, sync_points  # noqa: E402
from benchmarks.timing import describe_device, interleaved_medians, step_timing_parser  # noqa: E402
from common.model import build_model, model_preset  # noqa: E402
from common.privacy.accounting import build_plan  # noqa: E402
from common.privacy.budget import private_train_config  # noqa: E402
from common.privacy.config import PrivacyConfig  # noqa: E402
from common.privacy.wiring import DPTraining  # noqa: E402
from common.train import LocalTrainer, TrainConfig  # noqa: E402

#: kind -> (privacy.scope, privacy.clipping); None: no DP.
KINDS: dict[str, tuple[str, str] | None] = {
    "no-dp": None,
    "dp-head": ("classifier", "bookkeeping"),
    "dp-discriminator": ("discriminator", "bookkeeping"),
    "dp-discriminator-vmap": ("discriminator", "vmap"),
}


def _make(kind: tuple[str, str] | None, preset: str, batch: int, num_classes: int, device: torch.device,
          host_memory: str = "retain"):
    model = build_model(model_preset(preset), num_classes, seed=0)
    cfg = TrainConfig(batch_size=batch, host_memory=host_memory)
    dp = None
    if kind is not None:
        scope, clipping = kind
        pcfg = PrivacyConfig(enabled=True, scope=scope, clipping=clipping)
        cfg = private_train_config(cfg, pcfg)
        plan = build_plan(pcfg, num_examples=100 * batch, num_labelled=100 * batch, batch_size=batch,
                          steps_per_round=cfg.local_steps, planned_rounds=1)
        dp = DPTraining(model, plan, seed=0)
    trainer = LocalTrainer(model, cfg, seed=0, device=device, privacy=dp)
    trainer.global_step = trainer.cfg.selection.warmup_steps  # time the full step, selection active
    return trainer.unified_step


def _with_bookkeeping_from(step: MethodType, path: Path) -> MethodType:
    """``step`` (a trainer's scope=discriminator ``unified_step``) with its Bookkeeping replaced by
    the class of the file ``path``."""
    spec = importlib.util.spec_from_file_location("bookkeeping_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    dp = step.__self__.privacy
    dp.bookkeeping = module.Bookkeeping(dp.adapter, dp.names, getattr(dp.adapter, "broadcast_parameters", ()))
    return step


def main() -> None:
    parser = step_timing_parser(__doc__)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--host-memory", choices=("retain", "release"), default="retain",
                        help="train.host_memory for every kind (process-wide; default: retain, the default)")
    parser.add_argument("--sync-points", action="store_true",
                        help="after timing, list where one step of each kind makes the host wait for the GPU")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many steps of each kind after timing (GPU: busy share, top kernels)")
    parser.add_argument("--flops", action="store_true",
                        help="after timing, count each kind's FLOPs per step by operator (torch.utils.flop_counter)")
    parser.add_argument("--bookkeeping-baseline", type=Path, metavar="FILE",
                        help="also time scope=discriminator with the Bookkeeping class of FILE (an earlier "
                             "common/privacy/bookkeeping.py), side by side")
    args = parser.parse_args()
    if args.bookkeeping_baseline is not None and not args.bookkeeping_baseline.is_file():
        parser.error(f"--bookkeeping-baseline: no such file {args.bookkeeping_baseline}")
    device = torch.device(args.device)

    steps = {kind: _make(spec, args.preset, args.batch_size, args.num_classes, device, args.host_memory)
             for kind, spec in KINDS.items()}
    if args.bookkeeping_baseline is not None:
        steps["dp-discriminator-baseline"] = _with_bookkeeping_from(
            _make(KINDS["dp-discriminator"], args.preset, args.batch_size, args.num_classes, device, args.host_memory),
            args.bookkeeping_baseline)
    gen = torch.Generator().manual_seed(0)
    size = model_preset(args.preset).image_size
    images = (torch.rand(args.batch_size, 3, size, size, generator=gen) * 2 - 1).to(device)
    labels = torch.arange(args.batch_size) % args.num_classes  # on the host, as a data loader yields them
    if device.type == "cuda":
        labels = labels.pin_memory()
    medians = interleaved_medians(steps, images, labels, warmup=args.warmup, timed=args.steps, block=args.block,
                                  device=device)
    width = max(map(len, steps))
    print(describe_device(device))
    print(f"preset: {args.preset}, batch: {args.batch_size}, timed steps each: {args.steps}, blocks of {args.block}, "
          f"train.host_memory: {args.host_memory}")
    for kind, median in medians.items():
        print(f"{kind:>{width}} step: median {median * 1e3:8.2f} ms, {args.batch_size / median:9.1f} real images/s")
    if args.sync_points:
        for kind, step in steps.items():
            sync_points(kind, step, images, labels)
    if args.flops:
        counts = {kind: flop_breakdown(step, images, labels) for kind, step in steps.items()}
        for kind, by_op in counts.items():
            ops = ", ".join(f"{op} {f / 1e9:.3f}" for op, f in sorted(by_op.items(), key=lambda kv: -kv[1]))
            print(f"{kind:>{width}} FLOPs per step: {sum(by_op.values()) / 1e9:.3f} G ({ops})")
        for kind in counts:
            if kind != "no-dp":
                print(f"{kind}/no-dp FLOP ratio: {sum(counts[kind].values()) / sum(counts['no-dp'].values()):.3f}")
    if args.profile:
        for kind, step in steps.items():
            profile_kind(kind, step, images, labels, device, args.profile)
    if "dp-discriminator-baseline" in medians:
        print(f"dp-discriminator-baseline/no-dp step time ratio: "
              f"{medians['dp-discriminator-baseline'] / medians['no-dp']:.3f}")
        print(f"dp-discriminator/dp-discriminator-baseline step time ratio: "
              f"{medians['dp-discriminator'] / medians['dp-discriminator-baseline']:.3f}")
    print(f"dp-discriminator-vmap/no-dp step time ratio: {medians['dp-discriminator-vmap'] / medians['no-dp']:.2f}")
    print(f"dp-discriminator/no-dp step time ratio: {medians['dp-discriminator'] / medians['no-dp']:.2f}")
    print(f"dp-head/no-dp step time ratio: {medians['dp-head'] / medians['no-dp']:.2f}")


if __name__ == "__main__":
    main()
