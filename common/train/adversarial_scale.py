"""How much of D's adversarial gradient reaches the trunk the classifier shares (a hospital's own state).

The discriminator and the classifier read one trunk. When the generator cannot yet imitate the
hospital's patches, D separates real from generated images outright, and its gradient turns the
shared features towards spotting generator artefacts instead of telling classes apart. The scale
multiplies the gradient of D's score into the trunk in the D/C update (the score's own layers and
G's update are untouched).

``adaptive`` follows adaptive discriminator augmentation (Karras et al. 2020): its overfitting
signal ``r = E[sign D(x_real)]`` (0 when D cannot tell, 1 when it wins on every real patch), kept
as a moving average over steps, lowers ``log scale`` by ``rate`` each step it stays above
``target`` and raises it each step below, between ``min_scale`` and ``scale``.

``ramp_fraction`` makes the schedule classifier-first: over the first ``ramp_fraction`` of the run's
local steps the scale rises from almost 0 to its value along the sigmoid-shaped ramp-up of
semi-supervised learning, ``exp(-5 (1 - t)^2)`` (Laine and Aila 2017; Tarvainen and Valpola 2017), so
the shared features first learn the classes and D's gradient reaches them once they do.
``ramp_passes`` is the same ramp measured in passes over the hospital's labelled patches, as Laine and
Aila measure theirs in epochs: ``t = step * batch_size / labelled patches``. A hospital with a few
dozen labelled patches passes over them many times within one or two hundred steps (50 passes over
40-130 labels at 32 a batch take 65-200 steps), so D's gradient arrives early in a run of
thousands; one with thousands of labels and a short budget stays early in the ramp for the
whole run, where D's gradient would only compete with the labels for the shared features.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from common.config import defaults_from_conf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "adversarial_trunk")
class AdversarialTrunkConfig:
    """``conf/train/*.yaml``: ``adversarial_trunk``."""

    scale: float  # the scale (adaptive: its upper bound and starting value)
    adaptive: bool
    target: float  # E[sign D(real)] above which D counts as winning (ADA's target)
    rate: float  # change of log(scale) per step
    min_scale: float  # adaptive: lower bound
    momentum: float  # moving average of the per-step signal
    ramp_fraction: float  # classifier-first: the scale ramps up over this fraction of the run's steps (0: off)
    ramp_passes: float  # classifier-first: the scale ramps up over this many passes over the labelled patches (0: off)

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale <= 1.0:
            raise ValueError(f"adversarial_trunk.scale must be in [0, 1], got {self.scale}")
        if self.adaptive and not 0.0 < self.min_scale <= self.scale:
            raise ValueError(f"adversarial_trunk.min_scale must be in (0, scale], got {self.min_scale}")
        if not -1.0 < self.target < 1.0:
            raise ValueError(f"adversarial_trunk.target must be in (-1, 1), got {self.target}")
        if self.rate < 0 or not 0.0 <= self.momentum < 1.0:
            raise ValueError("adversarial_trunk.rate must be >= 0 and momentum in [0, 1)")
        if not 0.0 <= self.ramp_fraction <= 1.0:
            raise ValueError(f"adversarial_trunk.ramp_fraction must be in [0, 1], got {self.ramp_fraction}")
        if self.ramp_passes < 0:
            raise ValueError(f"adversarial_trunk.ramp_passes must be >= 0, got {self.ramp_passes}")

    @property
    def passes_everything(self) -> bool:
        """Whether D's adversarial gradient reaches the trunk whole at every step (scale 1, no adaptation, no ramp)."""
        return self.scale == 1.0 and not self.adaptive and self.ramp_fraction == 0.0 and self.ramp_passes == 0.0


#: Why a DP run refuses any other adversarial_trunk setting. The private step clips each real patch's
#: whole D/C gradient and does not scale its adversarial part into the trunk (privacy.adversarial_weight
#: weights it as a whole), and the adaptive scale would steer training by D's real-patch scores outside
#: the DP-SGD.
PRIVATE_ADVERSARIAL_TRUNK = ("DP-SGD (privacy.enabled) does not apply train.adversarial_trunk: leave its scale at 1.0, "
                             "adaptive false, ramp_fraction 0 and ramp_passes 0 (privacy.adversarial_weight weights D's adversarial "
                             "losses under DP)")


def ramp_up(step: float, length: float) -> float:
    """The sigmoid-shaped ramp-up ``exp(-5 (1 - t)^2)`` at ``t = step / length`` (1 from ``length`` on)."""
    if length <= 0 or step >= length:
        return 1.0
    t = max(0.0, step) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


class AdversarialTrunkScale:
    """The current scale and the overfitting signal behind it; ``state_dict`` stays at the hospital."""

    def __init__(self, cfg: AdversarialTrunkConfig, schedule_steps: int | None = None,
                 steps_per_pass: float | None = None) -> None:
        """``schedule_steps``: the run's total local steps, which ``ramp_fraction`` is a fraction of;
        ``steps_per_pass``: local steps per pass over the hospital's labelled patches (``ramp_passes``; without
        it that ramp is off, with a warning)."""
        if cfg.ramp_fraction > 0 and not schedule_steps:
            raise ValueError("adversarial_trunk.ramp_fraction needs train.optim.schedule_steps (the run's total "
                             "local steps; the experiment runner sets it)")
        if cfg.ramp_passes > 0 and not steps_per_pass:  # a trainer built without its labelled patches' count
            log.warning("adversarial_trunk.ramp_passes=%s is off: the trainer was not told how many labelled "
                        "patches the hospital has (LocalTrainer(labelled_examples=...))", cfg.ramp_passes)
        self.cfg = cfg
        self.ramp_steps = int(round(cfg.ramp_fraction * int(schedule_steps or 0)))
        self.ramp_pass_steps = cfg.ramp_passes * float(steps_per_pass or 0.0)  # the ramp's length in local steps
        self.log_scale = math.log(cfg.scale) if cfg.scale > 0 else -math.inf
        self.signal = 0.0

    @property
    def value(self) -> float:
        """The scale before the ramp: fixed, or where the adaptive rule has moved it."""
        return math.exp(self.log_scale) if self.cfg.adaptive else self.cfg.scale

    def at(self, step: int) -> float:
        """The scale at local step ``step`` (0-based, counted over the whole run): ``value`` times the ramps."""
        return self.value * ramp_up(step, self.ramp_steps) * ramp_up(step, self.ramp_pass_steps)

    def observe(self, real_scores: torch.Tensor) -> None:
        """Fold one step's scores of real patches into the signal and move the scale (adaptive only)."""
        if not self.cfg.adaptive or real_scores.numel() == 0:
            return
        step = float(torch.sign(real_scores.detach().float()).mean())
        self.signal = self.cfg.momentum * self.signal + (1.0 - self.cfg.momentum) * step
        direction = 1.0 if self.signal > self.cfg.target else -1.0
        low, high = math.log(self.cfg.min_scale), math.log(self.cfg.scale)
        self.log_scale = min(high, max(low, self.log_scale - direction * self.cfg.rate))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"log_scale": torch.tensor(self.log_scale, dtype=torch.float64),
                "signal": torch.tensor(self.signal, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``; state saved before this existed (no keys) keeps the start values."""
        if "log_scale" in state:
            self.log_scale = float(state["log_scale"])
            self.signal = float(state["signal"])
