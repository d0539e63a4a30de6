"""Cost of counting every DP step in the privacy ledger: a DP unified step with and without its
ledger record (a locked, fsynced append before the step's noise is drawn).

Both run interleaved in one process (alternating blocks), on the same preset, batch and input; the
ledger lives in a temporary folder on the file system given by ``--folder`` (default: the system's
temporary folder; pass the hospital's real state disk to measure that one).

    python benchmarks/ledger_overhead.py [--preset tiny] [--batch-size 32] [--steps 40] [--folder DIR]

Ends with the line ``dp-step+ledger/dp-step time ratio: R``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import describe_device, interleaved_medians, step_timing_parser  # noqa: E402
from common.model import build_model, model_preset  # noqa: E402
from common.privacy.accounting import build_plan  # noqa: E402
from common.privacy.budget import private_train_config  # noqa: E402
from common.privacy.config import PrivacyConfig  # noqa: E402
from common.privacy.ledger import SGD, PrivacyLedger  # noqa: E402
from common.privacy.wiring import DPTraining  # noqa: E402
from common.train import LocalTrainer, TrainConfig  # noqa: E402


def _make(preset: str, batch: int, num_classes: int, device: torch.device, ledger: PrivacyLedger | None):
    model = build_model(model_preset(preset), num_classes, seed=0)
    pcfg = PrivacyConfig(enabled=True, scope="classifier")
    cfg = private_train_config(TrainConfig(batch_size=batch), pcfg)
    plan = build_plan(pcfg, num_examples=100 * batch, num_labelled=100 * batch, batch_size=batch,
                      steps_per_round=cfg.local_steps, planned_rounds=1)
    on_step = None
    if ledger is not None:
        attempt = ledger.begin("benchmark", {}, SGD, "benchmark", 1, plan.noise_multiplier, plan.sample_rate, 10 ** 6)
        on_step = lambda step: ledger.step(attempt, step)  # noqa: E731
    dp = DPTraining(model, plan, seed=0, on_step=on_step)
    trainer = LocalTrainer(model, cfg, seed=0, device=device, privacy=dp)
    return trainer.unified_step


def main() -> None:
    parser = step_timing_parser(__doc__)
    parser.add_argument("--folder", type=Path, default=None, help="where the ledger is written (default: a temp folder)")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        ledger = PrivacyLedger.in_folder(folder)
        steps = {"dp-step": _make(args.preset, args.batch_size, 5, device, None),
                 "dp-step+ledger": _make(args.preset, args.batch_size, 5, device, ledger)}
        size = model_preset(args.preset).image_size
        gen = torch.Generator().manual_seed(0)
        images = (torch.rand(args.batch_size, 3, size, size, generator=gen) * 2 - 1).to(device)
        labels = (torch.arange(args.batch_size) % 5).to(device)
        medians = interleaved_medians(steps, images, labels, warmup=args.warmup, timed=args.steps, block=args.block,
                                      device=device)
        records = ledger.load().records
    print(describe_device(device))
    print(f"preset: {args.preset}, batch: {args.batch_size}, timed steps each: {args.steps}, ledger in {folder} "
          f"({records} records written)")
    for kind, median in medians.items():
        print(f"{kind:>16} step: median {median * 1e3:8.2f} ms")
    print(f"ledger record per step: {(medians['dp-step+ledger'] - medians['dp-step']) * 1e3:.2f} ms (median difference)")
    print(f"dp-step+ledger/dp-step time ratio: {medians['dp-step+ledger'] / medians['dp-step']:.3f}")


if __name__ == "__main__":
    main()
