"""The few-labels regime: withhold labels, seeded, keeping a fraction or a count per class."""

from __future__ import annotations

import numpy as np

from common.data.base import UNLABELLED


def withhold_labels(
    labels: np.ndarray,
    seed: int,
    fraction: float = 1.0,
    per_class: int | None = None,
) -> np.ndarray:
    """A copy of ``labels`` where all but the kept ones are ``UNLABELLED``.

    Per class, keeps ``per_class`` labels when given, else ``round(fraction * n_class)`` (at least
    one when ``fraction`` > 0 and the class is present). The choice is seeded and per class, so the
    class balance of the labelled part follows that of the data.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"data.labeled_fraction must be in [0, 1], got {fraction}")
    if per_class is not None and per_class < 0:
        raise ValueError(f"data.labeled_per_class must be >= 0, got {per_class}")
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full_like(labels, UNLABELLED)
    rng = np.random.default_rng([seed, 104729])
    for c in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == c)
        if per_class is not None:
            keep = min(per_class, len(rows))
        else:
            keep = int(round(fraction * len(rows)))
            keep = max(keep, 1) if fraction > 0 else 0
        chosen = rng.choice(rows, size=keep, replace=False)
        out[chosen] = c
    return out


def carve_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, validation), stratified by class and seeded.

    Each class gives ``round(fraction * n_class)`` rows to validation (none when ``fraction`` is 0);
    both index arrays come back sorted. Used to tune on a split carved from a hospital's training
    patches, never on its test split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, 7919])
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = int(round(fraction * len(rows)))
        val.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    val_rows = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)
    return train_rows, val_rows
