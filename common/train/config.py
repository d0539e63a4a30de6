"""Local training hyper-parameters (``conf/train/*.yaml``) as typed, validated dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config import dataclass_from_mapping
from common.train.augment import AugmentConfig
from common.train.losses import ADVERSARIAL_LOSSES
from common.train.selection import SelectionConfig
from common.train.weighting import WeightingConfig


@dataclass(frozen=True)
class OptimConfig:
    """Adam with betas (0, 0.99) for G and D (ViTGAN/StyleGAN practice); AdamW for the head."""

    lr_generator: float = 2e-4
    lr_discriminator: float = 2e-4
    lr_classifier: float = 1e-3
    lr_loss_weights: float = 1e-2
    gan_betas: tuple[float, float] = (0.0, 0.99)
    classifier_weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        object.__setattr__(self, "gan_betas", tuple(float(b) for b in self.gan_betas))
        if len(self.gan_betas) != 2:
            raise ValueError(f"gan_betas needs two values, got {self.gan_betas}")


@dataclass(frozen=True)
class TrainConfig:
    """One hospital's unified training: batch, steps per round, losses and their parts."""

    batch_size: int = 32
    local_steps: int = 50
    adversarial_loss: str = "hinge"
    aux_generated_weight: float = 1.0  # AC-GAN term that makes G's images class-faithful
    grad_clip_norm: float | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def __post_init__(self) -> None:
        if self.adversarial_loss not in ADVERSARIAL_LOSSES:
            raise ValueError(f"adversarial_loss must be one of {ADVERSARIAL_LOSSES}, got {self.adversarial_loss!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")


def train_config(section: Any) -> TrainConfig:
    """Build a TrainConfig from the ``train`` config section (a mapping or DictConfig)."""
    return dataclass_from_mapping(TrainConfig, section, "train")
