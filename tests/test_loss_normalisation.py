"""selection/pseudo_label.loss_over: the kept rows' loss averaged over themselves or over every candidate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.train.losses import masked_cross_entropy
from common.train.selection import SelectionConfig


def test_candidates_normalisation_divides_the_kept_sum_by_every_candidate() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    mask = torch.tensor([True, False, True, False, False, False])
    per_row = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(masked_cross_entropy(logits, labels, mask), per_row[mask].mean())
    torch.testing.assert_close(masked_cross_entropy(logits, labels, mask, over=6), per_row[mask].sum() / 6)
    assert masked_cross_entropy(logits, labels, torch.zeros(6, dtype=torch.bool), over=6) is None


def test_an_unknown_normalisation_is_refused() -> None:
    with pytest.raises(ValueError, match="loss_over"):
        SelectionConfig(loss_over="mean")
