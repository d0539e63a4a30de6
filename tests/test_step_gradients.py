"""One unified step and one plain-classifier step, whatever forms the gradients: the trainer's gradient
strategy (common/train/step_gradients.py) is the only thing DP-SGD replaces."""

from __future__ import annotations

import torch

from common.model import ModelConfig, build_model
from common.train import LocalTrainer, TrainConfig
from common.train.engine import Backpropagation
from common.train.step_gradients import DiscriminatorUpdate, GeneratedBatch, RealBatch


class RecordingGradients(Backpropagation):
    """Back-propagation that records what the trainer hands it and makes a fixed number of images."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.calls: list[tuple[str, int, int]] = []

    def generated_rows(self, trainer: LocalTrainer, real_rows: int) -> int:
        return self.rows

    def update_discriminator(self, trainer: LocalTrainer, batch: RealBatch,
                             generated: GeneratedBatch) -> DiscriminatorUpdate:
        self.calls.append(("discriminator", batch.size, int(generated.images.shape[0])))
        return super().update_discriminator(trainer, batch, generated)

    def update_classifier(self, trainer: LocalTrainer, batch: RealBatch) -> dict[str, float]:
        self.calls.append(("classifier", batch.size, 0))
        return super().update_classifier(trainer, batch)


def test_the_unified_step_takes_d_and_c_from_the_strategy_and_trains_g_itself(tiny_cfg: ModelConfig) -> None:
    model = build_model(tiny_cfg, 5, seed=0)
    strategy = RecordingGradients(rows=3)
    trainer = LocalTrainer(model, TrainConfig(batch_size=4), seed=0)
    trainer.gradients = strategy
    generator = [p.detach().clone() for p in model.generator.parameters()]
    step = trainer.step(torch.rand(6, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, -1, -1, 4]))
    assert strategy.calls == [("discriminator", 6, 3)]  # the strategy's batch size, not the real batch's
    assert trainer.global_step == 1
    assert {"adv_discriminator", "adv_generator", "aux_generated", "selected"} <= step.keys()
    assert all(isinstance(v, float) for v in step.values())
    assert any(not torch.equal(a, b) for a, b in zip(generator, model.generator.parameters()))


def test_the_plain_classifier_step_goes_through_the_strategy_too(tiny_cfg: ModelConfig) -> None:
    strategy = RecordingGradients(rows=3)
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), TrainConfig(method="supervised"), seed=0)
    trainer.gradients = strategy
    step = trainer.step(torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, -1, 3]))
    assert strategy.calls == [("classifier", 4, 0)] and trainer.global_step == 1
    assert step["cls_real"] > 0


def test_without_a_strategy_the_trainer_back_propagates(tiny_cfg: ModelConfig) -> None:
    trainer = LocalTrainer(build_model(tiny_cfg, 5, seed=0), TrainConfig(), seed=0)
    assert isinstance(trainer.gradients, Backpropagation) and trainer.privacy is None
