"""Class-by-sample grids of generated (or real) images, saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.base import tensor_to_uint8
from common.model import UnifiedViTGAN


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported when a grid is drawn (not by a
    hospital's process, which only imports this package for its metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_grid(images: np.ndarray, class_names: Sequence[str], path: Path | str, title: str = "") -> Path:
    """Save (classes, per_class, H, W, 3) uint8 images as a grid with one labelled row per class."""
    if images.ndim != 5 or images.shape[0] != len(class_names):
        raise ValueError(f"expected (classes={len(class_names)}, n, H, W, 3) images, got {images.shape}")
    rows, cols = images.shape[:2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 1.4, rows * 0.9 + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(class_names[r], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def save_generator_grid(
    model: UnifiedViTGAN,
    class_names: Sequence[str],
    path: Path | str,
    per_class: int = 8,
    seed: int = 0,
    title: str = "",
) -> Path:
    """Generate ``per_class`` images of every class with fixed noise and save the grid."""
    device = next(model.parameters()).device
    labels = torch.arange(model.num_classes).repeat_interleave(per_class).to(device)
    was_training = model.training
    model.eval()
    try:
        images = model.generate(labels, torch.Generator().manual_seed(seed))
    finally:
        model.train(was_training)
    array = tensor_to_uint8(images).reshape(model.num_classes, per_class, *images.shape[2:], 3)
    return class_grid(array, class_names, path, title)
