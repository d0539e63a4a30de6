"""train.gan_signals: the GAN's signals reach the classifier only in runs that pass over its labels often."""

from __future__ import annotations

import logging

import pytest
import torch

from common.model import build_model
from common.privacy.budget import private_train_config
from common.privacy.config import PrivacyConfig
from common.train import LocalTrainer, TrainConfig
from common.train.adversarial_scale import AdversarialTrunkConfig
from common.train.gan_signals import GanSignalsConfig, gan_signals_reach_classifier, label_passes
from common.train.selection import SelectionConfig


def test_the_rule_counts_passes_over_the_labelled_patches() -> None:
    assert label_passes(500, 32, 1134) == pytest.approx(14.11, abs=0.01)  # every label, simulate's budget
    assert label_passes(1000, 32, 64) == 500.0  # 5 labels per class
    rule = GanSignalsConfig(min_label_passes=50)
    assert not gan_signals_reach_classifier(rule, 500, 32, 1134)
    assert gan_signals_reach_classifier(rule, 1000, 32, 64)
    assert gan_signals_reach_classifier(rule, 100, 32, 64)  # exactly 50 passes
    assert not gan_signals_reach_classifier(rule, 99, 32, 64)
    assert gan_signals_reach_classifier(GanSignalsConfig(min_label_passes=0), 1, 32, 10_000)  # off


def test_an_unknown_run_length_or_label_count_keeps_the_signals_and_says_so(caplog) -> None:
    rule = GanSignalsConfig(min_label_passes=50)
    with caplog.at_level(logging.WARNING, logger="common.train.gan_signals"):
        assert gan_signals_reach_classifier(rule, None, 32, 1134)
        assert gan_signals_reach_classifier(rule, 500, 32, None)
    assert sum("not applied" in r.getMessage() for r in caplog.records) == 2


def test_a_negative_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="gan_signals.min_label_passes"):
        GanSignalsConfig(min_label_passes=-1)


def _trainer(tiny_cfg, passes: float, labelled: int | None, run_steps: int | None, **train) -> LocalTrainer:
    cfg = TrainConfig(batch_size=4, unlabelled_batch_size=0, generated_batch_size=4,
                      gan_signals=GanSignalsConfig(min_label_passes=passes), **train)
    return LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0, labelled_examples=labelled,
                        run_steps=run_steps)


def _params(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_a_run_short_of_passes_trains_the_classifier_on_its_labels_alone(tiny_cfg) -> None:
    every_image = SelectionConfig(mode="all", warmup_steps=0)
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    short = _trainer(tiny_cfg, 50, labelled=1000, run_steps=100, selection=every_image)  # 0.4 passes
    off = short.step(images, labels)
    assert not short.gan_signals and off["gan_signals"] == 0.0 and off["selected"] == 0.0
    # the same step as a model whose trunk D's gradient does not reach and whose C no generated image teaches
    reference = _trainer(tiny_cfg, 0, labelled=1000, run_steps=100, selection=SelectionConfig(mode="none"),
                         adversarial_trunk=AdversarialTrunkConfig(scale=0.0))
    reference.step(images, labels)
    expected = _params(reference)
    for name, param in _params(short).items():
        torch.testing.assert_close(param, expected[name], msg=name)


def test_a_run_with_many_passes_takes_the_step_it_took_before(tiny_cfg) -> None:
    every_image = SelectionConfig(mode="all", warmup_steps=0)
    images = torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    many = _trainer(tiny_cfg, 50, labelled=16, run_steps=1000, selection=every_image)  # 250 passes
    always = _trainer(tiny_cfg, 0, labelled=16, run_steps=1000, selection=every_image)
    on, before = many.step(images, labels), always.step(images, labels)
    assert many.gan_signals and on["gan_signals"] == 1.0 and on["selected"] == before["selected"] == 4.0
    expected = _params(always)
    for name, param in _params(many).items():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=0, msg=name)


def test_the_run_length_defaults_to_the_schedule_length(tiny_cfg) -> None:
    cfg = TrainConfig(batch_size=4, gan_signals=GanSignalsConfig(min_label_passes=50))
    cfg = TrainConfig(batch_size=4, gan_signals=cfg.gan_signals,
                      optim=type(cfg.optim)(schedule_steps=100))  # 100 x 4 / 1000 = 0.4 passes
    trainer = LocalTrainer(build_model(tiny_cfg, 4, seed=0), cfg, seed=0, labelled_examples=1000)
    assert not trainer.gan_signals


def test_dp_turns_the_rule_off() -> None:
    cfg = TrainConfig(batch_size=4, gan_signals=GanSignalsConfig(min_label_passes=50))
    assert private_train_config(cfg, PrivacyConfig(enabled=True, scope="discriminator")).gan_signals.min_label_passes == 0
    assert private_train_config(cfg, PrivacyConfig(enabled=False)).gan_signals.min_label_passes == 50


def test_the_hospital_counts_the_whole_runs_steps() -> None:
    from client.local_run import run_local_steps
    from common.config import compose_config, plain_config
    from common.run_config import run_config

    typed = run_config(plain_config(compose_config(["federation.rounds=10", "train.local_steps=50"])))
    assert run_local_steps(typed, typed.train) == 500  # simulate's budget: 10 rounds of 50 steps
    scheduled = run_config(plain_config(compose_config(["federation.rounds=10", "train.optim.schedule_steps=3000"])))
    assert run_local_steps(scheduled, scheduled.train) == 3000  # the experiment runner's budget
