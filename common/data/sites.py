"""One hospital's data: its training partition (some labels maybe withheld) and held-out split.

``load_site_data`` is what a ClientApp calls, in simulation and in deployment alike. For the
synthetic set every hospital draws its own patches, with its own stain profile, in the class
proportions its partition gives it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import ConfigError, to_plain
from common.data.base import ConcatPatches, PatchDataset, PatchSubset
from common.data.errors import DataError
from common.data.labels import carve_validation, withhold_labels
from common.data.partition import quantity_shares, split_by_shares
from common.data.synthetic import CLASS_NAMES, SyntheticHistology


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
                data: Mapping[str, Any], seed: int) -> SiteData:
    """A hospital's ``SiteData`` from its training rows of ``train`` and its held-out ``test``.

    In order: a labelled validation split is carved from the training rows (``data.val_fraction``,
    stratified), labels of the rest are withheld (``data.labeled_fraction`` /
    ``data.labeled_per_class``), and with ``data.drop_unlabelled`` the unlabelled patches are left
    out altogether. The same function serves the synthetic and every real data set.
    """
    train_rows = np.asarray(train_rows, dtype=np.int64)
    try:
        keep, val_part = carve_validation(train.labels[train_rows], float(data.get("val_fraction") or 0.0), seed)
        labels = withhold_labels(train.labels[train_rows[keep]], seed=seed,
                                 fraction=float(data.get("labeled_fraction", 1.0)),
                                 per_class=data.get("labeled_per_class"))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    rows = train_rows[keep]
    if data.get("drop_unlabelled"):
        rows, labels = rows[labels >= 0], labels[labels >= 0]
    val = PatchSubset(train, train_rows[val_part]) if len(val_part) else None
    return SiteData(name, PatchSubset(train, rows, labels), test, val)


def synthetic_class_weights(partition: Mapping[str, Any], site: int, num_sites: int, seed: int) -> np.ndarray:
    """Class proportions of a synthetic hospital under the partition (iid or dirichlet).

    The quantity-skew and natural partitions keep the class mix uniform (every synthetic hospital
    already differs from the others in stain, ``data.stain_shift``).
    """
    name = partition.get("name", "iid")
    k = len(CLASS_NAMES)
    if name in ("iid", "quantity", "natural"):
        return np.ones(k) / k
    if name == "dirichlet":
        alpha = float(partition.get("alpha", 0.5))
        if alpha <= 0:
            raise ConfigError(f"partition.alpha must be > 0, got {alpha}")
        weights = np.random.default_rng([seed, 31, site]).dirichlet(np.full(k, alpha))
        return np.maximum(weights, 1e-3) / np.maximum(weights, 1e-3).sum()
    raise ConfigError(f"partition {name!r} is not available for the synthetic data set; "
                      "use iid, dirichlet, quantity or natural")


def synthetic_site_sizes(data: Mapping[str, Any], partition: Mapping[str, Any], site: int,
                         num_sites: int, seed: int) -> tuple[int, int]:
    """(train, test) patches of a synthetic hospital: ``data.train_per_site`` / ``test_per_site``,
    or under the quantity partition those totals over all hospitals shared out in Dirichlet(alpha)
    shares (at least ``partition.min_size`` each)."""
    train, test = int(data["train_per_site"]), int(data["test_per_site"])
    if partition.get("name", "iid") != "quantity":
        return train, test
    try:
        shares = quantity_shares(num_sites, float(partition.get("alpha", 0.5)), seed)
        min_size = int(partition.get("min_size", 1))
        train_sizes = [len(p) for p in split_by_shares(train * num_sites, shares, seed, min_size)]
        test_sizes = [len(p) for p in split_by_shares(test * num_sites, shares, seed + 1, 1)]
    except ValueError as error:
        raise ConfigError(f"partition quantity: {error}") from error
    return train_sizes[site], test_sizes[site]


def load_site_data(
    data: Mapping[str, Any],
    partition: Mapping[str, Any],
    site: int,
    num_sites: int,
    image_size: int,
    seed: int,
) -> SiteData:
    """The data of hospital ``site`` (0-based) out of ``num_sites``, at ``image_size`` pixels."""
    data, partition = to_plain(data), to_plain(partition)
    if not 0 <= site < num_sites:
        raise ConfigError(f"site {site} is outside 0..{num_sites - 1}")
    name = data.get("name")
    if name != "synthetic":
        from common.data.registry import load_real_site_data  # real layouts (issue: data sets)

        return load_real_site_data(data, partition, site, num_sites, image_size, seed)
    weights = synthetic_class_weights(partition, site, num_sites, seed)
    stain = float(data.get("stain_shift", 1.0))
    num_train, num_test = synthetic_site_sizes(data, partition, site, num_sites, seed)
    train = SyntheticHistology(num_train, image_size, site, "train", seed, stain, tuple(weights))
    test = SyntheticHistology(num_test, image_size, site, "test", seed, stain, tuple(weights))
    return finish_site(f"site-{site}", train, np.arange(len(train)), test, data, seed * 1000 + site)


def configured_class_names(data: Mapping[str, Any]) -> tuple[str, ...]:
    """Class names the federation's model is built for, known before any hospital's data is read.

    The synthetic set's are fixed; a real data set's come from ``data.class_names`` in its config
    (the loaders check each hospital's data against them), or, for a loader that can name them from
    the files (class folders), from ``data.root`` when it is readable here.
    """
    data = to_plain(data)
    if data.get("name") == "synthetic":
        return CLASS_NAMES
    names = data.get("class_names")
    if not names and data.get("name") == "imagefolder":
        from common.data.imagefolder import default_class_names

        try:
            return default_class_names(data)
        except DataError as error:
            raise ConfigError(f"data.class_names is not set, and the class folders cannot be read here to name "
                              f"the classes: {error}. List the classes (in label order) as data.class_names") from error
    if not names:
        raise ConfigError(f"data.class_names is not set for data set {data.get('name')!r}; list the classes "
                          "(in label order) in its conf/data file or on the command line")
    return tuple(str(n) for n in names)
