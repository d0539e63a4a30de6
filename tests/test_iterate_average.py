"""train.iterate_average: a round ends at the EMA of its iterates, which starts at the round's start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.data.registry import load_site_data
from common.model import ModelConfig, build_model
from common.train import LocalTrainer, TrainConfig
from common.train.averaging import IterateAverage
from common.train.streams import training_batches

DATA = {"name": "synthetic", "root": None, "train_per_site": 40, "test_per_site": 10, "stain_shift": 1.0,
        "labeled_fraction": 1.0, "labeled_per_class": None, "val_fraction": 0.0, "drop_unlabelled": False}


def test_the_average_follows_its_recursion_from_the_initial_parameters() -> None:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average = IterateAverage(layer, 0.5)
    expected = torch.ones(1, 2)
    for value in (3.0, -1.0, 5.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update()
        expected = 0.5 * expected + 0.5 * value
    average.apply()
    assert torch.allclose(layer.weight, expected)  # 1 -> 2 -> 0.5 -> 2.75
    assert float(layer.weight.detach()[0, 0]) == pytest.approx(2.75)


@pytest.mark.parametrize("method", ["unified", "supervised"])
def test_a_round_ends_at_the_average_of_its_iterates(tiny_cfg: ModelConfig, method: str) -> None:
    site = load_site_data(DATA, {"name": "iid"}, 0, 1, 32, seed=0)
    cfg = TrainConfig(method=method, batch_size=4, unlabelled_batch_size=0, iterate_average=0.8)
    model = build_model(tiny_cfg, 5, seed=0)
    trainer = LocalTrainer(model, cfg, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [p.detach().clone() for p in params]
    last: list[torch.Tensor] = []

    def record(step: int, steps: int, losses: dict[str, float]) -> None:
        """After each step (the average is updated before progress is called), the EMA by hand."""
        nonlocal last
        last = [p.detach().clone() for p in params]
        for avg, current in zip(expected, last):
            avg.mul_(0.8).add_(current, alpha=0.2)

    trainer.train_round(training_batches(site.train, cfg, seed=1), steps=4, progress=record)
    moved = [i for i, (a, b) in enumerate(zip(last, expected)) if not torch.allclose(a, b)]
    assert moved, "the last iterate and the average should differ somewhere"
    for p, avg in zip(params, expected):
        assert torch.allclose(p, avg, atol=1e-6)


def test_the_decay_is_checked() -> None:
    with pytest.raises(ValueError, match="iterate_average"):
        TrainConfig(iterate_average=1.0)
