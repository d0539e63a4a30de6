"""One hospital's data from a data set and a partition.

``data.name`` picks the data set from the registry in ``common/data/catalog.py``, where each data-set
module registers itself with its options (a dataclass of the keys ``conf/data/<name>.yaml`` sets):
how the classes are named before any data is read, and either a file loader (``load(root, options,
split, image_size) -> PatchDataset`` and ``splits(options) -> {split: on-disk name}``) or, for the
built-in synthetic set, how a hospital's patches are generated (``common.data.synthetic_site``). A
hospital of a file-backed set trains on its partition of ``data.train_split`` (labels withheld per
``data.labeled_fraction`` / ``data.labeled_per_class``) and evaluates on its part of
``data.test_split``: its own patches under the natural partition, otherwise the test split
partitioned the same way (same class proportions or size shares as its training part).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import common.data.partition as partitioning
from common.config import CONF_DIR, ConfigError, load_yaml, to_plain

# Every data-set module registers itself on import (common/data/catalog.py); a new one is imported here.
from common.data import breakhis, camelyon17, catalog, imagefolder, nct_crc, pathmnist, pcam, synthetic_site  # noqa: F401
from common.data.base import PatchDataset, PatchSubset
from common.data.catalog import data_set, file_data_set
from common.data.config import DataConfig, PartitionConfig, data_config, partition_config
from common.data.errors import DataError
from common.data.options import SITE_KEYS, data_root
from common.data.sites import SiteData, finish_site
from common.seeds import held_out_seed, site_seed

logger = logging.getLogger("fedvitgan.data")

def data_set_names(files_only: bool = False) -> list[str]:
    """Every data set ``data.name`` can pick (this module imports them all, so all are registered)."""
    return catalog.data_set_names(files_only)


def data_set_options(data_cfg: Mapping[str, Any] | Any) -> Any:
    """The options of the data set ``data.name`` picks, from the ``data`` section (``ConfigError``
    naming a key it does not know or one that is not set)."""
    cfg = to_plain(data_cfg)
    return data_set(cfg.get("name")).read_options(cfg)


def dataset_splits(data_cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The split names the configured data set offers (e.g. train, val, test)."""
    cfg = to_plain(data_cfg)
    entry = file_data_set(cfg.get("name"))
    assert entry.splits is not None  # file-backed
    return tuple(entry.splits(entry.read_options(cfg)))


def load_dataset(data_cfg: Mapping[str, Any], split: str, image_size: int) -> PatchDataset:
    """Split ``split`` of the data set ``data_cfg`` describes, with patches of ``image_size`` pixels.

    Raises ``DataError`` (root, file, key, shape, dtype, label or image unusable) or ``ConfigError``
    (unknown ``data.name``, or an option it does not know or lacks).
    """
    cfg = to_plain(data_cfg)
    entry = file_data_set(cfg.get("name"))
    assert entry.load is not None  # file-backed
    if int(image_size) < 1:
        raise ConfigError(f"image size must be >= 1, got {image_size}")
    options = entry.read_options(cfg)
    dataset = entry.load(data_root(options), options, split, int(image_size))
    for warning in dataset.warnings:
        logger.warning("%s (%s split %s)", warning, cfg.get("name"), split)
    return dataset


def site_splits(data_cfg: Mapping[str, Any]) -> tuple[str, str]:
    """The (train, test) split names the hospitals of a file-backed data set use."""
    options = file_data_set(to_plain(data_cfg).get("name")).read_options(data_cfg)
    return str(options.train_split), str(options.test_split)


