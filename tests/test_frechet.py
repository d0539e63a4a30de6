"""Generator-quality distances: zero for a set against itself, growing with blur and stain shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data.synthetic import CLASS_NAMES, SyntheticHistology
from common.evaluation.frechet import (
    frechet_distance,
    generator_quality,
    reference_classifier,
    reference_features,
    stain_statistics,
)


def _patches(n: int, site: int, split: str, stain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    data = SyntheticHistology(n, 32, site=site, split=split, seed=4, stain_shift=stain)
    items = [data[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _blur(images: torch.Tensor) -> torch.Tensor:
    kernel = torch.ones(3, 1, 5, 5) / 25.0
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)


def test_frechet_distance_matches_the_closed_form_for_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2.0 + 1.0  # mean shift 1 per dim, std 2: FD = 3 + 3 * (1 + 4 - 2 * 2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)
    with pytest.raises(ValueError, match="need two"):
        frechet_distance(a[:1], b)


def test_the_reference_classifier_ships_and_recognises_the_synthetic_classes() -> None:
    images, labels = _patches(200, site=0, split="test")
    model = reference_classifier()
    with torch.no_grad():
        predicted = model.classify(images).argmax(1)
    assert (predicted == labels).float().mean() > 0.7
    assert not any(p.requires_grad for p in model.parameters())


def test_distance_is_near_zero_for_a_set_against_itself_and_grows_with_blur_and_stain_shift() -> None:
    real, real_labels = _patches(300, site=0, split="test")
    other, other_labels = _patches(300, site=0, split="val")  # same distribution, other patches
    shifted, _ = _patches(300, site=0, split="val", stain=3.0)
    names = CLASS_NAMES
    features = reference_features(real)
    assert frechet_distance(features, features) < 1e-6
    same = frechet_distance(features, reference_features(other))
    blurred = frechet_distance(features, reference_features(_blur(other)))
    stained = frechet_distance(features, reference_features(shifted))
    assert blurred > 2 * same and stained > 2 * same, (same, blurred, stained)
    stain_same = frechet_distance(stain_statistics(real), stain_statistics(other))
    stain_shifted = frechet_distance(stain_statistics(real), stain_statistics(shifted))
    assert stain_shifted > 5 * stain_same, (stain_same, stain_shifted)
    report = generator_quality(real, real_labels, real, real_labels, names)
    assert report["frechet_overall"] < 1e-6 and max(report["frechet_per_class"].values()) < 1e-6
    worse = generator_quality(real, real_labels, _blur(other), other_labels, names)
    assert worse["frechet_overall"] > generator_quality(real, real_labels, other, other_labels, names)["frechet_overall"]
