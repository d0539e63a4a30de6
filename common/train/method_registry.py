"""The registry of training methods (``train.method``): what a method's step is and what it needs.

A method is a step function of the trainer, ``step(trainer, real, labels) -> losses``, which runs one
local step through the trainer's public pieces (``common/train/engine.py:LocalTrainer``: its model,
optimisers, augmentation and selection) and advances ``trainer.global_step``. A method whose step
forms its gradients through the trainer's gradient strategy (``trainer.gradients``,
``common/train/step_gradients.py``) runs under DP-SGD too and says so with ``private=True``. It is
registered once::

    register_method(TrainingMethod("my_method", step=my_step, labelled_only=True))

``common/train/methods.py`` registers the built-in methods and imports any module that registers
another, so every name is known before a config is checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.registry import Registry

#: (trainer, real images, labels with -1 for unlabelled rows) -> the step's losses and counts.
StepFn = Callable[[Any, torch.Tensor, torch.Tensor], dict[str, float]]


@dataclass(frozen=True)
class TrainingMethod:
    """One ``train.method``."""

    name: str
    step: StepFn
    #: Its step forms D's and C's gradients through ``trainer.gradients`` alone, so DP-SGD's strategy
    #: (``common/privacy``) makes it private; False: DP is refused for it.
    private: bool = False
    #: A hospital without any labelled patch cannot train it.
    needs_labels: bool = True
    #: Its batches carry labelled patches only (the unlabelled stream is never drawn).
    labelled_only: bool = False
    #: It trains (and so ever calls) the generator.
    trains_generator: bool = False


METHODS: Registry[TrainingMethod] = Registry("training method")


def register_method(method: TrainingMethod) -> TrainingMethod:
    """Add ``method`` under its name (a name registered twice is a programming error)."""
    return METHODS.add(method.name, method)


def training_method(name: str) -> TrainingMethod:
    """The registered method ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return METHODS[name]


def method_names(private_only: bool = False) -> tuple[str, ...]:
    """Registered method names in registration order; with ``private_only`` those with a DP-SGD step."""
    return tuple(n for n, m in METHODS.items() if m.private or not private_only)
