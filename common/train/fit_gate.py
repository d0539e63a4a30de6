"""Classifier-first by fit: the GAN's signals reach the classifier as it fits its labelled patches.

The unified step feeds the classifier two things from the GAN: D's adversarial gradient in the trunk
they share, and the selected generated images' cross-entropy. Both help when a hospital's labelled
patches are few: the classifier fits them within the first steps, and the GAN's signals are the
regulariser and the extra examples it lacks. Where the labelled patches are many and the budget is
short, the classifier stays far from fitting them for the whole run; there both signals only compete
with the real labels for the shared features (docs/method.md, docs/results.md).

The gate reads the classifier's own fit: a moving average of the real-label cross-entropy, in units
of chance's loss ``ln K`` for ``K`` classes. At or below ``threshold * ln K`` its share is 1; from
twice that it is 0; in between it falls linearly. The share multiplies the generated images' loss
(``governs: generated``), and with ``governs: generated_and_adversarial`` D's gradient into the trunk
too. A fresh classifier is at chance, so what it governs starts closed. The average is the hospital's
own state (never sent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.config import defaults_from_conf

#: What the share scales: the generated images' loss, or that and D's gradient into the shared trunk.
GOVERNED = ("generated", "generated_and_adversarial")


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "fit_gate")
class FitGateConfig:
    """``conf/train/*.yaml``: ``fit_gate``."""

    threshold: float  # full share while the real-label loss's average is <= threshold * ln K (0: off)
    momentum: float  # moving average of the per-step real-label loss
    governs: str  # generated | generated_and_adversarial (also D's gradient into the shared trunk)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"fit_gate.threshold must be in [0, 1] (a fraction of chance's loss ln K), "
                             f"got {self.threshold}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"fit_gate.momentum must be in [0, 1), got {self.momentum}")
        if self.governs not in GOVERNED:
            raise ValueError(f"fit_gate.governs must be one of {GOVERNED}, got {self.governs!r}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0.0

    @property
    def governs_adversarial(self) -> bool:
        """Whether the share also scales D's gradient into the shared trunk."""
        return self.enabled and self.governs == "generated_and_adversarial"


class FitGate:
    """The share of the GAN's signals the classifier takes now, from its real-label loss's moving average."""

    def __init__(self, cfg: FitGateConfig, num_classes: int) -> None:
        self.cfg = cfg
        self.chance_loss = math.log(max(2, int(num_classes)))
        self.average_loss = self.chance_loss  # a fresh classifier is at chance

    @property
    def share(self) -> float:
        """1 while the average is at most ``threshold * ln K``, 0 from twice it, linear in between (1 when off)."""
        if not self.cfg.enabled:
            return 1.0
        return min(1.0, max(0.0, 2.0 - self.average_loss / (self.cfg.threshold * self.chance_loss)))

    def observe(self, real_label_loss: torch.Tensor | float) -> None:
        """Fold one step's real-label cross-entropy into the average (call it for steps with labelled patches;
        a non-finite loss is skipped)."""
        if not self.cfg.enabled:
            return
        loss = float(real_label_loss)
        if math.isfinite(loss):
            self.average_loss = self.cfg.momentum * self.average_loss + (1.0 - self.cfg.momentum) * loss

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"average_loss": torch.tensor(self.average_loss, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``; state saved before the gate existed (no key) starts at chance."""
        if "average_loss" in state:
            self.average_loss = float(state["average_loss"])
