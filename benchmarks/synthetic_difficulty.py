"""How hard is the synthetic histology set? Few labels vs many, same small classifier.

Trains the tiny preset's trunk + head as a plain classifier (no GAN) on 50 and on 1,000 labelled
patches per class of one synthetic hospital, the same number of steps each, and reports balanced
accuracy on 1,000 held-out patches. Run with and without DiffAugment (``--augment``).

    python benchmarks/synthetic_difficulty.py [--steps 1500] [--augment]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data.base import PatchSubset  # noqa: E402
from common.data.synthetic import SyntheticHistology  # noqa: E402
from common.evaluation import evaluate_classifier  # noqa: E402
from common.model import build_model, model_preset  # noqa: E402
from common.train import TrainConfig  # noqa: E402
from common.train.augment import diff_augment  # noqa: E402


def train_plain_classifier(per_class: int, steps: int, augment: bool, seed: int) -> float:
    pool = SyntheticHistology(5 * max(per_class, 1000), 32, site=0, split="train", seed=seed)
    rows = np.concatenate([np.flatnonzero(pool.labels == k)[:per_class] for k in range(5)])
    loader = DataLoader(PatchSubset(pool, rows), batch_size=32, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    test = DataLoader(SyntheticHistology(1000, 32, site=0, split="test", seed=seed), batch_size=250)
    model = build_model(model_preset("tiny"), 5, seed=seed)
    cfg = TrainConfig()
    opt_trunk = torch.optim.Adam(model.discriminator.trunk.parameters(), lr=cfg.optim.lr_discriminator,
                                 betas=cfg.optim.gan_betas)
    opt_head = torch.optim.AdamW(model.classifier.parameters(), lr=cfg.optim.lr_classifier)
    rng = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for images, labels in loader:
            if augment:
                images = diff_augment(images, cfg.augment, rng)
            loss = F.cross_entropy(model.classify(images), labels)
            opt_trunk.zero_grad()
            opt_head.zero_grad()
            loss.backward()
            opt_trunk.step()
            opt_head.step()
            done += 1
            if done == steps:
                break
    return evaluate_classifier(model, test)["balanced_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--augment", action="store_true", help="DiffAugment on the classifier's input")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    for per_class in (50, 1000):
        start = time.perf_counter()
        results[per_class] = train_plain_classifier(per_class, args.steps, args.augment, args.seed)
        print(f"{per_class:>5} labelled/class: balanced accuracy {results[per_class]:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"augment: {args.augment}, steps: {args.steps}, chance: 0.200")
    print(f"balanced accuracy 50/class: {results[50]:.3f}, 1000/class: {results[1000]:.3f}")


if __name__ == "__main__":
    main()
