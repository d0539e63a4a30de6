"""``fedvitgan prior --out FILE``: a trunk prior learnt from random-process images, for model.trunk_prior.

The discriminator trunk of a model preset is trained with SimCLR on coloured 1/f noise and
dead-leaves images drawn afresh every step (``common/model/prior``). No patient image is read and
nothing is downloaded, so the file is public: a run that starts from it (``model.trunk_prior=FILE``)
spends no privacy on it, and the coordinator's copy is all a federation needs (the hospitals receive
the first global weights from it). The same preset, settings and seed give the same file on the
same install. ``FILE.json`` records how it was made.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.config import ConfigError
from common.model import model_preset, preset_names
from common.model.prior.pretrain import PriorConfig, pretrain_trunk, prior_config
from common.progress import Progress


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvitgan prior",
        description="Learn a trunk prior from random-process images (no patient data, no download) and write it "
                    "as a safetensors file for model.trunk_prior. Settings: conf/prior.yaml.")
    parser.add_argument("--out", required=True, type=Path, help="the safetensors file to write")
    parser.add_argument("--model", default="tiny", choices=preset_names(), help="model preset (default: tiny)")
    parser.add_argument("--steps", type=int, help="contrastive steps (default: conf/prior.yaml)")
    parser.add_argument("--seed", type=int, help="seed of the images, views and initial weights")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return parser


def write_prior(out: Path, preset: str, cfg: PriorConfig, progress_mode: str = "auto") -> dict[str, object]:
    """Learn the prior for ``preset`` under ``cfg``, write ``out`` and ``out.json``; returns the record."""
    model_cfg = model_preset(preset)
    progress = Progress("trunk prior", cfg.steps, mode=progress_mode)
    losses: list[float] = []

    def report(step: int, loss: float) -> None:
        losses.append(loss)
        progress.update(step, {"loss": loss})

    started = time.perf_counter()
    weights = pretrain_trunk(model_cfg, cfg, report)
    progress.close()
    record = {"model": preset, "prior": asdict(cfg), "seconds": round(time.perf_counter() - started, 1),
              "first_loss": losses[0], "last_loss": sum(losses[-50:]) / len(losses[-50:]),
              "torch": torch.__version__, "keys": len(weights),
              "data": "random-process images only (coloured 1/f noise and dead leaves); no patient image"}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"fedvitgan": json.dumps(record)})
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {key: value for key, value in (("steps", args.steps), ("seed", args.seed)) if value is not None}
    try:
        cfg = prior_config(overrides)
        if cfg.steps < 1 or cfg.batch_size < 2:
            raise ConfigError("prior: steps must be >= 1 and batch_size >= 2")
    except ConfigError as error:
        print(f"fedvitgan prior: {error}", file=sys.stderr)
        return 2
    record = write_prior(args.out, args.model, cfg)
    print(f"trunk prior: {args.out} ({args.model} preset, {cfg.steps} steps, {record['seconds']:.0f} s, "
          f"contrastive loss {record['first_loss']:.2f} -> {record['last_loss']:.2f})\n"
          f"use it with model.trunk_prior={args.out}")
    return 0
