"""How a training step turns its real patches into D's and C's gradients: the strategy interface.

There is one unified step and one plain-classifier step (``common/train/engine.py``); what differs
between training with and without DP-SGD is only how the real batch arrives, how many generated
images a step makes, and how D's and C's gradients are formed from the losses. That is a
:class:`StepGradients`:

- ``Backpropagation`` (``common/train/engine.py``): ordinary back-propagation, the default;
- ``DPTraining`` (``common/privacy/wiring.py``): DP-SGD, per-sample clipping and noise on the covered
  parameters, every step counted (``common/privacy/step.py`` holds its updates).

A strategy is handed to ``LocalTrainer(..., privacy=...)``; the trainer keeps the rest of the step
(the generated batch, G's update, the step count) in one place for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from common.train.transfer import host_rows


@dataclass(frozen=True)
class RealBatch:
    """A step's real patches on the trainer's device, their labels there (-1: unlabelled) and the same
    labels on the host (every mask a step takes from them is known without waiting for the device)."""

    images: torch.Tensor
    labels: torch.Tensor
    labels_host: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    def without_unlabelled(self) -> RealBatch:
        """The same batch without its unlabelled rows: what a closed gate leaves D. Itself when it has no
        unlabelled row, or no labelled one (a hospital without labels: D needs real images, and these are
        all there are)."""
        labelled = self.labels_host >= 0
        if bool(labelled.all()) or not bool(labelled.any()):
            return self
        rows = host_rows(labelled, self.images.device)
        return RealBatch(self.images.index_select(0, rows), self.labels.index_select(0, rows),
                         self.labels_host[labelled])


@dataclass(frozen=True)
class GeneratedBatch:
    """G's images of a step (not detached), their class labels on the device and on the host."""

    images: torch.Tensor
    labels: torch.Tensor
    labels_host: torch.Tensor


@dataclass
class DiscriminatorUpdate:
    """What a D/C update leaves for the rest of the step.

    ``losses``: its losses and counts (tensors or floats; None for a term that was absent);
    ``generator``: G's adversarial and AC-GAN losses when G already learned from this update's pass
    (``train.generator_update=same_pass``), else None and the trainer runs G's own update;
    ``real_features``: the real rows' trunk features, for G's feature matching (None: not used)."""

    losses: dict[str, torch.Tensor | float | None]
    generator: tuple[torch.Tensor, torch.Tensor] | None = None
    real_features: torch.Tensor | None = None


class StepGradients(Protocol):
    """The gradient strategy of a trainer's steps (``trainer`` is a ``LocalTrainer``)."""

    @property
    def noise_multiplier(self) -> float | None:
        """The DP-SGD noise multiplier sigma of the steps (None: ordinary back-propagation, no noise)."""
        ...

    def inputs(self, trainer: Any, real: torch.Tensor, labels: torch.Tensor) -> RealBatch:
        """The real batch as the step uses it (on the trainer's device)."""
        ...

    def generated_rows(self, trainer: Any, real_rows: int) -> int:
        """How many images G makes for a unified step whose real batch has ``real_rows`` rows."""
        ...

    def update_discriminator(self, trainer: Any, batch: RealBatch, generated: GeneratedBatch) -> DiscriminatorUpdate:
        """D's and C's update of a unified step (the optimiser steps included)."""
        ...

    def update_classifier(self, trainer: Any, batch: RealBatch) -> dict[str, float]:
        """The plain classifier's update (``train.method=supervised``) on the batch's labelled rows."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The strategy's own local state."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ...
