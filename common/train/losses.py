"""Adversarial and classification losses of the unified step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADVERSARIAL_LOSSES = ("hinge", "non_saturating")


def discriminator_loss(real_score: torch.Tensor, fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """D's loss on real and generated scores: hinge (default) or non-saturating (logistic)."""
    if kind == "hinge":
        return F.relu(1.0 - real_score).mean() + F.relu(1.0 + fake_score).mean()
    if kind == "non_saturating":
        return F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {ADVERSARIAL_LOSSES}")


def generator_loss(fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """G's adversarial loss on its images' scores."""
    if kind == "hinge":
        return -fake_score.mean()
    if kind == "non_saturating":
        return F.softplus(-fake_score).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {ADVERSARIAL_LOSSES}")


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Mean cross-entropy over the rows where ``mask`` is true; None when no row is."""
    if not bool(mask.any()):
        return None
    return F.cross_entropy(logits[mask], labels[mask])
