"""Discriminator trunk phi(x), adversarial head with class projection, and classification head.

The trunk is a ViT (timm patch embedding and blocks) with a CLS token; ``phi(x)`` is the normalised
CLS feature. The adversarial score follows the projection discriminator (Miyato & Koyama 2018):
``D(x, y) = psi(phi(x)) + <E[y], phi(x)>``. The classification head ``C`` reads the trunk (through
optional dedicated blocks) and is the classifier a hospital deploys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from common.model.config import ModelConfig


@dataclass
class TrunkOutput:
    """What one trunk pass yields: all tokens (for extra classifier blocks) and phi(x)."""

    tokens: torch.Tensor  # (B, 1 + N, D), before the final norm
    features: torch.Tensor  # (B, D), normalised CLS token


class ViTTrunk(nn.Module):
    """ViT encoder with a CLS token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, dim))
        self.blocks = nn.Sequential(
            *(Block(dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias) for _ in range(cfg.depth))
        )
        self.norm = nn.LayerNorm(dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor) -> TrunkOutput:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        tokens = self.blocks(x)
        return TrunkOutput(tokens, self.norm(tokens[:, 0]))


class ProjectionDiscriminator(nn.Module):
    """Trunk + adversarial head psi + class projection embedding E."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.trunk = ViTTrunk(cfg)
        self.adv_head = nn.Linear(cfg.embed_dim, 1)
        self.class_embed = nn.Embedding(num_classes, cfg.embed_dim)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        if cfg.spectral_norm:
            for module in list(self.modules()):
                if isinstance(module, nn.Linear):
                    nn.utils.parametrizations.spectral_norm(module)

    def score(self, features: torch.Tensor, labels: torch.Tensor,
              unconditional: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial score D(x, y), shape (B,). Labels < 0 (unlabelled) get psi alone.

        ``unconditional`` replaces psi(phi(x)) when given (the semi-supervised GAN score).
        """
        if unconditional is None:
            unconditional = self.adv_head(features).squeeze(-1)
        known = labels >= 0
        projection = (self.class_embed(labels.clamp(min=0)) * features).sum(dim=-1)
        return unconditional + projection * known.to(features.dtype)


def grid_pooled(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """The patch tokens of ``tokens`` (B, 1 + N, D), layer-normalised without parameters and averaged
    over a ``grid`` x ``grid`` grid of the image: (B, grid * grid * D)."""
    patches = F.layer_norm(tokens[:, 1:], tokens.shape[-1:])
    batch, count, dim = patches.shape
    side = int(round(count ** 0.5))
    image = patches.transpose(1, 2).reshape(batch, dim, side, side)
    return F.adaptive_avg_pool2d(image, grid).flatten(1)


class ClassifierHead(nn.Module):
    """Optional dedicated transformer blocks, then a linear head over the classes; with
    ``classifier_grid`` g > 0 the head reads the CLS feature beside the g x g grid of pooled patch
    tokens (:func:`grid_pooled`); with ``classifier_centre`` it subtracts the buffer ``input_centre``
    from them first (zero until a hospital sets it; ``centre_ready`` is 1 from then on); with
    ``classifier_whitening`` it then multiplies them by the buffer ``input_whitening`` (the identity
    until a trainer sets it, common/train/whitening.py)."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.grid = cfg.classifier_grid
        self.blocks = nn.Sequential(
            *(Block(dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias) for _ in range(cfg.classifier_depth))
        )
        self.norm = nn.LayerNorm(dim) if cfg.classifier_depth else nn.Identity()
        self.head = nn.Linear(cfg.classifier_features, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.centred = cfg.classifier_centre
        if self.centred:
            self.register_buffer("input_centre", torch.zeros(cfg.classifier_features))
            self.register_buffer("centre_ready", torch.zeros(1))
        self.whitened = cfg.classifier_whitening
        if self.whitened:
            self.register_buffer("input_whitening", torch.eye(cfg.classifier_features))

    def inputs(self, trunk: TrunkOutput) -> torch.Tensor:
        """What the linear head reads, before any centre: (B, ``classifier_features``)."""
        if len(self.blocks) == 0:
            tokens, cls = trunk.tokens, trunk.features
        else:
            tokens = self.blocks(trunk.tokens)
            cls = self.norm(tokens[:, 0])
        if self.grid:
            cls = torch.cat([cls, grid_pooled(tokens, self.grid)], dim=1)
        return cls

    def centred_features(self, features: torch.Tensor) -> torch.Tensor:
        """The CLS feature phi(x) less the centre's CLS part (``features`` unchanged without a centre):
        what the discriminator's heads read, so that under DP their share of each patch's clipped
        gradient is not spent on the features' common part either."""
        if not self.centred:
            return features
        return features - self.input_centre[: features.shape[-1]]

    def forward(self, trunk: TrunkOutput) -> torch.Tensor:
        features = self.inputs(trunk)
        if self.centred:
            features = features - self.input_centre
        if self.whitened:
            features = features @ self.input_whitening
        return self.head(features)
