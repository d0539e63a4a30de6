"""The built-in training methods, registered (``common/train/method_registry.py``).

- ``unified``: the ViT conditional GAN and classifier in one step (``LocalTrainer.unified_step``);
- ``supervised``: the same trunk and head on labelled patches only, the plain baseline;
- ``semi_supervised``: FixMatch on the same trunk and head, no generator.

A new method is a module with its step function and one ``register_method`` call, imported below.
"""

from __future__ import annotations

from typing import Any

import torch

from common.train.method_registry import TrainingMethod, method_names, register_method, training_method

__all__ = ["TrainingMethod", "method_names", "register_method", "training_method"]


def _unified(trainer: Any, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return trainer.unified_step(real, labels)


def _supervised(trainer: Any, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return trainer.supervised_step(real, labels)


def _semi_supervised(trainer: Any, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return trainer.semi_supervised_step(real, labels)


register_method(TrainingMethod("unified", step=_unified, private=True, needs_labels=False, trains_generator=True))
register_method(TrainingMethod("supervised", step=_supervised, private=True, labelled_only=True))
register_method(TrainingMethod("semi_supervised", step=_semi_supervised))
