"""How far a per-seed difference between two variants could move with other test patches.

Two variants of one (setting, seed) are scored on the same test patches in the same order
(``inprocess.TEST_PREDICTIONS``). The percentile bootstrap below redraws those patches with
replacement, the same draw for both variants, and recomputes the difference of their balanced
accuracies. Its interval measures the test split's sampling noise only: training the same variant
again with other initial weights moves a seed as well (``experiment.training_seed_offset``), and
that is not in it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import defaults_from_conf

PREDICTIONS_DIR = "predictions"


@dataclass(frozen=True)
@defaults_from_conf("experiments.yaml", "experiment.paired_interval")
class PairedIntervalConfig:
    """``experiment.paired_interval``: the bootstrap behind each per-seed interval of the report."""

    resamples: int  # bootstrap draws of the test patches
    level: float  # central coverage of the interval (0.95: the 2.5th to the 97.5th percentile)
    seed: int  # of the draws (the same for every pair, so a report is reproducible)
    also_against: tuple[str, ...]  # variants compared seed by seed besides plain, where they ran (e.g. FixMatch's)

    def __post_init__(self) -> None:
        object.__setattr__(self, "also_against", tuple(self.also_against))
        if self.resamples < 100:
            raise ValueError(f"experiment.paired_interval.resamples must be >= 100, got {self.resamples}")
        if not 0.5 <= self.level < 1.0:
            raise ValueError(f"experiment.paired_interval.level must be in [0.5, 1), got {self.level}")


@dataclass(frozen=True)
class PairedDifference:
    """Balanced accuracy of variant a minus that of variant b on the same patches, with its interval."""

    difference: float
    low: float
    high: float


def _balanced_accuracies(weights: np.ndarray, onehot: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Balanced accuracy under each row of patch ``weights`` (resamples x patches): the mean over the
    classes present in a draw of their weighted recall."""
    per_class = weights @ onehot  # (resamples, classes): patches of each class in each draw
    hits = weights @ (onehot * correct[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(per_class > 0, hits / per_class, np.nan)
    return np.nanmean(recall, axis=1)


def bootstrap_difference(labels: Sequence[int], predicted_a: Sequence[int], predicted_b: Sequence[int],
                         config: PairedIntervalConfig) -> PairedDifference:
    """``a - b`` in balanced accuracy on these patches, and its percentile-bootstrap interval."""
    y, a, b = (np.asarray(v, dtype=np.int64) for v in (labels, predicted_a, predicted_b))
    if not (y.shape == a.shape == b.shape) or y.ndim != 1 or y.size == 0:
        raise ValueError(f"paired predictions need equal, non-empty label and prediction lists; got {y.shape}, "
                         f"{a.shape}, {b.shape}")
    classes = int(max(y.max(), a.max(), b.max())) + 1
    onehot = np.eye(classes)[y]
    correct_a, correct_b = (a == y).astype(float), (b == y).astype(float)
    ones = np.ones((1, y.size))
    difference = float(_balanced_accuracies(ones, onehot, correct_a)[0] - _balanced_accuracies(ones, onehot, correct_b)[0])
    rng = np.random.default_rng(config.seed)
    draws = []
    for start in range(0, config.resamples, 256):  # bounded memory: 256 draws x patches at a time
        rows = min(256, config.resamples - start)
        weights = rng.multinomial(y.size, np.full(y.size, 1.0 / y.size), size=rows).astype(float)
        draws.append(_balanced_accuracies(weights, onehot, correct_a) - _balanced_accuracies(weights, onehot, correct_b))
    spread = np.concatenate(draws)
    tail = (1.0 - config.level) / 2.0
    low, high = np.quantile(spread, [tail, 1.0 - tail])
    return PairedDifference(difference, float(low), float(high))


def predictions_path(folder: Path, setting: str, variant: str, seed: int) -> Path:
    """Where one run's pooled test predictions are kept, beside results.json."""
    return folder / PREDICTIONS_DIR / f"{setting}-{variant}-seed{seed}.json"


def paired_with_baseline(predictions: Mapping[tuple[str, str, int], Mapping[str, Any]], setting: str, variant: str,
                         baseline: str, seed: int, config: PairedIntervalConfig) -> PairedDifference | None:
    """``variant - baseline`` on seed ``seed`` of ``setting``; None when either run's predictions are
    missing (a run recorded before they were kept) or were made on other patches."""
    mine, theirs = predictions.get((setting, variant, seed)), predictions.get((setting, baseline, seed))
    if mine is None or theirs is None or list(mine["labels"]) != list(theirs["labels"]):
        return None
    return bootstrap_difference(mine["labels"], mine["predicted"], theirs["predicted"], config)
