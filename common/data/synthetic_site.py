"""The synthetic data set's loader: each hospital draws its own patches, nothing is read from disk.

A hospital's patches follow its partition: ``iid`` (and ``natural``) give every hospital the same
class mix (hospitals differ in stain already, ``data.stain_shift``), ``dirichlet`` draws each
hospital's class proportions, ``quantity`` shares the totals out in the partition's size shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import ConfigError
from common.data.catalog import register_generated_data_set
from common.data.config import DataConfig, PartitionConfig
from common.data.options import DataSetOptions
from common.data.partition import quantity_split
from common.data.sites import SiteData, finish_site
from common.data.synthetic import CLASS_NAMES, SyntheticHistology
from common.seeds import site_seed


@dataclass(frozen=True, kw_only=True)
class SyntheticOptions(DataSetOptions):
    """``conf/data/synthetic.yaml``: patches per hospital (training, held out) and how far each
    hospital's stain departs from the reference one."""

    train_per_site: int
    test_per_site: int
    stain_shift: float

#: Stream tag of the seeded rng drawing a hospital's Dirichlet class proportions.
_CLASS_MIX = 31


def synthetic_class_weights(partition: PartitionConfig, site: int, seed: int) -> np.ndarray:
    """Class proportions of a synthetic hospital under the partition (uniform but for ``dirichlet``)."""
    k = len(CLASS_NAMES)
    if partition.name in ("iid", "quantity", "natural"):
        return np.ones(k) / k
    if partition.name == "dirichlet":
        weights = np.random.default_rng([seed, _CLASS_MIX, site]).dirichlet(np.full(k, partition.skew_alpha))
        return np.maximum(weights, 1e-3) / np.maximum(weights, 1e-3).sum()
    raise ConfigError(f"partition {partition.name!r} is not available for the synthetic data set; "
                      "use iid, dirichlet, quantity or natural")


def synthetic_site_sizes(options: SyntheticOptions, partition: PartitionConfig, site: int,
                         num_sites: int, seed: int) -> tuple[int, int]:
    """(train, test) patches of a synthetic hospital: ``data.train_per_site`` / ``test_per_site``,
    or under the quantity partition those totals over all hospitals split as ``quantity_split`` does."""
    train, test = int(options.train_per_site), int(options.test_per_site)
    if partition.name != "quantity":
        return train, test
    try:
        train_parts, test_parts = quantity_split(train * num_sites, test * num_sites, num_sites,
                                                 partition.skew_alpha, seed, partition.skew_min_size)
    except ValueError as error:
        raise ConfigError(f"partition quantity: {error}") from error
    return len(train_parts[site]), len(test_parts[site])


def load_site(data: DataConfig, options: SyntheticOptions, partition: PartitionConfig, site: int, num_sites: int,
              image_size: int, seed: int) -> SiteData:
    """Hospital ``site``'s generated training and held-out patches, labels withheld as configured."""
    weights = tuple(synthetic_class_weights(partition, site, seed))
    stain = float(options.stain_shift)
    num_train, num_test = synthetic_site_sizes(options, partition, site, num_sites, seed)
    train = SyntheticHistology(num_train, image_size, site, "train", seed, stain, weights)
    test = SyntheticHistology(num_test, image_size, site, "test", seed, stain, weights)
    return finish_site(f"site-{site}", train, np.arange(len(train)), test, data, site_seed(seed, site))


def class_names(options: SyntheticOptions | None) -> tuple[str, ...]:
    """The synthetic set's five tissue classes (fixed)."""
    return CLASS_NAMES


register_generated_data_set("synthetic", options=SyntheticOptions, load_site=load_site, class_names=class_names)
