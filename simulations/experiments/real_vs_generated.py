"""A figure of a run's generated images beside real ones, class by class (for docs and reports).

    python -m simulations.experiments.real_vs_generated RUN REAL_ROOT --out FIGURE.png [--per-class 8]

RUN is a run folder (its last complete round) or a checkpoint file; REAL_ROOT is an ImageFolder
(``REAL_ROOT/<class>/<image>``) with the run's class names, e.g. the fetched digits. Each class gets
one row: ``per_class`` real images (the first files in name order), then ``per_class`` images from
the global generator with fixed noise, at the model's image size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common.data.base import tensor_to_uint8
from common.data.images import IMAGE_SUFFIXES
from common.evaluation.grids import class_grid
from simulations.run_model import image_tensor, load_run_model


def real_rows(root: Path, class_names: tuple[str, ...], per_class: int, image_size: int) -> np.ndarray:
    """(classes, per_class, S, S, 3) uint8: the first ``per_class`` images of each class folder."""
    rows = []
    for name in class_names:
        folder = root / name
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:per_class]
        if len(files) < per_class:
            raise SystemExit(f"{folder}: {len(files)} images, need {per_class} (is it the run's data set?)")
        rows.append(tensor_to_uint8(torch.stack([image_tensor(p, image_size) for p in files])))
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder or checkpoint file")
    parser.add_argument("real_root", type=Path, help="ImageFolder of real images with the run's classes")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the generator's noise")
    args = parser.parse_args(argv)
    run = load_run_model(args.run)
    real = real_rows(args.real_root, run.class_names, args.per_class, run.image_size)
    labels = torch.arange(len(run.class_names)).repeat_interleave(args.per_class)
    with torch.no_grad():
        fake = run.model.generate(labels, torch.Generator().manual_seed(args.seed))
    fake = tensor_to_uint8(fake).reshape(len(run.class_names), args.per_class, *real.shape[2:])
    grid = np.concatenate([real, fake], axis=1)
    title = (f"left {args.per_class}: real; right {args.per_class}: generated "
             f"({run.checkpoint.run_dir.name}, round {run.checkpoint.round})")
    print(class_grid(grid, run.class_names, args.out, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
