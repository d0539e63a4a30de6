"""One hospital's data: its training partition (some labels maybe withheld) and held-out split.

Every data set's loader (``common.data.registry``) ends in ``finish_site``; ``load_site_data``
there is what a ClientApp calls, in simulation and in deployment alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import ConfigError
from common.data.base import ConcatPatches, PatchDataset, PatchSubset
from common.data.config import DataConfig
from common.data.labels import carve_validation, withhold_labels


@dataclass
class SiteData:
    """What one hospital trains and evaluates on; ``val`` is carved from its training patches
    (``data.val_fraction``) for tuning, and is None when not asked for."""

    name: str
    train: PatchDataset
    test: PatchDataset
    val: PatchDataset | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def labelled_examples(self) -> int:
        """How many training patches carry a label (the rest are unlabelled)."""
        return int((self.train.labels >= 0).sum())

    def report(self) -> dict[str, Any]:
        """Per-split class counts (the partition report's row for this hospital)."""
        row = {"site": self.name, "train": self.train.class_counts(), "test": self.test.class_counts()}
        if self.val is not None:
            row["val"] = self.val.class_counts()
        return row


def pool_sites(sites: Sequence[SiteData], name: str = "pooled") -> SiteData:
    """One hospital holding every given hospital's patches (the centralized setting)."""
    vals = [s.val for s in sites if s.val is not None]
    return SiteData(name, ConcatPatches([s.train for s in sites]), ConcatPatches([s.test for s in sites]),
                    ConcatPatches(vals) if vals else None)


def finish_site(name: str, train: PatchDataset, train_rows: np.ndarray, test: PatchDataset,
                data: DataConfig, seed: int) -> SiteData:
    """A hospital's ``SiteData`` from its training rows of ``train`` and its held-out ``test``.

    In order: a labelled validation split is carved from the training rows (``data.val_fraction``,
    stratified), labels of the rest are withheld (``data.labeled_fraction`` /
    ``data.labeled_per_class``), and with ``data.drop_unlabelled`` the unlabelled patches are left
    out altogether. The same function serves the synthetic and every real data set.
    """
    train_rows = np.asarray(train_rows, dtype=np.int64)
    try:
        keep, val_part = carve_validation(train.labels[train_rows], float(data.val_fraction or 0.0), seed)
        labels = withhold_labels(train.labels[train_rows[keep]], seed=seed, fraction=float(data.labeled_fraction),
                                 per_class=data.labeled_per_class)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    rows = train_rows[keep]
    if data.drop_unlabelled:
        rows, labels = rows[labels >= 0], labels[labels >= 0]
    val = PatchSubset(train, train_rows[val_part]) if len(val_part) else None
    return SiteData(name, PatchSubset(train, rows, labels), test, val)
