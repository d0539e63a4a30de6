"""Adversarial and classification losses of the unified step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.train.transfer import host_rows

ADVERSARIAL_LOSSES = ("hinge", "non_saturating")


def _check(kind: str) -> None:
    if kind not in ADVERSARIAL_LOSSES:
        raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {ADVERSARIAL_LOSSES}")


def real_adversarial_terms(real_score: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example real-image part of D's loss: hinge ``relu(1 - s)`` or non-saturating ``softplus(-s)``."""
    _check(kind)
    return F.relu(1.0 - real_score) if kind == "hinge" else F.softplus(-real_score)


def fake_adversarial_terms(fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example generated-image part of D's loss: hinge ``relu(1 + s)`` or ``softplus(s)``."""
    _check(kind)
    return F.relu(1.0 + fake_score) if kind == "hinge" else F.softplus(fake_score)


def discriminator_loss(real_score: torch.Tensor, fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """D's loss on real and generated scores: hinge (default) or non-saturating (logistic)."""
    return real_adversarial_terms(real_score, kind).mean() + fake_adversarial_terms(fake_score, kind).mean()


def generator_loss(fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """G's adversarial loss on its images' scores."""
    _check(kind)
    return -fake_score.mean() if kind == "hinge" else F.softplus(-fake_score).mean()


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy, 0 for unlabelled patches (label < 0)."""
    known = labels >= 0
    return F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * known.to(logits.dtype)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                         over: int | None = None) -> torch.Tensor | None:
    """Mean cross-entropy over the rows where ``mask`` is true; None when no row is.

    With ``over`` the kept rows' summed cross-entropy is divided by ``over`` instead (FixMatch's
    normalisation by every candidate of the step, kept or not). A mask on the host selects its rows
    by index, so logits on a GPU need no wait for the GPU.
    """
    if not bool(mask.any()):
        return None
    if mask.device.type == "cpu":
        rows = host_rows(mask, logits.device)
        kept_logits, kept_labels = logits.index_select(0, rows), labels.index_select(0, rows)
    else:
        kept_logits, kept_labels = logits[mask], labels[mask]
    if over is None:
        return F.cross_entropy(kept_logits, kept_labels)
    return F.cross_entropy(kept_logits, kept_labels, reduction="sum") / max(int(over), 1)
