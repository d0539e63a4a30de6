"""The unified ViT cGAN-classifier: generator, projection discriminator, classification head."""

from common.model.config import ModelConfig, model_preset, preset_names
from common.model.unified import (
    DERIVED_STATE,
    GROUPS,
    DiscriminatorOutput,
    UnifiedViTGAN,
    build_model,
    group_entries,
    group_of,
    initial_model,
    is_derived_state,
    split_groups,
)

__all__ = [
    "DERIVED_STATE",
    "GROUPS",
    "DiscriminatorOutput",
    "ModelConfig",
    "UnifiedViTGAN",
    "build_model",
    "group_entries",
    "group_of",
    "initial_model",
    "is_derived_state",
    "model_preset",
    "preset_names",
    "split_groups",
]
