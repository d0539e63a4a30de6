"""The hospital's validation gate on pseudo-labels: they teach the classifier only while the same
rule, applied to the hospital's own labelled validation patches, labels them correctly.

Every ``check_every`` local steps (and at the start of every round) the classifier predicts the
validation patches from the label-safe view (no augmentation). The patches whose confidence reaches
the pseudo-label threshold are the ones the rule would have kept; their **precision** (the share
whose prediction is the true label) says how often a kept pseudo-label is right on data the
hospital can check. The gate is open while that precision is at least ``min_precision`` over at
least ``min_accepted`` kept patches; a closed gate turns the pseudo-label loss off for the steps
until the next check. Without validation patches the gate stays closed: nothing checks the labels.

``governs`` says what a closed gate withholds: ``pseudo_labels`` (their loss alone; D still reads the
unlabelled patches as real images) or ``unlabelled`` (every use of the unlabelled patches: a closed
gate drops them from the step, so they reach the model only while the hospital's validation
patches show the model can label them; the default). A batch with no labelled patch at all (a
hospital without labels) keeps its unlabelled patches for D, which has no other real images.

The validation patches are never trained on; the gate reads one forward pass over them per check
(a few hundred patches every 100 steps: about 1 % of a round on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.config import defaults_from_conf
from common.evaluation.metrics import predict_probabilities

#: ``pseudo_label_gate.governs``: what a closed gate withholds.
GATE_GOVERNS = ("pseudo_labels", "unlabelled")


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "pseudo_label_gate")
class PseudoLabelGateConfig:
    """``train.pseudo_label_gate`` (see the module docstring)."""

    enabled: bool
    min_precision: float
    min_accepted: int
    check_every: int
    batch_size: int
    governs: str  # pseudo_labels | unlabelled: what a closed gate withholds (see the module docstring)

    def __post_init__(self) -> None:
        if self.governs not in GATE_GOVERNS:
            raise ValueError(f"pseudo_label_gate.governs must be one of {GATE_GOVERNS}, got {self.governs!r}")
        if not 0.0 <= self.min_precision <= 1.0:
            raise ValueError(f"pseudo_label_gate.min_precision must be in [0, 1], got {self.min_precision}")
        if self.min_accepted < 1:
            raise ValueError(f"pseudo_label_gate.min_accepted must be >= 1, got {self.min_accepted}")
        if self.check_every < 1:
            raise ValueError(f"pseudo_label_gate.check_every must be >= 1, got {self.check_every}")
        if self.batch_size < 1:
            raise ValueError(f"pseudo_label_gate.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class GateReading:
    """One check: how many validation patches the rule kept, how many of those were right."""

    step: int
    kept: int
    correct: int
    patches: int

    @property
    def precision(self) -> float:
        return self.correct / self.kept if self.kept else float("nan")


def gate_reading(labels: np.ndarray, probs: np.ndarray, threshold: float, step: int) -> GateReading:
    """The rule's kept patches (confidence >= ``threshold``) among labelled ``labels`` and their precision."""
    labelled = labels >= 0
    labels, probs = labels[labelled], probs[labelled]
    kept = probs.max(axis=1) >= threshold
    correct = int((probs.argmax(axis=1)[kept] == labels[kept]).sum())
    return GateReading(step, int(kept.sum()), correct, int(labelled.sum()))


class PseudoLabelGate:
    """Open or closed, from the last check on the validation patches (see the module docstring)."""

    def __init__(self, cfg: PseudoLabelGateConfig, threshold: float, validation: Dataset | None,
                 device: torch.device | str) -> None:
        self.cfg = cfg
        self.threshold = float(threshold)
        self.validation = validation if validation is not None and len(validation) > 0 else None
        self.device = device
        self.last: GateReading | None = None
        self.open = False
        self.steps_open = 0
        self.steps_seen = 0

    def due(self, step: int, first_of_round: bool) -> bool:
        return first_of_round or self.last is None or step - self.last.step >= self.cfg.check_every

    def check(self, model: Any, step: int) -> GateReading | None:
        """Read the validation patches and open or close the gate."""
        if self.validation is None:
            self.open = False
            return None
        loader = DataLoader(self.validation, batch_size=self.cfg.batch_size, shuffle=False, num_workers=0)
        labels, probs = predict_probabilities(model, loader, self.device)
        self.last = gate_reading(labels, probs, self.threshold, step)
        self.open = self.last.kept >= self.cfg.min_accepted and self.last.precision >= self.cfg.min_precision
        return self.last

    def count(self) -> None:
        """One training step taken under the gate's current state."""
        self.steps_seen += 1
        self.steps_open += int(self.open)

    def reset_counters(self) -> None:
        self.steps_open = self.steps_seen = 0

    @property
    def withholds_unlabelled(self) -> bool:
        """Whether this step must leave the unlabelled patches out altogether (closed, ``governs: unlabelled``)."""
        return not self.open and self.cfg.governs == "unlabelled"

    def metrics(self) -> dict[str, float]:
        """The round's gate entries: share of steps open, and the last check's precision and kept patches."""
        out = {"gate/open_fraction": self.steps_open / self.steps_seen if self.steps_seen else 0.0}
        if self.last is not None:
            out["gate/kept"] = float(self.last.kept)
            if self.last.kept:
                out["gate/precision"] = self.last.precision
        return out
