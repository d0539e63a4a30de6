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


def _pseudo_loss(tiny_cfg, loss_over: str) -> float:
    from common.model import build_model
    from common.train import LocalTrainer, TrainConfig
    from common.train.gate import PseudoLabelGateConfig

    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=4, generated_batch_size=4,
                      pseudo_label=SelectionConfig(mode="rule", warmup_steps=0, confidence_threshold=0.0,
                                                   centroid_distance=False, loss_over=loss_over),
                      pseudo_label_gate=PseudoLabelGateConfig(enabled=False))  # the loss alone, no gate
    trainer = LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0)
    trainer.pseudo.select = lambda features, probs, labels, step: torch.tensor([True, False, False, False])
    images = torch.rand(8, 3, tiny_cfg.image_size, tiny_cfg.image_size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return trainer.step(images, torch.tensor([0, 1, 2, 3, -1, -1, -1, -1]))["cls_pseudo"]


def test_the_unified_step_divides_the_pseudo_label_loss_by_every_unlabelled_patch(tiny_cfg) -> None:
    kept = _pseudo_loss(tiny_cfg, "kept")  # one of the 4 unlabelled patches kept: its own loss
    assert _pseudo_loss(tiny_cfg, "candidates") == pytest.approx(kept / 4, rel=1e-5)
