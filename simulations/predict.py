"""``fedvitgan predict RUN_OR_CHECKPOINT PATH... --out predictions.csv``: classify image files.

Runs the run's global classifier (its latest round, or ``--round N``) on image files and folders
(searched recursively for .png .jpg .jpeg .tif .tiff .bmp), each resized and normalised as in
training, in batches. Writes a CSV with one row per image: ``path``, ``predicted_class``, then one
probability column per class (``p_<class>``, summing to 1). A file that cannot be read is named on
stderr and left out of the CSV; the others are still written, and the exit status is then 2.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from common.data.errors import DataError
from common.data.images import IMAGE_SUFFIXES
from common.device import resolve_device
from common.progress import Progress
from simulations.run_folder import RunFolderError
from simulations.run_model import RunModel, image_tensor, load_run_model, run_command_parser

EXIT_BAD_INPUT = 2


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Image files named or found (recursively, sorted, hidden ones skipped) under ``paths``, each once."""
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            for folder, subfolders, files in os.walk(path):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                found += [Path(folder) / f for f in sorted(files)
                          if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
        else:
            raise DataError(f"{path} does not exist; expected an image file or a folder of images")
    return list(dict.fromkeys(found))


def _batches(files: Sequence[Path], size: int, image_size: int, failed: list[str]
             ) -> Iterator[tuple[list[Path], torch.Tensor | None, int]]:
    """(readable files, their tensors or None, files consumed) per batch of ``size`` files."""
    for start in range(0, len(files), size):
        chunk = files[start:start + size]
        kept, tensors = [], []
        for path in chunk:
            try:
                tensors.append(image_tensor(path, image_size))
                kept.append(path)
            except DataError as error:  # the decoder's own reason (the message's advice is for training)
                failed.append(f"{path}: {error.__cause__ or error}")
        yield kept, torch.stack(tensors) if tensors else None, len(chunk)


@torch.no_grad()
def predict_files(run: RunModel, files: Sequence[Path], out: Path, batch_size: int = 64, device: str = "cpu",
                  progress: Progress | None = None) -> tuple[int, list[str]]:
    """Write the predictions CSV for ``files``; returns (rows written, messages of unreadable files)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    written = done = 0
    model = run.model.to(device)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "predicted_class", *(f"p_{name}" for name in run.class_names)])
        for kept, images, consumed in _batches(files, batch_size, run.image_size, failed):
            if images is not None:
                probs = torch.softmax(model.classify(images.to(device)).float(), dim=1).cpu()
                for path, row in zip(kept, probs.tolist()):
                    best = max(range(len(row)), key=row.__getitem__)
                    writer.writerow([str(path), run.class_names[best], *(f"{p:.6f}" for p in row)])
                written += len(kept)
            done += consumed
            if progress is not None:
                progress.update(done)
    tmp.replace(out)
    return written, failed


def main(argv: list[str]) -> int:
    parser = run_command_parser("fedvitgan predict", __doc__, [
        "fedvitgan predict runs/demo /data/new-patches --out predictions.csv",
        "fedvitgan predict runs/demo/checkpoints/round-0003.safetensors a.png b.tif"])
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write (default: predictions.csv)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    try:
        files = find_images(args.paths)
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(map(str, args.paths))}")
        run = load_run_model(args.run, args.round)
    except (DataError, RunFolderError) as error:
        print(f"fedvitgan predict: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    progress = Progress(f"predict ({run.checkpoint.run_dir.name}, round {run.checkpoint.round})", len(files),
                        "images", every_s=10.0)
    written, failed = predict_files(run, files, args.out, args.batch_size, resolve_device(args.device), progress)
    print(f"{written} predictions of {len(run.class_names)} classes -> {args.out}")
    for message in failed:
        print(f"fedvitgan predict: skipped: {message}", file=sys.stderr)
    if failed:
        print(f"fedvitgan predict: {len(failed)} of {len(files)} files could not be read (named above)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
