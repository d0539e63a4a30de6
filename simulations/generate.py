"""``fedvitgan generate RUN --per-class N --out DIR [--selected-only]``: a synthetic data set.

Draws N patches of every class from the run's global generator (its latest round, or ``--round``)
and writes them as an ImageFolder, ``DIR/<class>/<class>-NNNNNN.png`` (the model's image size), plus
``DIR/provenance.json``: the run, round, checkpoint, seed, counts per class, the selection applied,
and what privacy covers the generator (differentially private by post-processing only when the run
used ``privacy.scope=discriminator``, with each hospital's epsilon; otherwise "no formal privacy
guarantee").

``--selected-only`` keeps only the generated patches the run's classifier accepts the way the
run's sample selection does: the global classifier's probability of the intended class must reach
``train.selection.confidence_threshold`` (or ``--threshold``). The other half of the training-time
rule, the distance to each class's centroid of real features, needs real-patch statistics that
stay at the hospitals, so it is not applied here. Patches are drawn until N are accepted or
``--max-draws`` per class is reached; a class left short is named, and the exit status is then 1.
The same seed gives the same images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common.data.base import tensor_to_uint8
from common.device import resolve_device
from common.progress import Progress
from common.train.config import TrainConfig
from simulations.privacy_statement import privacy_statement
from simulations.run_folder import RunFolderError
from simulations.run_model import RunModel, load_run_model, run_command_parser

EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 1
PROVENANCE = "provenance.json"


@dataclass
class ClassCount:
    """What generating one class took."""

    drawn: int = 0
    accepted: int = 0
    written: int = 0


def confidence_threshold(run: RunModel, given: float | None) -> float:
    """``--threshold``, else the run's ``train.selection.confidence_threshold``."""
    if given is not None:
        return float(given)
    selection = ((run.config.get("train") or {}).get("selection") or {})
    # a run folder older than the key: the default (TrainConfig's equals conf/train/default.yaml, tested)
    return float(selection.get("confidence_threshold", TrainConfig().selection.confidence_threshold))


@torch.no_grad()
def generate_class(run: RunModel, label: int, count: int, noise: torch.Generator, batch_size: int, device: str,
                   threshold: float | None, max_draws: int) -> tuple[torch.Tensor, ClassCount]:
    """Up to ``count`` images of class ``label`` (in [-1, 1]); with ``threshold`` only those the global
    classifier gives at least that probability of ``label``."""
    tally = ClassCount()
    kept: list[torch.Tensor] = []
    model = run.model
    while tally.accepted < count and tally.drawn < max_draws:
        n = min(batch_size, max_draws - tally.drawn) if threshold is not None else min(batch_size, count - tally.accepted)
        labels = torch.full((n,), label, dtype=torch.long, device=device)
        z = torch.randn(n, model.cfg.z_dim, generator=noise).to(device)
        images = model.generator(z, labels)
        tally.drawn += n
        if threshold is not None:
            probs = torch.softmax(model.classify(images).float(), dim=1)[:, label]
            images = images[probs >= threshold]
        kept.append(images[: count - tally.accepted].cpu())
        tally.accepted += len(kept[-1])
    images = torch.cat(kept) if kept else torch.zeros(0, 3, run.image_size, run.image_size)
    return images, tally


def write_images(images: torch.Tensor, folder: Path, stem: str) -> int:
    """Save (N, 3, S, S) images in [-1, 1] as ``<folder>/<stem>-NNNNNN.png``; returns N."""
    if len(images):  # no empty class folder: ImageFolder readers refuse one
        folder.mkdir(parents=True, exist_ok=True)
    for k, array in enumerate(tensor_to_uint8(images)):
        Image.fromarray(array).save(folder / f"{stem}-{k:06d}.png")
    return len(images)


