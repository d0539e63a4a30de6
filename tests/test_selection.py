"""Selective augmentation keeps exactly the confident, near-centroid generated images."""

from __future__ import annotations

import torch

from common.train.selection import SampleSelector, SelectionConfig


def _selector(warmup: int = 5) -> SampleSelector:
    cfg = SelectionConfig(warmup_steps=warmup, confidence_threshold=0.8, distance_quantile=1.0,
                          centroid_momentum=0.0, history=16, min_history=4)
    selector = SampleSelector(num_classes=2, feature_dim=2, cfg=cfg)
    # Class 0 real features on a circle of radius 1 around (0, 0); class 1 around (10, 0), radius 2.
    angles = torch.linspace(0, 2 * torch.pi, 9)[:-1]
    ring = torch.stack([angles.cos(), angles.sin()], dim=1)
    features = torch.cat([ring, ring * 2 + torch.tensor([10.0, 0.0])])
    labels = torch.tensor([0] * 8 + [1] * 8)
    selector.update_real(features, labels)
    return selector


def test_exactly_the_expected_images_are_kept() -> None:
    selector = _selector()
    torch.testing.assert_close(selector.centroids, torch.tensor([[0.0, 0.0], [10.0, 0.0]]), atol=1e-5, rtol=0)
    assert abs(selector.distance_threshold(0) - 1.0) < 1e-5
    assert abs(selector.distance_threshold(1) - 2.0) < 1e-5
    features = torch.tensor([
        [0.5, 0.0],   # class 0, near, confident -> keep
        [0.5, 0.0],   # class 0, near, not confident -> reject
        [3.0, 0.0],   # class 0, far (3 > 1), confident -> reject
        [11.5, 0.0],  # class 1, near (1.5 <= 2), confident -> keep
        [0.0, 0.0],   # class 1 but at class 0's centroid (10 > 2) -> reject
    ])
    labels = torch.tensor([0, 0, 0, 1, 1])
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.1, 0.9], [0.0, 1.0]])
    keep = selector.select(features, probs, labels, step=10)
    assert keep.tolist() == [True, False, False, True, False]
    assert selector.acceptance() == [1 / 3, 1 / 2]


def test_nothing_is_kept_before_the_warm_up() -> None:
    selector = _selector(warmup=5)
    features = torch.zeros(4, 2)
    probs = torch.tensor([[1.0, 0.0]] * 4)
    labels = torch.zeros(4, dtype=torch.long)
    for step in range(5):
        assert not selector.select(features, probs, labels, step=step).any()
    assert selector.select(features, probs, labels, step=5).all()


def test_a_class_without_real_history_keeps_nothing() -> None:
    cfg = SelectionConfig(warmup_steps=0, min_history=4, history=8)
    selector = SampleSelector(num_classes=3, feature_dim=2, cfg=cfg)
    selector.update_real(torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
    keep = selector.select(torch.zeros(2, 2), torch.tensor([[0.0, 0.0, 1.0]] * 2), torch.tensor([2, 2]), step=1)
    assert not keep.any()


def test_state_round_trips() -> None:
    selector = _selector()
    other = SampleSelector(2, 2, selector.cfg)
    other.load_state_dict(selector.state_dict())
    assert other.distance_threshold(1) == selector.distance_threshold(1)
    torch.testing.assert_close(other.centroids, selector.centroids)
