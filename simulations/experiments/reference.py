"""Build the reference classifier behind the generator-quality figures (run once; the result ships).

    python -m simulations.experiments.reference [--steps 3000] [--out PATH]

Trains the tiny preset's trunk + head as a plain classifier on the *fully labelled* synthetic
histology set (3 hospitals' stains, 2,000 patches each, every label kept), then writes the trunk and
head to ``common/evaluation/reference_classifier.safetensors`` with their model config, class
count, held-out balanced accuracy and the command in the file's metadata. Its features are the fixed
space in which real and generated patches are compared; it never changes between experiments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from common.data.base import ConcatPatches
from common.data.synthetic import CLASS_NAMES, SyntheticHistology
from common.evaluation import evaluate_classifier
from common.evaluation.frechet import REFERENCE_WEIGHTS
from common.model import build_model, model_preset
from common.train.augment import AugmentConfig, diff_augment


def train_reference(steps: int, seed: int = 12345) -> tuple[torch.nn.Module, float]:
    """The reference trunk + head and its held-out balanced accuracy."""
    train = ConcatPatches([SyntheticHistology(2000, 32, site=s, split="train", seed=seed) for s in range(3)])
    test = ConcatPatches([SyntheticHistology(500, 32, site=s, split="test", seed=seed) for s in range(3)])
    model = build_model(model_preset("tiny"), len(CLASS_NAMES), seed=seed)
    params = list(model.discriminator.trunk.parameters()) + list(model.classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))
    augment, rng, done = AugmentConfig(color=False, translation=0.0, cutout=0.0), torch.Generator().manual_seed(seed), 0
    while done < steps:
        for images, labels in loader:
            loss = F.cross_entropy(model.classify(diff_augment(images, augment, rng)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done % 500 == 0:
                print(f"step {done}/{steps}: loss {float(loss):.3f}", flush=True)
            if done == steps:
                break
    accuracy = evaluate_classifier(model, DataLoader(test, batch_size=256))["balanced_accuracy"]
    return model, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=REFERENCE_WEIGHTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, accuracy = train_reference(args.steps)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k.startswith(("discriminator.trunk.", "classifier."))}
    meta = {"model": json.dumps(dataclasses.asdict(model.cfg)), "num_classes": str(model.num_classes),
            "class_names": json.dumps(CLASS_NAMES), "balanced_accuracy": f"{accuracy:.4f}",
            "command": f"python -m simulations.experiments.reference --steps {args.steps}",
            "built": time.strftime("%Y-%m-%d")}
    save_file(state, str(args.out), metadata=meta)
    print(f"reference classifier: held-out balanced accuracy {accuracy:.3f}, {time.perf_counter() - start:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