def provenance(run: RunModel, args: argparse.Namespace, threshold: float | None, counts: dict[str, ClassCount],
               seed: int) -> dict[str, Any]:
    """provenance.json's content."""
    checkpoint = run.checkpoint
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(checkpoint.run_dir),
        "round": checkpoint.round,
        "checkpoint": str(checkpoint.path),
        "seed": seed,
        "generator": "the run's global generator G(z, y), z ~ N(0, I) drawn from torch.Generator().manual_seed(seed), "
                     "classes in class_names order",
        "per_class": args.per_class,
        "image_size": run.image_size,
        "class_names": list(run.class_names),
        "layout": "<class>/<class>-NNNNNN.png (an ImageFolder: fedvitgan data check DIR --dataset imagefolder)",
        "selected_only": threshold is not None,
        "selection": None if threshold is None else {
            "rule": "kept when the global classifier's probability of the intended class is >= confidence_threshold "
                    "(the run's sample-selection confidence rule; the real-feature centroid rule stays at the hospitals "
                    "and is not applied)",
            "confidence_threshold": threshold, "max_draws_per_class": args.max_draws},
        "counts": {name: vars(c) for name, c in counts.items()},
        "privacy": privacy_statement(checkpoint.run_dir, "generator"),
    }


def main(argv: list[str]) -> int:
    parser = run_command_parser("fedvitgan generate", __doc__, [
        "fedvitgan generate runs/demo --per-class 500 --out synthetic/",
        "fedvitgan generate runs/demo --per-class 100 --selected-only --out selected/"])
    parser.add_argument("--per-class", type=int, required=True, metavar="N", help="patches to write per class")
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder for the ImageFolder")
    parser.add_argument("--selected-only", action="store_true",
                        help="keep only patches the global classifier accepts (the run's selection confidence rule)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="confidence needed with --selected-only (default: the run's train.selection.confidence_threshold)")
    parser.add_argument("--max-draws", type=int, default=None,
                        help="with --selected-only, patches drawn per class at most (default: 50 x N)")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's seed)")
    parser.add_argument("--batch-size", type=int, default=256, help="patches generated per forward pass (default: 256)")
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.batch_size < 1:
        parser.error("--per-class and --batch-size must be >= 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be in [0, 1]")
    args.max_draws = args.max_draws or 50 * args.per_class
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"fedvitgan generate: --out {args.out} exists and is not an empty folder; choose a new one", file=sys.stderr)
        return EXIT_BAD_INPUT
    device = resolve_device(args.device)
    try:
        run = load_run_model(args.run, args.round, device)
    except RunFolderError as error:
        print(f"fedvitgan generate: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args.out.mkdir(parents=True, exist_ok=True)
    seed = int(run.config.get("seed", 0)) if args.seed is None else args.seed
    threshold = confidence_threshold(run, args.threshold) if args.selected_only else None
    noise = torch.Generator().manual_seed(seed)
    counts: dict[str, ClassCount] = {}
    progress = Progress(f"generate ({run.checkpoint.run_dir.name}, round {run.checkpoint.round})",
                        len(run.class_names), "classes", every_s=10.0)
    for label, name in enumerate(run.class_names):
        images, counts[name] = generate_class(run, label, args.per_class, noise, args.batch_size, device, threshold,
                                              args.max_draws)
        counts[name].written = write_images(images, args.out / name, name)
        progress.update(label + 1)
    (args.out / PROVENANCE).write_text(json.dumps(provenance(run, args, threshold, counts, seed), indent=2))
    short = {name: c for name, c in counts.items() if c.written < args.per_class}
    print(f"{sum(c.written for c in counts.values())} patches of {len(counts)} classes -> {args.out} "
          f"(provenance: {args.out / PROVENANCE})")
    for name, c in short.items():
        print(f"fedvitgan generate: class {name!r}: only {c.written} of {args.per_class} generated patches passed the "
              f"selection (confidence >= {threshold:g}) in {c.drawn} draws; raise --max-draws, lower --threshold, "
              f"or use a later round", file=sys.stderr)
    return EXIT_INCOMPLETE if short else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
