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


def test_state_round_trip_keeps_every_tensor_and_continues_identically_after_the_history_wraps() -> None:
    cfg = SelectionConfig(warmup_steps=0, confidence_threshold=0.5, distance_quantile=0.75, history=8,
                          min_history=2, adaptive=True)
    gen = torch.Generator().manual_seed(0)
    selector = SampleSelector(3, 4, cfg)
    for _ in range(5):  # 5 x 6 real features per step: the 8-slot history wraps several times
        selector.update_real(torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen))
        selector.select(torch.randn(6, 4, generator=gen), torch.softmax(torch.randn(6, 3, generator=gen), 1),
                        torch.randint(0, 3, (6,), generator=gen), step=1)
    assert int(selector.filled.max()) > cfg.history
    copy = SampleSelector(3, 4, cfg)
    copy.load_state_dict(selector.state_dict())
    for key, value in selector.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key
    for _ in range(4):
        feats, labels = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        fake, probs = torch.randn(6, 4, generator=gen), torch.softmax(torch.randn(6, 3, generator=gen), 1)
        fake_labels = torch.randint(0, 3, (6,), generator=gen)
        for s in (selector, copy):
            s.update_real(feats, labels)
        assert torch.equal(selector.select(fake, probs, fake_labels, 2), copy.select(fake, probs, fake_labels, 2))
    for key, value in selector.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key


def test_adaptive_thresholds_are_lower_for_classes_that_pass_less_often() -> None:
    cfg = SelectionConfig(warmup_steps=0, confidence_threshold=0.8, adaptive=True, adaptive_momentum=0.0,
                          adaptive_floor=0.25, centroid_distance=False)
    selector = SampleSelector(2, 2, cfg)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.1, 0.9]])
    keep = selector.select(torch.zeros(8, 2), probs, labels, step=0)
    # Class 0 passes 4/4, class 1 1/4: beta = (1, 0.25), threshold = 0.8 * max(beta / (2 - beta), 0.25).
    torch.testing.assert_close(selector.thresholds(), torch.tensor([0.8, 0.8 * 0.25]))
    assert keep.tolist() == [True] * 4 + [True] * 4  # 0.5 >= 0.2 now passes for class 1
    fixed = SampleSelector(2, 2, SelectionConfig(warmup_steps=0, confidence_threshold=0.8, centroid_distance=False))
    assert fixed.select(torch.zeros(8, 2), probs, labels, step=0).tolist() == [True] * 4 + [False] * 3 + [True]


def test_mode_all_keeps_every_candidate_after_the_warm_up_and_none_keeps_none() -> None:
    probs, labels = torch.tensor([[0.1, 0.9]] * 3), torch.tensor([0, 0, 0])
    everything = SampleSelector(2, 2, SelectionConfig(mode="all", warmup_steps=1))
    assert not everything.select(torch.zeros(3, 2), probs, labels, step=0).any()
    assert everything.select(torch.zeros(3, 2), probs, labels, step=1).all()
    nothing = SampleSelector(2, 2, SelectionConfig(mode="none", warmup_steps=0, confidence_threshold=0.0))
    assert not nothing.select(torch.zeros(3, 2), probs, labels, step=5).any()


def test_the_distance_history_keeps_exactly_the_latest_distances_when_it_wraps() -> None:
    cfg = SelectionConfig(history=4, min_history=1, centroid_momentum=0.0)
    selector = SampleSelector(1, 1, cfg)
    written = []
    for value in (1.0, 2.0, 3.0):  # momentum 0: the centroid is each batch's mean
        feats = torch.tensor([[0.0], [2.0 * value]])  # two distances of `value` from the mean `value`
        selector.update_real(feats, torch.zeros(2, dtype=torch.long))
        written += [value, value]
    assert int(selector.filled[0]) == 6
    assert sorted(selector.distances[0].tolist()) == sorted(written[-4:])
