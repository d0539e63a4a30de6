"""``fedvitgan export RUN --out DIR``: the deployable classifier, loadable without this project.

Writes into DIR:

- ``classifier.pt2``: a ``torch.export`` program of the global classifier (discriminator trunk +
  classification head; the generator is left out). Input: float32 RGB images, NCHW, values in
  [0, 1], ``image_size`` pixels square, any batch size; output: class logits (N, classes). The
  scaling to the model's [-1, 1] happens inside the program.
- ``model.json``: class names (in logit order), image size, the preprocessing to apply before the
  program, the run and round it comes from, and its privacy statement.

Load it anywhere with PyTorch alone::

    program = torch.export.load("classifier.pt2").module()
    logits = program(images)          # images: (N, 3, S, S) float32 in [0, 1]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.model import UnifiedViTGAN
from simulations.privacy_statement import privacy_statement
from simulations.run_folder import RunFolderError
from simulations.run_model import RunModel, load_run_model, run_command_parser

PROGRAM = "classifier.pt2"
MODEL_CARD = "model.json"
MAX_BATCH = 4096
PREPROCESSING = ("decode to RGB; centre-crop to the largest square; resize to image_size x image_size (PIL: "
                 "Image.reduce by the whole factor when the side is a multiple of image_size, else bilinear "
                 "resize); scale to float32 in [0, 1] (pixel / 255); layout NCHW")


class DeployedClassifier(nn.Module):
    """RGB images in [0, 1] -> class logits: the run's trunk and classification head, nothing else."""

    def __init__(self, model: UnifiedViTGAN) -> None:
        super().__init__()
        self.trunk = model.discriminator.trunk
        self.classifier = model.classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.trunk(images * 2.0 - 1.0))


def export_program(run: RunModel) -> torch.export.ExportedProgram:
    """The classifier as a ``torch.export`` program with a dynamic batch dimension (CPU)."""
    module = DeployedClassifier(run.model).cpu().eval()
    example = torch.rand(2, 3, run.image_size, run.image_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def model_card(run: RunModel) -> dict[str, Any]:
    """model.json's content."""
    checkpoint = run.checkpoint
    return {
        "format": "torch.export program (torch.export.load(path).module())",
        "file": PROGRAM,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
        "task": "histopathology patch classification",
        "class_names": list(run.class_names),
        "output": "logits (N, classes) in class_names order; softmax gives probabilities",
        "input": {"shape": ["N", 3, run.image_size, run.image_size], "dtype": "float32", "channels": "RGB",
                  "range": [0.0, 1.0], "batch": [1, MAX_BATCH]},
        "image_size": run.image_size,
        "preprocessing": PREPROCESSING,
        "normalisation": {"inside_program": "x * 2 - 1 (the model's [-1, 1] range)", "mean": [0.5, 0.5, 0.5],
                          "std": [0.5, 0.5, 0.5], "apply_before_program": "none beyond scaling to [0, 1]"},
        "run": str(checkpoint.run_dir),
        "round": checkpoint.round,
        "checkpoint": str(checkpoint.path),
        "model": dict(checkpoint.config.get("model") or {}),
        "data": {k: (checkpoint.config.get("data") or {}).get(k) for k in ("name", "root")},
        "privacy": privacy_statement(checkpoint.run_dir, "classifier"),
    }


def export_classifier(run: RunModel, out: Path) -> dict[str, Path]:
    """Write classifier.pt2 and model.json into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"program": out / PROGRAM, "card": out / MODEL_CARD}
    torch.export.save(export_program(run), str(paths["program"]))
    paths["card"].write_text(json.dumps(model_card(run), indent=2))
    return paths


def main(argv: list[str]) -> int:
    parser = run_command_parser("fedvitgan export", __doc__, ["fedvitgan export runs/demo --out deploy/",
                                                             "fedvitgan export runs/demo --round 3 --out deploy-r3/"],
                                device=False)
    parser.add_argument("--out", type=Path, required=True, help="folder for classifier.pt2 and model.json")
    args = parser.parse_args(argv)
    try:
        run = load_run_model(args.run, args.round)
        paths = export_classifier(run, args.out)
    except RunFolderError as error:
        print(f"fedvitgan export: {error}", file=sys.stderr)
        return 2
    print(f"exported the classifier of {run.checkpoint.run_dir} after round {run.checkpoint.round} "
          f"({len(run.class_names)} classes, {run.image_size} px):")
    for path in paths.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
