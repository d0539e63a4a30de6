"""The classification head's view of where things are: ``model.classifier_grid`` adds the patch
tokens, normalised and pooled over a g x g grid, to the CLS feature the head reads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.model import build_model, model_preset
from common.model.discriminator import TrunkOutput, grid_pooled


def test_each_grid_cell_averages_only_the_patches_of_its_part_of_the_image() -> None:
    tokens = torch.randn(2, 1 + 64, 16)
    marked = tokens.clone()
    patches = marked[:, 1:].view(2, 8, 8, 16)
    patches[:, :4, :4] += torch.randn(2, 4, 4, 16) * 5  # the top-left quarter of the image only
    before, after = grid_pooled(tokens, 2).view(2, 16, 4), grid_pooled(marked, 2).view(2, 16, 4)  # (B, D, cells)
    changed = (before - after).abs().amax(dim=(0, 1))
    assert changed[0] > 0.1 and torch.all(changed[1:] == 0)
    # normalised per token, without parameters: a token's scale does not matter
    assert torch.allclose(grid_pooled(tokens * 7.0, 4), grid_pooled(tokens, 4), atol=1e-5)


@pytest.mark.parametrize("classifier_depth", [0, 1])
def test_with_a_grid_the_head_reads_the_patches_and_without_one_the_cls_feature_alone(classifier_depth: int) -> None:
    base = dataclasses.replace(model_preset("tiny"), classifier_depth=classifier_depth)
    with_grid = build_model(dataclasses.replace(base, classifier_grid=2), 3, seed=0).eval()
    without = build_model(base, 3, seed=0).eval()
    assert with_grid.classifier.head.in_features == 5 * base.embed_dim
    assert without.classifier.head.in_features == base.embed_dim
    trunk = with_grid.trunk(torch.rand(4, 3, 32, 32))
    moved = TrunkOutput(trunk.tokens.clone(), trunk.features)
    moved.tokens[:, 1:] = torch.randn_like(moved.tokens[:, 1:])  # other patch tokens, the same CLS token
    with torch.no_grad():
        assert not torch.allclose(with_grid.classifier(trunk), with_grid.classifier(moved))
        if classifier_depth == 0:
            assert torch.allclose(without.classifier(trunk), without.classifier(moved))
    assert with_grid.classify(torch.rand(4, 3, 32, 32)).shape == (4, 3)


def test_a_grid_finer_than_the_patches_or_not_an_integer_is_refused() -> None:
    tiny = model_preset("tiny")
    for grid in (-1, 9, 1.5, True):
        with pytest.raises(ValueError, match=r"classifier_grid must be an integer in \[0, 8\]"):
            dataclasses.replace(tiny, classifier_grid=grid)
