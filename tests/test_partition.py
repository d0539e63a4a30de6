"""Hospital partitions are seeded, disjoint and complete; skew follows alpha; labels are withheld per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError
from common.data import partition as P
from common.data.base import UNLABELLED
from common.data.config import data_config, partition_config
from common.data.errors import DataError
from common.data.registry import data_set_options, load_dataset, load_real_site_data, load_site_data, site_partitions
from common.data.report import partition_report
from common.data.synthetic_site import synthetic_site_sizes
from tests.data_fixtures import ALL_LABELS, NCT_CLASSES, data_section, write_class_folders, write_pcam

LABELS = np.repeat(np.arange(5), [120, 80, 60, 30, 10])  # 300 patches, unbalanced classes


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts if len(p) > 1)


PARTITIONS = {
    "iid": lambda seed: P.iid_partition(LABELS, 4, seed),
    "dirichlet": lambda seed: P.dirichlet_partition(LABELS, 4, 0.3, seed, min_size=5),
    "quantity": lambda seed: P.quantity_partition(len(LABELS), 4, 0.5, seed, min_size=5),
    "groups": lambda seed: P.group_partition(np.arange(len(LABELS)) // 7, 4, seed),
}


@pytest.mark.parametrize("name", sorted(PARTITIONS))
def test_partitions_are_deterministic_disjoint_and_complete(name: str) -> None:
    make = PARTITIONS[name]
    parts = make(0)
    assert len(parts) == 4 and all(len(p) > 0 for p in parts)
    assert_disjoint_cover(parts, len(LABELS))
    assert all(np.array_equal(a, b) for a, b in zip(parts, make(0)))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, make(1)))


def test_iid_gives_every_site_the_same_class_mix() -> None:
    parts = P.iid_partition(LABELS, 4, seed=0)
    counts = np.array([np.bincount(LABELS[p], minlength=5) for p in parts])
    assert (counts.max(0) - counts.min(0)).max() <= 1
    assert P.label_skew(LABELS, parts) < 0.02


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skew = {alpha: np.mean([P.label_skew(LABELS, P.dirichlet_partition(LABELS, 5, alpha, seed)) for seed in range(8)])
            for alpha in (100.0, 1.0, 0.1)}
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[100.0] < 0.1 and skew[0.1] > 0.4


def test_dirichlet_min_size_and_impossible_requests() -> None:
    parts = P.dirichlet_partition(LABELS, 6, 0.1, seed=2, min_size=20)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(ValueError, match="cannot give 10 sites 40 each"):
        P.dirichlet_partition(LABELS, 10, 0.5, seed=0, min_size=40)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        P.dirichlet_partition(LABELS, 3, 0.0, seed=0)


def test_test_split_follows_the_train_proportions() -> None:
    proportions = P.dirichlet_proportions(LABELS, 3, 0.2, seed=4)
    test_labels = np.repeat(np.arange(5), 40)
    train_parts = P.split_by_proportions(LABELS, proportions, 4)
    test_parts = P.split_by_proportions(test_labels, proportions, 5)
    train_counts = np.bincount(LABELS, minlength=5)
    for site, (train, test) in enumerate(zip(train_parts, test_parts)):
        train_share = np.bincount(LABELS[train], minlength=5) / train_counts
        test_share = np.bincount(test_labels[test], minlength=5) / 40
        assert np.all(np.abs(train_share - proportions[:, site]) <= 1 / train_counts + 1e-9)
        assert np.all(np.abs(test_share - proportions[:, site]) <= 1 / 40 + 1e-9)


def test_quantity_skew_grows_as_alpha_shrinks_and_keeps_the_class_mix() -> None:
    def spread(alpha: float) -> float:
        return float(np.mean([np.std([len(p) for p in P.quantity_partition(300, 5, alpha, s)]) for s in range(8)]))
    assert spread(100.0) < spread(1.0) < spread(0.1)
    parts = P.quantity_partition(300, 5, 0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    assert_disjoint_cover(parts, 300)


def test_group_partition_keeps_groups_whole_and_balances_patches() -> None:
    groups = np.repeat(np.arange(12), [30, 5, 5, 20, 10, 10, 8, 8, 4, 4, 16, 20])
    parts = P.group_partition(groups, 3, seed=0)
    owners = [set(groups[p].tolist()) for p in parts]
    assert not (owners[0] & owners[1]) and not (owners[1] & owners[2]) and not (owners[0] & owners[2])
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 10
    with pytest.raises(ValueError, match="12 patient/slide groups cannot be spread over 13 sites"):
        P.group_partition(groups, 13, seed=0)


def test_split_by_groups_never_splits_a_patient_and_stratifies() -> None:
    groups = np.repeat(np.arange(20), 3)
    strata = (np.arange(60) // 3) % 2
    train, val, test = P.split_by_groups(groups, strata, (0.6, 0.2, 0.2), seed=1)
    assert_disjoint_cover([train, val, test], 60)
    assert not set(groups[train]) & set(groups[test]) and not set(groups[val]) & set(groups[test])
    assert set(strata[test].tolist()) == {0, 1} and len(test) == 12


def test_hospital_partition_is_the_recorded_hospital() -> None:
    hospitals = np.array([0, 3, 3, 4, 0, 4])
    assert [p.tolist() for p in P.natural_partition(hospitals, [0, 3, 4])] == [[0, 4], [1, 2], [3, 5]]


# ---------------------------------------------------------------- sites of a real data set
@pytest.fixture(scope="module")
def nct_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nct")
    write_class_folders(root / "NCT-CRC-HE-100K", {c: 12 for c in NCT_CLASSES}, size=8)
    write_class_folders(root / "CRC-VAL-HE-7K", {c: 4 for c in NCT_CLASSES}, size=8)
    return root


def nct(root: Path, **options) -> dict:
    return data_section("nct_crc", root, **{**ALL_LABELS, **options})


@pytest.mark.parametrize("spec", [{"name": "iid"}, {"name": "dirichlet", "alpha": 0.5, "min_size": 3},
                                  {"name": "quantity", "alpha": 1.0, "min_size": 3}])
def test_site_data_partitions_train_and_test(nct_root: Path, spec: dict) -> None:
    sites = [load_real_site_data(nct(nct_root), spec, k, 3, 16, seed=7) for k in range(3)]
    train_idx = [s.train.indices for s in sites]
    test_idx = [s.test.indices for s in sites]
    assert_disjoint_cover(train_idx, 108)
    assert_disjoint_cover(test_idx, 36)
    again = load_real_site_data(nct(nct_root), spec, 1, 3, 16, seed=7)
    assert np.array_equal(again.train.indices, train_idx[1]) and np.array_equal(again.test.indices, test_idx[1])
    assert sites[0].train[0][0].shape == (3, 16, 16)
    assert any("patient" in w for w in sites[0].train.warnings)


def test_labelled_fraction_and_count_are_respected_per_class(nct_root: Path) -> None:
    site = load_real_site_data(nct(nct_root, labeled_fraction=0.25), {"name": "iid"}, 0, 2, 16, seed=1)
    true = site.train.base.labels[site.train.indices]
    for c in range(9):
        in_class = true == c
        kept = int((site.train.labels[in_class] == c).sum())
        assert kept == round(0.25 * in_class.sum())
        assert set(site.train.labels[in_class].tolist()) <= {c, UNLABELLED}
    per_class = load_real_site_data(nct(nct_root, labeled_per_class=2), {"name": "iid"}, 1, 2, 16, seed=1)
    assert np.bincount(per_class.train.labels[per_class.train.labels >= 0], minlength=9).tolist() == [2] * 9
    assert (per_class.test.labels >= 0).all()  # the held-out labels are never withheld
    same = load_real_site_data(nct(nct_root, labeled_per_class=2), {"name": "iid"}, 1, 2, 16, seed=1)
    assert np.array_equal(same.train.labels, per_class.train.labels)


def test_natural_partition_without_ids_and_unknown_names_fail(nct_root: Path) -> None:
    with pytest.raises(DataError, match="needs hospital or patient ids"):
        load_real_site_data(nct(nct_root), {"name": "natural"}, 0, 2, 16, seed=0)
    with pytest.raises(ConfigError, match="partition.name 'stripes' is not known"):
        load_real_site_data(nct(nct_root), {"name": "stripes"}, 0, 2, 16, seed=0)
    with pytest.raises(DataError, match="site 39 of 40 gets 2 training and 0 test patches"):
        load_real_site_data(nct(nct_root), {"name": "iid"}, 39, 40, 16, seed=0)
    with pytest.raises(ConfigError, match="data.name 'mnist' is not a known data set"):
        load_real_site_data({**nct(nct_root), "name": "mnist"}, {"name": "iid"}, 0, 2, 16, seed=0)


def test_load_site_data_dispatches_real_sets(tmp_path: Path) -> None:
    write_pcam(tmp_path, "train", [0, 1] * 6, size=8)
    write_pcam(tmp_path, "test", [0, 1] * 3, size=8)
    site = load_site_data(data_section("pcam", tmp_path, **ALL_LABELS), {"name": "iid"}, 2, 3, 8, seed=0)
    assert site.name == "site-2" and len(site.train) == 4 and len(site.test) == 2
    assert site.report() == {"site": "site-2", "train": {"normal": 2, "tumour": 2},
                             "test": {"normal": 1, "tumour": 1}}
    with pytest.raises(DataError, match=r"data\.root is not set"):
        load_site_data({**data_section("pcam", tmp_path, **ALL_LABELS), "root": None}, {"name": "iid"}, 0, 3, 8, seed=0)
    with pytest.raises(ConfigError, match=r"data: missing required key\(s\) \['labeled_fraction'"):
        load_site_data({"name": "pcam", "root": str(tmp_path)}, {"name": "iid"}, 0, 3, 8, seed=0)  # no shared keys


def test_none_partition_gives_each_site_everything(nct_root: Path) -> None:
    train, test = load_dataset(nct(nct_root), "train", 8), load_dataset(nct(nct_root), "test", 8)
    train_parts, test_parts = site_partitions(train, test, {"name": "none"}, 2, seed=0)
    assert [len(p) for p in train_parts] == [108, 108] and [len(p) for p in test_parts] == [36, 36]


# ---------------------------------------------------------------- synthetic set and report
def test_synthetic_quantity_skew_shares_the_totals() -> None:
    data = data_config({"name": "synthetic", "root": None, "train_per_site": 40, "test_per_site": 10,
                        "stain_shift": 1.0, **ALL_LABELS})
    options = data_set_options(data.section)
    spec = partition_config({"name": "quantity", "alpha": 0.5, "min_size": 4})
    sizes = [synthetic_site_sizes(options, spec, k, 4, seed=3) for k in range(4)]
    assert sum(s[0] for s in sizes) == 160 and sum(s[1] for s in sizes) == 40
    assert min(s[0] for s in sizes) >= 4 and len({s[0] for s in sizes}) > 1
    assert sizes == [synthetic_site_sizes(options, spec, k, 4, seed=3) for k in range(4)]
    assert synthetic_site_sizes(options, partition_config({"name": "iid"}), 0, 4, seed=3) == (40, 10)
    site = load_site_data(data, spec, 1, 4, 16, seed=3)
    assert (len(site.train), len(site.test)) == sizes[1]


def test_partition_report_is_a_markdown_table_of_all_hospitals() -> None:
    rows = [{"site": "site-0", "train": {"a": 3, "b": 1, "unlabelled": 4}, "test": {"a": 2, "b": 2}},
            {"site": "site-1", "train": {"a": 0, "b": 5}, "test": {"a": 1, "b": 0}}]
    text = partition_report(rows)
    lines = text.strip().splitlines()
    assert lines[0] == "| hospital | split | a | b | unlabelled | total |"
    assert lines[1].startswith("|---|---|")
    assert "| site-0 | train | 3 | 1 | 4 | 8 |" in lines
    assert "| site-1 | test | 1 | 0 | 0 | 1 |" in lines
    assert "| **all** | train | 3 | 6 | 4 | 13 |" in lines
    assert partition_report({r["site"]: r for r in rows}) == text


def test_partition_config_names_the_missing_or_bad_key() -> None:
    with pytest.raises(ConfigError, match=r"partition\.alpha is required for partition=dirichlet"):
        partition_config({"name": "dirichlet", "min_size": 3})
    with pytest.raises(ConfigError, match=r"partition\.min_size is required for partition=quantity"):
        partition_config({"name": "quantity", "alpha": 1.0})
    with pytest.raises(ConfigError, match=r"partition: unknown key\(s\) \['alhpa'\]"):
        partition_config({"name": "iid", "alhpa": 1.0})
    with pytest.raises(ConfigError, match=r"partition\.alpha must be > 0"):
        partition_config({"name": "quantity", "alpha": 0, "min_size": 1})
