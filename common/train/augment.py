"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) with the data set's label-safe symmetries.

Applied to real and generated images alike before the discriminator, so gradients flow back to the
generator through every transform. Which flips and rotations keep an image's class is a property of
the data set (``data.symmetries``): all 8 symmetries of the square (``d4``) for histology patches,
left-right mirroring alone (``flips``) for upright scenes, none for digits or text (a rotated 6 is a
9). Colour, translation and cutout are DiffAugment's. All randomness comes from the
``torch.Generator`` passed in, so a hospital's run is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import defaults_from_conf, derived_field
from common.train.transfer import to_device

#: Label-safe symmetry groups a data set can declare (``data.symmetries``): the 8 symmetries of the
#: square, left-right mirroring alone, or none.
SYMMETRIES: tuple[str, ...] = ("d4", "flips", "none")


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "augment")
class AugmentConfig:
    """Which transforms run, and how strong they are (``conf/train/*.yaml``: ``augment``)."""

    enabled: bool
    color: bool
    translation: float  # max shift as a fraction of the side; 0 disables
    cutout: float  # side of the erased square as a fraction; 0 disables
    symmetries: str = derived_field("d4", "data.symmetries")  # d4 | flips | none: set by ``with_symmetries``, not by hand

    def __post_init__(self) -> None:
        if self.symmetries not in SYMMETRIES:
            raise ValueError(f"symmetries must be one of {SYMMETRIES}, got {self.symmetries!r}")


def _uniform(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return to_device(torch.rand(shape, generator=gen), like.device).to(like.dtype)


def _color(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_uniform((b, 1, 1, 1), gen, x) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform((b, 1, 1, 1), gen, x) * 2.0) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform((b, 1, 1, 1), gen, x) + 0.5) + mean  # contrast


def _translate(x: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    shift = (_uniform((b, 2), gen, x) * 2.0 - 1.0) * ratio * 2.0  # affine_grid units span 2
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _cutout(x: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    side_h, side_w = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    cy = (_uniform((b, 1, 1), gen, x) * h).floor()
    cx = (_uniform((b, 1, 1), gen, x) * w).floor()
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    inside = ((ys - cy).abs() < side_h / 2) & ((xs - cx).abs() < side_w / 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _flip_rotate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image gets one of the 8 symmetries of the square (dihedral group D4)."""
    choice = to_device(torch.randint(0, 8, (x.shape[0],), generator=gen), x.device)
    out = x
    flip = (choice >= 4).view(-1, 1, 1, 1)
    out = torch.where(flip, out.flip(-1), out)
    turns = choice % 4
    rotated = [torch.rot90(out, k, dims=(-2, -1)) for k in range(4)] if x.shape[-1] == x.shape[-2] else [out] * 4
    result = rotated[0]
    for k in range(1, 4):
        result = torch.where((turns == k).view(-1, 1, 1, 1), rotated[k], result)
    return result


def _mirror(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = to_device(torch.randint(0, 2, (x.shape[0],), generator=gen), x.device).bool().view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def diff_augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Augment a batch (B, 3, H, W) in a differentiable way; identity when disabled."""
    if not cfg.enabled:
        return x
    if cfg.symmetries == "d4":
        x = _flip_rotate(x, gen)
    elif cfg.symmetries == "flips":
        x = _mirror(x, gen)
    if cfg.color:
        x = _color(x, gen)
    if cfg.translation > 0:
        x = _translate(x, cfg.translation, gen)
    if cfg.cutout > 0:
        x = _cutout(x, cfg.cutout, gen)
    return x
