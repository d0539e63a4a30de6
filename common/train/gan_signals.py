"""Whether the GAN's signals reach the classifier at all, from the run's passes over its labelled patches.

The unified step feeds the classifier two things from the GAN: D's adversarial gradient in the trunk
they share, and the selected generated images' cross-entropy. They are a regulariser and extra
examples for a classifier that has seen its few labels many times. A hospital with many labels and
a short run is short of steps, not of labels: there both signals only compete with the labels for
the shared features (on real digits with every label and 500 steps they cost 14 points against the
plain classifier, docs/results.md).

The rule is fixed before the first step, from what the hospital knows: a run whose local steps pass
over its labelled patches fewer than ``min_label_passes`` times (``steps x batch_size / labelled
patches``) trains C on its labels alone; G and D's own layers still train. Few-labels runs pass over
their labels hundreds of times and are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.config import defaults_from_conf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "gan_signals")
class GanSignalsConfig:
    """``conf/train/*.yaml``: ``gan_signals``."""

    min_label_passes: float  # fewer passes over the labelled patches in the run: C learns from its labels alone (0: off)

    def __post_init__(self) -> None:
        if self.min_label_passes < 0:
            raise ValueError(f"gan_signals.min_label_passes must be >= 0, got {self.min_label_passes}")


def label_passes(run_steps: int, batch_size: int, labelled_examples: int) -> float:
    """How many times a run of ``run_steps`` local steps passes over ``labelled_examples`` labelled patches."""
    return run_steps * batch_size / max(1, labelled_examples)


def gan_signals_reach_classifier(cfg: GanSignalsConfig, run_steps: int | None, batch_size: int,
                                 labelled_examples: int | None) -> bool:
    """Whether D's gradient into the trunk and the generated images' loss reach C in this run.

    Unknown run length or labelled count (a trainer built without them): yes, with a warning."""
    if cfg.min_label_passes <= 0:
        return True
    if not run_steps or not labelled_examples:
        log.warning("gan_signals.min_label_passes=%s is not applied: the trainer was not told the run's local "
                    "steps and the hospital's labelled patches (LocalTrainer(run_steps=..., labelled_examples=...))",
                    cfg.min_label_passes)
        return True
    passes = label_passes(run_steps, batch_size, labelled_examples)
    if passes >= cfg.min_label_passes:
        return True
    log.info("the GAN's signals stay out of the classifier: %d local steps pass over the %d labelled patches "
             "%.1f times, fewer than gan_signals.min_label_passes=%s", run_steps, labelled_examples, passes,
             cfg.min_label_passes)
    return False