def hospital_data_section(name: str, run_data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` section of a hospital whose own data set ``name`` differs from the run's
    ``data.name``: its options from ``conf/data/<name>.yaml`` as this code ships it, and the keys every
    data set shares (labels kept, validation carve, symmetries) from the run."""
    path = CONF_DIR / "data" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"data set {name!r} (the hospital's node config 'dataset') is not a known data set; "
                          f"choose one of {data_set_names()}")
    shared = {k: v for k, v in to_plain(run_data).items() if k in SITE_KEYS and k not in ("name", "root")}
    return {**load_yaml(path), **shared, "name": name}


def shipped_option(name: str, key: str) -> Any:
    """``key`` of ``conf/data/<name>.yaml`` as this copy of the code ships it, not as a run's config
    says: what a deployed hospital falls back on for a choice the coordinator must not make."""
    path = CONF_DIR / "data" / f"{name}.yaml"
    values = load_yaml(path)
    if key not in values:
        raise ConfigError(f"{path} does not set {key}")
    return values[key]


def _natural(train: PatchDataset, test: PatchDataset, num_sites: int, seed: int, where: str
             ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if train.hospitals is not None and test.hospitals is not None:
        ids = [int(h) for h in np.unique(train.hospitals)]
        if len(ids) != num_sites:
            raise DataError(f"{where}: the natural partition has {len(ids)} hospitals {ids} in the training "
                            f"split, so it needs federation.num_sites={len(ids)} (got {num_sites}); for "
                            f"Camelyon17-WILDS, data.val_center=null data.test_center=null federates all five")
        train_parts = partitioning.natural_partition(train.hospitals, ids)
        test_parts = partitioning.natural_partition(test.hospitals, ids)
        empty = [ids[k] for k, p in enumerate(test_parts) if len(p) == 0]
        if empty:
            raise DataError(f"{where}: hospital(s) {empty} have no held-out patches in the test split; expected "
                            f"some for each hospital (set data.test_split to a split that has them)")
        return train_parts, test_parts
    if train.groups is not None and test.groups is not None:
        return (partitioning.group_partition(train.groups, num_sites, seed),
                partitioning.group_partition(test.groups, num_sites, held_out_seed(seed)))
    raise DataError(f"{where}: the natural partition needs hospital or patient ids, and this data set records "
                    f"neither; use partition=iid, dirichlet or quantity")


def site_partitions(train: PatchDataset, test: PatchDataset, spec: PartitionConfig | Mapping[str, Any],
                    num_sites: int, seed: int, where: str = "data") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Index arrays per site into ``train`` and ``test`` under partition ``spec`` (its config section)."""
    spec = partition_config(spec)
    name = spec.name
    try:
        if name == "iid":
            return (partitioning.iid_partition(train.labels, num_sites, seed),
                    partitioning.iid_partition(test.labels, num_sites, held_out_seed(seed)))
        if name == "dirichlet":
            proportions = partitioning.dirichlet_proportions(train.labels, num_sites, spec.skew_alpha, seed,
                                                             spec.skew_min_size)
            rows = max(len(proportions), int(test.labels.max()) + 1 if len(test) else 0)
            if rows > len(proportions):  # a class only the test split has: spread it evenly
                proportions = np.vstack([proportions, np.full((rows - len(proportions), num_sites), 1 / num_sites)])
            return (partitioning.split_by_proportions(train.labels, proportions, seed),
                    partitioning.split_by_proportions(test.labels, proportions, held_out_seed(seed)))
        if name == "quantity":
            return partitioning.quantity_split(len(train), len(test), num_sites, spec.skew_alpha, seed,
                                               spec.skew_min_size)
        if name == "natural":
            return _natural(train, test, num_sites, seed, where)
        return [np.arange(len(train))] * num_sites, [np.arange(len(test))] * num_sites  # none
    except ValueError as error:
        raise DataError(f"{where}: partition {name!r} over {num_sites} sites is impossible: {error}") from error


def load_real_site_data(data: DataConfig | Mapping[str, Any], partition: PartitionConfig | Mapping[str, Any],
                        site: int, num_sites: int, image_size: int, seed: int) -> SiteData:
    """Hospital ``site``'s ``SiteData`` from a file-backed data set: its training part (labels withheld
    as configured) and its held-out part."""
    typed, spec = data_config(data), partition_config(partition)
    cfg = typed.section
    train_split, test_split = site_splits(cfg)
    train = load_dataset(cfg, train_split, image_size)
    test = load_dataset(cfg, test_split, image_size)
    where = f"data set {cfg.get('name')!r} at {Path(str(cfg.get('root')))}"
    if train.class_names != test.class_names:
        raise DataError(f"{where}: split {train_split!r} has classes {list(train.class_names)} but split "
                        f"{test_split!r} has {list(test.class_names)}; expected the same classes (set "
                        f"data.class_names to fix the order)")
    train_parts, test_parts = site_partitions(train, test, spec, num_sites, seed, where)
    train_idx, test_idx = train_parts[site], test_parts[site]
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError(f"{where}: site {site} of {num_sites} gets {len(train_idx)} training and "
                        f"{len(test_idx)} test patches under partition {spec.name!r}; expected "
                        f"some of each (use fewer sites or another partition)")
    return finish_site(f"site-{site}", train, train_idx, PatchSubset(test, test_idx), typed, site_seed(seed, site))


def load_site_data(data: DataConfig | Mapping[str, Any], partition: PartitionConfig | Mapping[str, Any], site: int,
                   num_sites: int, image_size: int, seed: int) -> SiteData:
    """The data of hospital ``site`` (0-based) out of ``num_sites``, at ``image_size`` pixels."""
    typed, spec = data_config(data), partition_config(partition)
    if not 0 <= site < num_sites:
        raise ConfigError(f"site {site} is outside 0..{num_sites - 1}")
    entry = data_set(typed.section.get("name"))
    if entry.load_site is not None:
        return entry.load_site(typed, entry.read_options(typed.section), spec, site, num_sites, image_size, seed)
    return load_real_site_data(typed, spec, site, num_sites, image_size, seed)


def configured_class_names(data: Mapping[str, Any]) -> tuple[str, ...]:
    """Class names the federation's model is built for, known before any hospital's data is read.

    The synthetic set's are fixed; a file-backed set's come from ``data.class_names`` in its config
    (the loaders check each hospital's data against them), or, for class folders, from the folder
    names under ``data.root`` when it is readable here.
    """
    data = to_plain(data)
    entry = data_set(data.get("name"))
    if not entry.file_backed:  # fixed by the generator: a run folder's config may be partial
        return entry.class_names(None)
    if data.get("class_names"):  # what every file-backed set's class_names gives when they are set
        return tuple(str(n) for n in data["class_names"])
    return entry.class_names(entry.read_options(data))
