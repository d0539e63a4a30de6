"""Training methods are registered: a new one is its step function and one registration."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError
from common.data.registry import load_site_data
from common.model import ModelConfig, build_model
from common.privacy.config import PrivacyConfig, check_private_method
from common.train import LocalTrainer, TrainConfig, method_registry
from common.train.methods import TrainingMethod, method_names, register_method, training_method
from common.train.streams import training_batches

DATA = {"name": "synthetic", "root": None, "train_per_site": 40, "test_per_site": 10, "stain_shift": 1.0,
        "labeled_fraction": 1.0, "labeled_per_class": 2, "val_fraction": 0.0, "drop_unlabelled": False}


def head_only_step(trainer: LocalTrainer, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """A new method for the test: cross-entropy of the labelled rows, the trunk frozen."""
    keep = labels >= 0
    with torch.no_grad():
        trunk = trainer.model.trunk(real[keep])
    loss = torch.nn.functional.cross_entropy(trainer.model.classifier(trunk), labels[keep])
    trainer.opt_classifier.zero_grad(set_to_none=True)
    loss.backward()
    trainer.opt_classifier.step()
    trainer.global_step += 1
    return {"cls_real": float(loss.detach()), "selected": 0.0, "rows": float(real.shape[0])}


@pytest.fixture
def private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test stay in a copy of the registry."""
    monkeypatch.setattr(method_registry.METHODS, "_entries", dict(method_registry.METHODS._entries))


def test_the_built_in_methods_and_what_they_declare() -> None:
    assert method_names() == ("unified", "supervised", "semi_supervised")
    assert method_names(private_only=True) == ("unified", "supervised")
    assert training_method("unified").trains_generator and not training_method("unified").needs_labels
    assert training_method("supervised").labelled_only
    with pytest.raises(ValueError, match="method must be one of .*'unified'.*got 'gan_only'"):
        TrainConfig(method="gan_only")


def test_a_registered_method_trains_through_the_trainer(private_registry: None, tiny_cfg: ModelConfig) -> None:
    register_method(TrainingMethod("head_only", step=head_only_step, labelled_only=True))
    cfg = TrainConfig(method="head_only", batch_size=4, unlabelled_batch_size=6)
    model = build_model(tiny_cfg, 5, seed=0)
    trunk_before = model.discriminator.trunk.patch_embed.proj.weight.clone()
    head_before = [p.clone() for p in model.classifier.parameters()]
    trainer = LocalTrainer(model, cfg, seed=0)
    site = load_site_data(DATA, {"name": "iid"}, 0, 1, 32, seed=0)
    seen: list[dict[str, float]] = []
    trainer.train_round(training_batches(site.train, cfg, seed=1), steps=3,
                        progress=lambda step, total, losses: seen.append(dict(losses)))
    assert trainer.global_step == 3 and len(seen) == 3
    assert all(step["rows"] == 4 for step in seen)  # labelled_only: the unlabelled stream is not drawn
    assert torch.equal(model.discriminator.trunk.patch_embed.proj.weight, trunk_before)
    assert any(not torch.equal(a, b) for a, b in zip(model.classifier.parameters(), head_before))
    assert not cfg.uses_generator


def test_dp_is_refused_for_a_method_without_a_private_step(private_registry: None, tiny_cfg: ModelConfig) -> None:
    register_method(TrainingMethod("head_only", step=head_only_step))
    with pytest.raises(ConfigError, match="train.method=head_only: DP-SGD is implemented for train.method "
                                          "unified and supervised only"):
        check_private_method("head_only", PrivacyConfig(enabled=True))
    with pytest.raises(ValueError, match="registered twice"):
        register_method(TrainingMethod("supervised", step=head_only_step))
