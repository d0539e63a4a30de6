"""The head centre's Gaussian release (``model.classifier_centre``, a frozen trunk under DP).

A frozen trunk's features share a common part several times larger than what tells one patch from
another (on the MNIST digits through the tiny trunk: mean norm 15.9, 2.1 once the mean is taken
away). DP-SGD clips each patch's head gradient, (p - y) x^T, by its norm, which grows with the
whole of x; so most of the clipping bound C pays for the common part, and the noise, the same
either way, drowns what is left. Subtracting the features' mean from what the head reads gives C to
what separates the classes.

The mean is a statistic of the hospital's patches, so it is released like any other: each patch's
feature vector clipped to an L2 norm of ``radius`` (one patch then moves the sum by at most
``radius``: add/remove sensitivity), summed, plus Gaussian noise of std ``noise_multiplier x
radius``, divided by the hospital's released noisy count. That is one step of the Gaussian mechanism
at sample rate 1, accounted as the history entry ``(noise_multiplier, 1.0, 1)``; the ledger records
it before its noise is drawn. FedAvg then averages the hospitals' centres (post-processing).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from common.model import UnifiedViTGAN
from common.privacy.config import PrivacyConfig


def centre_entry(cfg: PrivacyConfig) -> tuple[float, float, int]:
    """The release's accountant history entry: one Gaussian step at sample rate 1."""
    return (float(cfg.centre_noise_multiplier), 1.0, 1)


def centre_radius(cfg: PrivacyConfig, features: int) -> float:
    """The clipping radius of each patch's feature vector: ``privacy.centre_radius``, or (null) the
    norm of a layer-normalised vector of ``features`` entries, sqrt(features)."""
    return float(cfg.centre_radius) if cfg.centre_radius is not None else math.sqrt(features)


def centre_pending(model: UnifiedViTGAN) -> bool:
    """Whether ``model``'s head subtracts a centre that no hospital has set yet."""
    head = model.classifier
    return bool(getattr(head, "centred", False)) and float(head.centre_ready.max()) < 0.5


@torch.no_grad()
def clipped_feature_sum(model: UnifiedViTGAN, dataset: Dataset, radius: float, batch_size: int = 256) -> torch.Tensor:
    """The sum over ``dataset``'s patches of what the head reads, each vector clipped to an L2 norm of
    ``radius`` (float64, on the CPU). The patches as they are: no augmentation."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(model.cfg.classifier_features, dtype=torch.float64)
    try:
        for images, _labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            features = model.classifier.inputs(model.discriminator.trunk(images.to(device))).double().cpu()
            norms = features.norm(dim=1, keepdim=True)
            total += (features * (radius / norms.clamp_min(1e-12)).clamp(max=1.0)).sum(dim=0)
    finally:
        model.train(was_training)
    return total


def noisy_centre(summed: torch.Tensor, radius: float, noise_multiplier: float, noisy_count: int,
                 generator: torch.Generator) -> torch.Tensor:
    """(``summed`` + N(0, (noise_multiplier x radius)^2 I)) / ``noisy_count``, as float32."""
    noise = torch.randn(summed.shape, generator=generator, dtype=torch.float64) * (noise_multiplier * radius)
    return ((summed + noise) / max(1, int(noisy_count))).float()


def set_centre(model: UnifiedViTGAN, centre: torch.Tensor) -> None:
    """Make ``centre`` the head's centre and mark it set."""
    head = model.classifier
    head.input_centre.copy_(centre.to(head.input_centre.device))
    head.centre_ready.fill_(1.0)
