"""Images drawn from random processes: coloured 1/f^alpha noise and textured dead leaves.

Natural images share statistics that such processes reproduce without depicting anything: a power
spectrum falling as 1/f^alpha, occlusion, edges, colour correlations (Baradad et al. 2021, "Learning
to see by looking at noise"). A trunk pretrained on them starts DP-SGD with generic features at no
privacy cost (Tang et al. 2023, DP-RandP). Everything is drawn from a ``torch.Generator``: the same
seed gives the same images everywhere, with no download.
"""

from __future__ import annotations

import math

import torch


def spectral_noise(count: int, size: int, generator: torch.Generator,
                   alpha_range: tuple[float, float] = (1.0, 2.5)) -> torch.Tensor:
    """``count`` RGB images of 1/f^alpha noise (alpha per image), channels mixed by a random matrix, in [-1, 1]."""
    white = torch.randn(count, 3, size, size, generator=generator)
    fy = torch.fft.fftfreq(size).reshape(-1, 1)
    fx = torch.fft.rfftfreq(size).reshape(1, -1)
    radius = torch.sqrt(fx ** 2 + fy ** 2).clamp_min(1.0 / size)
    low, high = alpha_range
    alpha = low + (high - low) * torch.rand(count, 1, 1, 1, generator=generator)
    shaped = torch.fft.irfft2(torch.fft.rfft2(white) / radius ** alpha, s=(size, size))
    shaped = (shaped - shaped.mean(dim=(2, 3), keepdim=True)) / shaped.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    mixing = torch.randn(count, 3, 3, generator=generator) / math.sqrt(3)
    coloured = torch.einsum("bij,bjhw->bihw", mixing, shaped)
    offset = 0.6 * torch.randn(count, 3, 1, 1, generator=generator)
    return torch.tanh(0.6 * coloured + offset)


def dead_leaves(count: int, size: int, generator: torch.Generator, leaves: int = 48,
                texture: float = 0.25) -> torch.Tensor:
    """``count`` RGB images of occluding discs (radii from a power law, random colours), each disc
    carrying a faint 1/f texture, in [-1, 1]."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    image = torch.rand(count, 3, 1, 1, generator=generator).expand(count, 3, size, size).clone() * 2 - 1
    textures = spectral_noise(count, size, generator)
    for _ in range(leaves):
        centre = torch.rand(count, 2, 1, 1, generator=generator) * 1.2 - 0.1
        # radius ~ r_min * U^(-1/2): many small leaves, few large ones
        radius = (0.03 / torch.rand(count, 1, 1, generator=generator).clamp_min(0.01).sqrt()).clamp(max=0.5)
        inside = ((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) < radius ** 2
        colour = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
        image = torch.where(inside.unsqueeze(1), colour + texture * textures, image)
    return image.clamp(-1, 1)


def random_process_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Half spectral noise, half dead leaves, shuffled."""
    half = count // 2
    images = torch.cat([spectral_noise(half, size, generator), dead_leaves(count - half, size, generator)])
    return images[torch.randperm(count, generator=generator)]
