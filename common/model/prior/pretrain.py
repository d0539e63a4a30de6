"""Contrastive pretraining (SimCLR, Chen et al. 2020) of the discriminator trunk on random-process images.

The trunk learns to give two augmented views of one random image the same feature and different
images different ones (NT-Xent). No patient image is read, so the weights are public: starting
DP-SGD from them changes no epsilon (the initial weights are part of the public algorithm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import CONF_DIR, dataclass_from_mapping, load_yaml
from common.model.config import ModelConfig
from common.model.discriminator import ViTTrunk
from common.model.prior.random_images import random_process_images


@dataclass(frozen=True)
class PriorConfig:
    """How the trunk prior is learnt (``conf/prior.yaml`` explains each key)."""

    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    temperature: float
    seed: int


def prior_config(overrides: dict[str, object] | None = None) -> PriorConfig:
    """``conf/prior.yaml`` with ``overrides`` applied (unknown keys are refused by name)."""
    values = {**load_yaml(CONF_DIR / "prior.yaml"), **(overrides or {})}
    return dataclass_from_mapping(PriorConfig, values, "prior")


def _crop_and_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random resized crop (20-100 % of the area, aspect 3/4-4/3) and a random horizontal flip."""
    n = images.shape[0]
    area = 0.2 + 0.8 * torch.rand(n, generator=generator)
    log_ratio = (torch.rand(n, generator=generator) * 2 - 1) * math.log(4 / 3)
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _colour_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter (80 % of the views), grey for 20 %."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator))

    jitter = torch.rand(n, 1, 1, 1, generator=generator) < 0.8
    grey = images.mean(dim=1, keepdim=True)
    out = images + uniform(-0.4, 0.4)
    out = (out - out.mean(dim=(1, 2, 3), keepdim=True)) * uniform(0.6, 1.4) + out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - out.mean(dim=1, keepdim=True)) * uniform(0.6, 1.4) + out.mean(dim=1, keepdim=True)
    out = torch.where(jitter, out, images)
    to_grey = torch.rand(n, 1, 1, 1, generator=generator) < 0.2
    return torch.where(to_grey, grey.expand_as(out), out).clamp(-1, 1)


def augmented_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR view of each image."""
    return _colour_jitter(_crop_and_flip(images, generator), generator)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each of the 2n embeddings must pick its partner view among the other 2n - 1."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(similarity, partner)


def pretrain_trunk(model_cfg: ModelConfig, cfg: PriorConfig,
                   progress: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """The trunk's state dict after ``cfg.steps`` SimCLR steps on fresh random-process images."""
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        trunk = ViTTrunk(model_cfg)
        dim = model_cfg.embed_dim
        projection = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
    parameters = [*trunk.parameters(), *projection.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / max(1, cfg.steps // 20))
        * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
    trunk.train()
    for step in range(cfg.steps):
        images = random_process_images(cfg.batch_size, model_cfg.image_size, generator)
        views = torch.cat([augmented_view(images, generator), augmented_view(images, generator)])
        embedded = projection(trunk(views).features)
        loss = nt_xent(embedded[: cfg.batch_size], embedded[cfg.batch_size:], cfg.temperature)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    return {key: value.detach().clone() for key, value in trunk.state_dict().items()}
