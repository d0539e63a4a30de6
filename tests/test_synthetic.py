"""The synthetic histology generator is deterministic, class-balanced and stain-shifted per site."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.base import PatchSubset, uint8_to_tensor
from common.data.stain import reference_profile, site_profile
from common.data.synthetic import CLASS_NAMES, SyntheticHistology


def test_same_seed_same_pixels_in_any_order() -> None:
    a = SyntheticHistology(40, 32, site=1, seed=3)
    b = SyntheticHistology(40, 32, site=1, seed=3, cache=False)
    assert np.array_equal(a.labels, b.labels)
    for i in (39, 0, 17):
        assert np.array_equal(a.load_uint8(i), b.load_uint8(i))


def test_other_seed_or_split_gives_other_patches() -> None:
    a = SyntheticHistology(20, 32, seed=0)
    b = SyntheticHistology(20, 32, seed=1)
    c = SyntheticHistology(20, 32, seed=0, split="test")
    assert not np.array_equal(a.load_uint8(0), b.load_uint8(0))
    assert not np.array_equal(a.load_uint8(0), c.load_uint8(0))


def test_hospitals_differ_in_stain() -> None:
    p0, p1 = site_profile(0, 0, 1.0), site_profile(1, 0, 1.0)
    assert not np.allclose(p0.stains, p1.stains)
    assert np.allclose(site_profile(0, 0, 0.0).stains, reference_profile().stains)
    # Same tissue concentrations rendered at two sites give different colours.
    tissue = np.array([[1.2, 0.5, 0.0], [0.1, 0.8, 0.0]])
    assert np.abs(p0.render(tissue) - p1.render(tissue)).max() > 0.02
    # And whole data sets differ in mean colour, per class.
    a, b = SyntheticHistology(100, 32, site=0), SyntheticHistology(100, 32, site=1)
    mean_a = np.mean([a.load_uint8(i).reshape(-1, 3).mean(0) for i in range(100)], axis=0)
    mean_b = np.mean([b.load_uint8(i).reshape(-1, 3).mean(0) for i in range(100)], axis=0)
    assert np.abs(mean_a - mean_b).max() > 2.0


def test_labels_balanced_and_items_well_formed() -> None:
    ds = SyntheticHistology(103, 32)
    counts = np.bincount(ds.labels, minlength=len(CLASS_NAMES))
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    image, label = ds[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label == int(ds.labels[5])
    assert ds.class_counts() == dict(zip(CLASS_NAMES, counts.tolist()))


def test_other_image_sizes_render() -> None:
    assert SyntheticHistology(2, 96).load_uint8(1).shape == (96, 96, 3)


def test_class_weights_skew_the_labels() -> None:
    ds = SyntheticHistology(100, 32, class_weights=(4, 1, 0, 0, 0))
    assert np.bincount(ds.labels, minlength=5).tolist() == [80, 20, 0, 0, 0]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        SyntheticHistology(10, split="validation")
    with pytest.raises(ValueError, match="class_weights"):
        SyntheticHistology(10, class_weights=(1, 1))


def test_subset_withholds_labels_but_keeps_pixels() -> None:
    ds = SyntheticHistology(10, 32)
    sub = PatchSubset(ds, [3, 4], labels=np.array([-1, ds.labels[4]]))
    assert sub[0][1] == -1
    torch.testing.assert_close(sub[0][0], uint8_to_tensor(ds.load_uint8(3)))
    assert sub.class_counts()["unlabelled"] == 1
