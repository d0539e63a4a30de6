"""Differentiable augmentation: shapes, gradients, reproducibility, label-safe symmetries."""

from __future__ import annotations

import torch

from common.train.augment import AugmentConfig, diff_augment


def test_gradients_flow_through_every_transform() -> None:
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    y = diff_augment(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_same_generator_state_same_output() -> None:
    x = torch.rand(4, 3, 16, 16)
    a = diff_augment(x, AugmentConfig(), torch.Generator().manual_seed(7))
    b = diff_augment(x, AugmentConfig(), torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)


def test_symmetries_only_permute_pixels() -> None:
    x = torch.rand(16, 3, 8, 8)
    cfg = AugmentConfig(color=False, translation=0.0, cutout=0.0, symmetries="d4")
    y = diff_augment(x, cfg, torch.Generator().manual_seed(1))
    for a, b in zip(x, y):
        torch.testing.assert_close(a.flatten().sort().values, b.flatten().sort().values)
    assert not torch.equal(x, y)


def test_disabled_is_identity() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert diff_augment(x, AugmentConfig(enabled=False), torch.Generator()) is x


def _symmetries(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of a square image, as the augmentation numbers them (flip, then k turns)."""
    return [torch.rot90(image.flip(-1) if flip else image, k, dims=(-2, -1)) for flip in (False, True) for k in range(4)]


def test_each_augmented_image_is_one_of_the_8_symmetries_and_all_occur_with_matching_gradients() -> None:
    x = torch.randn(64, 3, 8, 8, requires_grad=True)
    cfg = AugmentConfig(color=False, translation=0.0, cutout=0.0, symmetries="d4")
    y = diff_augment(x, cfg, torch.Generator().manual_seed(3))
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    seen = set()
    for i in range(len(x)):
        matches = [k for k, s in enumerate(_symmetries(x[i].detach())) if torch.equal(s, y[i].detach())]
        assert len(matches) == 1, i  # random images have no symmetry of their own
        k = matches[0]
        seen.add(k)
        # d(sum w * T(x)) / dx = T^-1(w): applying T to the gradient must give back w.
        torch.testing.assert_close(_symmetries(x.grad[i])[k], weights[i], msg=f"image {i}, transform {k}")
    assert seen == set(range(8))


def test_flips_only_mirror_left_right_and_both_occur() -> None:
    x = torch.randn(32, 3, 8, 8)
    cfg = AugmentConfig(color=False, translation=0.0, cutout=0.0, symmetries="flips")
    y = diff_augment(x, cfg, torch.Generator().manual_seed(5))
    kinds = []
    for a, b in zip(x, y):
        same, mirrored = torch.equal(a, b), torch.equal(a.flip(-1), b)
        assert same or mirrored  # never a rotation or an up-down flip
        kinds.append(mirrored)
    assert any(kinds) and not all(kinds)


def test_no_symmetries_leave_orientation_alone() -> None:
    x = torch.randn(32, 3, 8, 8)
    cfg = AugmentConfig(color=False, translation=0.0, cutout=0.0, symmetries="none")
    torch.testing.assert_close(diff_augment(x, cfg, torch.Generator().manual_seed(5)), x)


def test_unknown_symmetries_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="symmetries"):
        AugmentConfig(symmetries="rotations")
