"""The unified ViT cGAN-classifier: generator, projection discriminator, classification head."""

from common.model.config import ModelConfig, model_preset, preset_names
from common.model.unified import (
    GROUPS,
    DiscriminatorOutput,
    UnifiedViTGAN,
    build_model,
    group_entries,
    group_of,
    initial_model,
    split_groups,
)

__all__ = [
    "GROUPS",
    "DiscriminatorOutput",
    "ModelConfig",
    "UnifiedViTGAN",
    "build_model",
    "group_entries",
    "group_of",
    "initial_model",
    "model_preset",
    "preset_names",
    "split_groups",
]
