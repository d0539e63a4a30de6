"""ViTGAN-style conditional generator G(z, y).

Noise ``z`` and a learned embedding of the class ``y`` pass through a mapping MLP to a style vector
``w``. A learned grid of position tokens runs through transformer blocks whose LayerNorms are
self-modulated by ``w`` (``LN(x) * (1 + gamma(w)) + beta(w)``); each output token becomes one
``p x p x 3`` patch through a linear layer, the patches fold into the image, and ``tanh`` bounds it.
Attention and MLP layers are timm's.
"""

from __future__ import annotations

import torch
from timm.layers import Attention, Mlp, trunc_normal_
from torch import nn

from common.model.config import ModelConfig


class SelfModulatedLayerNorm(nn.Module):
    """LayerNorm whose scale and shift come from a style vector (ViTGAN's SLN)."""

    def __init__(self, dim: int, style_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.affine = nn.Linear(style_dim, 2 * dim)
        # Small (not zero) weights: the style modulates from the first step, so gradients reach
        # the mapping network at once; zero bias starts every block near a plain LayerNorm.
        nn.init.normal_(self.affine.weight, std=0.02)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine(style).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1.0 + gamma) + beta


class ModulatedBlock(nn.Module):
    """Pre-norm transformer block with self-modulated LayerNorms."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, style_dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = SelfModulatedLayerNorm(dim, style_dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = SelfModulatedLayerNorm(dim, style_dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, style))
        return x + self.mlp(self.norm2(x, style))


class StyleMapping(nn.Module):
    """(z, y) -> style vector w through a class embedding and an MLP."""

    def __init__(self, z_dim: int, num_classes: int, class_embed_dim: int, style_dim: int, layers: int) -> None:
        super().__init__()
        self.class_embed = nn.Embedding(num_classes, class_embed_dim)
        dims = [z_dim + class_embed_dim] + [style_dim] * layers
        modules: list[nn.Module] = []
        for i in range(layers):
            modules += [nn.Linear(dims[i], dims[i + 1]), nn.LeakyReLU(0.2)]
        self.mlp = nn.Sequential(*modules)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([z, self.class_embed(y)], dim=1))


class ViTGenerator(nn.Module):
    """Conditional ViT generator; ``forward(z, y)`` returns images in [-1, 1], (B, 3, H, W)."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.z_dim = cfg.z_dim
        self.num_classes = num_classes
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        dim = cfg.generator_embed_dim
        self.mapping = StyleMapping(cfg.z_dim, num_classes, cfg.class_embed_dim, cfg.style_dim, cfg.mapping_layers)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        # z also seeds each token (a low-rank map), so images of one class differ in layout, not
        # only in the global style; 0 disables it (pure ViTGAN input of position tokens).
        self.token_noise_dim = cfg.token_noise_dim
        if cfg.token_noise_dim > 0:
            self.noise_to_tokens = nn.Linear(cfg.z_dim, self.grid * self.grid * cfg.token_noise_dim)
            self.noise_proj = nn.Linear(cfg.token_noise_dim, dim)
        self.blocks = nn.ModuleList(
            ModulatedBlock(dim, cfg.generator_num_heads, cfg.mlp_ratio, cfg.style_dim, cfg.qkv_bias)
            for _ in range(cfg.generator_depth)
        )
        self.norm = SelfModulatedLayerNorm(dim, cfg.style_dim)
        self.to_patch = nn.Linear(dim, cfg.patch_size * cfg.patch_size * 3)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        style = self.mapping(z, y)
        x = self.pos_embed.expand(z.shape[0], -1, -1)
        if self.token_noise_dim > 0:
            noise = self.noise_to_tokens(z).view(z.shape[0], self.grid * self.grid, self.token_noise_dim)
            x = x + self.noise_proj(noise)
        for block in self.blocks:
            x = block(x, style)
        patches = self.to_patch(self.norm(x, style))  # (B, g*g, p*p*3)
        b, g, p = z.shape[0], self.grid, self.patch_size
        image = patches.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)
        return torch.tanh(image)
