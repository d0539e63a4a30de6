"""DP-SGD mechanics at one hospital: per-sample clipping (checked by hand), noise, step counting,
Poisson batches, unchanged state-dict keys, and the real-data side channels of each scope."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from common.config import ConfigError
from common.data.synthetic import SyntheticHistology
from common.model import ModelConfig, build_model
from common.model.discriminator import TrunkOutput
from common.privacy.accounting import PrivacyPlan, build_plan, compact, epsilon
from common.privacy.budget import REAL_DATA_METRICS, private_train_config, shared_train_metrics
from common.privacy.config import PrivacyConfig, check_private_training, privacy_config
from common.privacy.scopes import SCOPES
from common.privacy.wiring import DPTraining, attempt_seed, clip_and_sum, per_sample_gradients
from common.train import LocalTrainer, TrainConfig
from common.train.selection import SelectionConfig


def _plan(scope: str, sigma: float = 0.0, clip: float = 0.05, batch: int = 6, n: int = 30,
          labelled_fraction: float = 1.0) -> PrivacyPlan:
    return PrivacyPlan(scope=scope, accountant="rdp", noise_multiplier=sigma, max_grad_norm=clip,
                       expected_batch=batch, sample_rate=batch / n, delta=1e-5, steps_per_round=3,
                       planned_rounds=2, num_examples=n, labelled_fraction=labelled_fraction, max_epsilon=None)


def _flat_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)))


def test_head_gradients_are_clipped_per_sample_exactly_as_by_hand(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg, 5, seed=0)
    clip, big_b = 0.05, 6
    dp = DPTraining(model, _plan("classifier", sigma=0.0, clip=clip, batch=big_b), seed=1)
    assert dp.names == ["classifier.head.weight", "classifier.head.bias"]
    b = 5
    features = torch.randn(b, tiny_cfg.embed_dim) * 3
    tokens = torch.randn(b, 1 + tiny_cfg.num_patches, tiny_cfg.embed_dim)
    labels = torch.tensor([0, 1, 2, -1, 4])  # one unlabelled patch: zero gradient
    weight = 0.7

    # By hand: one example at a time, ordinary autograd, flat clipping over weight and bias.
    head = model.classifier
    expected = [torch.zeros_like(p) for p in head.parameters()]
    norms = []
    for i in range(b):
        logits = head(TrunkOutput(tokens[i:i + 1], features[i:i + 1]))
        loss = weight * F.cross_entropy(logits, labels[i:i + 1].clamp(min=0)) * float(labels[i] >= 0)
        grads = torch.autograd.grad(loss, list(head.parameters()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, head.parameters())]
        norm = _flat_norm(grads)
        norms.append(norm)
        factor = min(1.0, clip / (norm + 1e-6))
        clipped = [g * factor for g in grads]
        assert _flat_norm(clipped) <= clip * (1 + 1e-6)
        expected = [e + c for e, c in zip(expected, clipped)]
    expected = [e / big_b for e in expected]
    assert sum(n > clip for n in norms) >= 3, norms  # the bound really binds
    assert norms[3] == 0.0

    noisy, _ = dp.head_gradient(tokens, features, labels, weight)
    for (name, _), want in zip(head.named_parameters(), expected):
        torch.testing.assert_close(noisy[f"classifier.{name}"], want, rtol=1e-5, atol=1e-7)
    assert dp.history == [(0.0, big_b / 30, 1)] and dp.round_steps == 1

    # The per-sample gradients themselves, and their norms after clipping.
    per_sample, _ = per_sample_gradients(
        dp.adapter, dp.names, lambda logits, _t, _f, y: weight * F.cross_entropy(logits, y.clamp(min=0), reduction="none") * (y >= 0),
        (tokens, features), (labels,))
    _, before = clip_and_sum(per_sample, clip)
    torch.testing.assert_close(before, torch.tensor(norms), rtol=1e-5, atol=1e-6)
    factor = (clip / (before + 1e-6)).clamp(max=1.0)
    after = torch.stack([g.reshape(b, -1).norm(dim=1) for g in per_sample.values()], 1).norm(dim=1) * factor
    assert bool((after <= clip * (1 + 1e-5)).all())


def test_discriminator_scope_clips_every_discriminator_and_classifier_parameter_by_hand(tiny_cfg: ModelConfig) -> None:
    model = build_model(tiny_cfg, 5, seed=0)
    clip, big_b = 0.5, 4
    dp = DPTraining(model, _plan("discriminator", sigma=0.0, clip=clip, batch=big_b), seed=1)
    params = dict(model.named_parameters())
    assert set(dp.names) == {n for n in params if n.startswith(("discriminator.", "classifier."))}
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    labels = torch.tensor([1, -1, 3])
    covered = [params[n] for n in dp.names]
    expected = [torch.zeros_like(p) for p in covered]
    for i in range(3):
        score = model.discriminator.score(model.trunk(images[i:i + 1]).features, labels[i:i + 1])
        logits = model.classify(images[i:i + 1])
        loss = F.relu(1 - score).sum() + 0.5 * F.cross_entropy(logits, labels[i:i + 1].clamp(min=0)) * float(labels[i] >= 0)
        grads = torch.autograd.grad(loss, covered, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, covered)]
        factor = min(1.0, clip / (_flat_norm(grads) + 1e-6))
        expected = [e + g * factor for e, g in zip(expected, grads)]
    noisy, _ = dp.discriminator_gradient(images, labels, "hinge", weight_adv=1.0, weight_cls=0.5)
    for name, want in zip(dp.names, expected):
        torch.testing.assert_close(noisy[name], want / big_b, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(n.startswith("generator.") for n in noisy)


@pytest.mark.parametrize("scope", ["classifier", "discriminator"])
def test_an_empty_poisson_batch_is_a_noisy_step_and_is_counted(tiny_cfg: ModelConfig, scope: str) -> None:
    model = build_model(tiny_cfg, 5, seed=0)
    plan = _plan(scope, sigma=2.0, clip=1.5, batch=1)
    dp = DPTraining(model, plan, seed=3)
    if scope == "classifier":
        noisy, _ = dp.head_gradient(torch.zeros(0, 65, 64), torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), 1.0)
    else:
        noisy, _ = dp.discriminator_gradient(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), "hinge", 1.0, 1.0)
    values = torch.cat([v.reshape(-1) for v in noisy.values()])
    assert values.numel() > 300
    assert abs(float(values.std()) / (2.0 * 1.5) - 1.0) < 0.15  # pure N(0, (sigma C)^2) / B, B = 1
    assert dp.history == [(2.0, plan.sample_rate, 1)]

    # Through the trainer: an empty real batch still takes (and counts) one DP step.
    cfg = private_train_config(TrainConfig(batch_size=4), PrivacyConfig(enabled=True, scope=scope))
    trainer = LocalTrainer(model, cfg, seed=0, privacy=dp)
    head_before = model.classifier.head.weight.detach().clone()
    trainer.unified_step(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    assert dp.steps_total == 2
    assert not torch.equal(head_before, model.classifier.head.weight)


def test_poisson_batches_vary_in_size_and_every_attempt_draws_afresh(tiny_cfg: ModelConfig) -> None:
    data = SyntheticHistology(20, 32, seed=2)
    model = build_model(tiny_cfg, 5, seed=0)
    dp = DPTraining(model, _plan("classifier", sigma=1.0, batch=2, n=20), seed=5)
    sizes = [len(labels) for _, labels in dp.poisson_loader(data, 40)]
    assert len(sizes) == 40 and len(set(sizes)) > 2 and 0 in sizes  # q = 0.1: empty batches happen
    assert dp.state_dict() == {}  # no generator state is kept, so none can be restored and replayed

    def draws(seed: int | None) -> tuple[list[list[int]], torch.Tensor]:
        fresh = DPTraining(model, _plan("classifier", sigma=1.0, batch=2, n=20), seed=seed)
        batches = [labels.tolist() for _, labels in fresh.poisson_loader(data, 8)]
        noisy, _ = fresh.head_gradient(torch.zeros(0, 65, 64), torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), 1.0)
        return batches, noisy["classifier.head.weight"]

    first, second = draws(None), draws(None)  # two attempts, secret OS seeds
    assert first[0] != second[0] and not torch.equal(first[1], second[1])
    seeded = draws(attempt_seed(7, "data", 3, "site-0"))
    again = draws(attempt_seed(7, "data", 3, "site-0"))
    assert seeded[0] == again[0] and torch.equal(seeded[1], again[1])  # the reproducible test mode
    assert not torch.equal(draws(attempt_seed(7, "data", 4, "site-0"))[1], seeded[1])  # the next attempt differs
    # Another hospital partitioning the same folder (one data-set key) draws other noise.
    assert not torch.equal(draws(attempt_seed(7, "data", 3, "site-1"))[1], seeded[1])


@pytest.mark.parametrize("change", [{"scale": 0.5}, {"adaptive": True}, {"ramp_fraction": 0.5}])
def test_dp_refuses_an_adversarial_trunk_setting_its_step_would_ignore(tiny_cfg: ModelConfig, change: dict) -> None:
    """The private step does not scale D's adversarial gradient into the trunk: a run that asks for it
    is refused (by the trainer, and by the check the coordinator and each hospital run before anything
    is trained), not silently trained without it; the defaults, and the same setting without DP, pass."""
    def trainer(train: TrainConfig, private: bool) -> LocalTrainer:
        model = build_model(tiny_cfg, 5, seed=0)
        dp = DPTraining(model, _plan("discriminator", batch=4, n=20), seed=0) if private else None
        return LocalTrainer(model, train, seed=0, privacy=dp)

    base = TrainConfig(batch_size=4, optim=dataclasses.replace(TrainConfig().optim, schedule_steps=100))
    changed = dataclasses.replace(base, adversarial_trunk=dataclasses.replace(base.adversarial_trunk, **change))
    trainer(base, private=True)
    trainer(changed, private=False)
    with pytest.raises(ValueError, match="adversarial_trunk"):
        trainer(changed, private=True)
    private = PrivacyConfig(enabled=True, scope="discriminator")
    check_private_training(base, private)
    check_private_training(changed, PrivacyConfig(enabled=False))
    with pytest.raises(ConfigError, match="adversarial_trunk"):  # the coordinator's one refusal at start
        check_private_training(changed, private)


@pytest.mark.parametrize("scope", ["classifier", "discriminator"])
def test_state_dict_keys_with_dp_equal_those_without(tiny_cfg: ModelConfig, scope: str) -> None:
    data = SyntheticHistology(24, 32, seed=4)
    plain = build_model(tiny_cfg, 5, seed=0)
    private = build_model(tiny_cfg, 5, seed=0)
    cfg = TrainConfig(batch_size=6, local_steps=2)
    LocalTrainer(plain, cfg, seed=0).train_round(torch.utils.data.DataLoader(data, batch_size=6), 2)
    dp = DPTraining(private, _plan(scope, sigma=1.0, batch=6, n=24), seed=0)
    trainer = LocalTrainer(private, private_train_config(cfg, PrivacyConfig(enabled=True, scope=scope)), seed=0, privacy=dp)
    trainer.train_round(dp.poisson_loader(data, 2), 2)
    assert list(private.state_dict()) == list(plain.state_dict())
    assert not any("_module" in k for k in private.state_dict())
    assert dp.steps_total == 2
    local = trainer.state_dict()
    assert not any(k.startswith("privacy.") for k in local)  # fresh randomness: nothing to restore
    assert not any(k.startswith(("generator.", "discriminator.", "classifier.")) for k in local)


def test_discriminator_scope_closes_the_real_data_side_channels(tiny_cfg: ModelConfig) -> None:
    pcfg = PrivacyConfig(enabled=True, scope="discriminator")
    cfg = private_train_config(TrainConfig(batch_size=6, selection=SelectionConfig(warmup_steps=0, min_history=1,
                                                                                 confidence_threshold=0.0)), pcfg)
    assert cfg.weighting.enabled is False  # learned loss weights: off
    data = SyntheticHistology(24, 32, seed=4)
    model = build_model(tiny_cfg, 5, seed=0)
    dp = DPTraining(model, _plan("discriminator", sigma=1.0, batch=6, n=24), seed=0)
    trainer = LocalTrainer(model, cfg, seed=0, privacy=dp)
    log_vars = trainer.weighting.log_vars.detach().clone()
    metrics = trainer.train_round(dp.poisson_loader(data, 3), 3)
    assert not bool(trainer.selector.initialised.any())  # no real class centroids were formed
    assert float(trainer.selector.filled.sum()) == 0
    assert metrics.selected_images > 0  # selection still runs, by the private classifier's confidence
    torch.testing.assert_close(trainer.weighting.log_vars, log_vars, rtol=0, atol=0)
    shared = shared_train_metrics(metrics.as_flat_dict(), pcfg)
    assert not set(REAL_DATA_METRICS) & set(shared)
    assert "loss/cls_synthetic" in shared or "loss/adv_generator" in shared
    # scope=classifier keeps them (declared as not covered in the report).
    assert shared_train_metrics(metrics.as_flat_dict(), PrivacyConfig(enabled=True)) == metrics.as_flat_dict()


def test_the_config_is_validated_and_the_plan_derives_noise_and_delta() -> None:
    assert privacy_config(None).enabled is False
    with pytest.raises(ConfigError, match="scope"):
        privacy_config({"enabled": True, "scope": "everything"})
    with pytest.raises(ConfigError, match="both set"):
        privacy_config({"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 3.0})
    with pytest.raises(ConfigError, match="accountant"):
        privacy_config({"accountant": "gdp"})
    cfg = privacy_config({"enabled": True, "noise_multiplier": None, "target_epsilon": 8.0})
    plan = build_plan(cfg, num_examples=50, num_labelled=50, batch_size=10, steps_per_round=4, planned_rounds=3)
    assert plan.delta == 1e-5 < 1 / 50 and plan.sample_rate == 0.2
    reached = epsilon([(plan.noise_multiplier, 0.2, 12)], plan.delta, "rdp")
    assert 7.9 <= reached <= 8.0  # the derived noise spends the target over the planned steps
    with pytest.raises(ConfigError, match="not below 1/n"):
        build_plan(dataclasses.replace(cfg, delta=0.05), 50, 50, 10, 4, 3)
    assert compact([(1.0, 0.1, 2), (1.0, 0.1, 3), (2.0, 0.1, 1)]) == [(1.0, 0.1, 5), (2.0, 0.1, 1)]


@pytest.mark.parametrize("scope", ["classifier", "discriminator"])
def test_the_realised_batch_size_does_not_steer_the_trainers_own_randomness(tiny_cfg: ModelConfig, scope: str) -> None:
    """Generated images and their augmentation must not depend on how many patches Poisson drew."""
    states = []
    for b in (2, 5):
        model = build_model(tiny_cfg, 5, seed=0)
        dp = DPTraining(model, _plan(scope, sigma=1.0, batch=4, n=20), seed=0)
        cfg = private_train_config(TrainConfig(batch_size=4), PrivacyConfig(enabled=True, scope=scope))
        trainer = LocalTrainer(model, cfg, seed=0, privacy=dp)
        trainer.unified_step(torch.rand(b, 3, 32, 32) * 2 - 1, torch.arange(b) % 5)
        states.append(trainer.rng.get_state())
    assert torch.equal(states[0], states[1])


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for _, g in sorted(grads.items())])


@pytest.mark.parametrize("scope", ["classifier", "discriminator"])
def test_one_added_patch_moves_a_steps_sum_by_its_own_clipped_gradient_at_most_c(tiny_cfg: ModelConfig, scope: str) -> None:
    """Add/remove-one, as the accountant assumes: with the same draws, a step on D + {x} differs from a
    step on D by x's own clipped gradient (norm <= C) and nothing else, although x changes the
    training set's size and labelled count: the plan (q, B, loss scale) comes from the released noisy
    counts, which both data sets share. Scaling by the exact counts, as before, moved every term."""
    clip, big_b = (0.05, 4) if scope == "classifier" else (0.5, 4)
    cfg = PrivacyConfig(enabled=True, scope=scope, noise_multiplier=1.0, max_grad_norm=clip)
    plan = build_plan(cfg, num_examples=40, num_labelled=17, batch_size=big_b, steps_per_round=3, planned_rounds=2)
    plan = dataclasses.replace(plan, noise_multiplier=0.0)  # noiseless, to see the sums themselves
    model = build_model(tiny_cfg, 5, seed=0)
    torch.manual_seed(3)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, -1, 2, 3, 1])  # D: four patches, one unlabelled; x (the last) is labelled

    def step_sum(p: PrivacyPlan, rows: slice) -> torch.Tensor:
        dp = DPTraining(model, p, seed=0)
        if scope == "classifier":
            trunk = model.trunk(images[rows])
            noisy, _ = dp.head_gradient(trunk.tokens, trunk.features, labels[rows], weight=1.0)
        else:
            noisy, _ = dp.discriminator_gradient(images[rows], labels[rows], "hinge", weight_adv=1.0, weight_cls=1.0)
        assert dp.history == [(0.0, p.sample_rate, 1)]  # one step at the plan's rate, whatever the batch
        return _flat(noisy) * p.expected_batch  # the sum of clipped per-sample gradients

    d, dx, x = step_sum(plan, slice(0, 4)), step_sum(plan, slice(0, 5)), step_sum(plan, slice(4, 5))
    torch.testing.assert_close(dx - d, x, rtol=1e-4, atol=1e-6)  # x's own term and nothing else
    assert float((dx - d).norm()) <= clip * (1 + 1e-4)
    assert float(x.norm()) == pytest.approx(clip, rel=1e-3)  # the bound is reached: the sensitivity is exactly C
    # What exact counts would do (seen without clipping, which can hide it): D has 3 labelled of 4,
    # D + {x} 4 of 5, and a loss scale that follows them moves every other patch's term too.
    loose = dataclasses.replace(plan, max_grad_norm=1e6)
    released = step_sum(loose, slice(0, 5)) - step_sum(loose, slice(0, 4)) - step_sum(loose, slice(4, 5))
    assert float(released.norm()) <= 1e-5 * float(step_sum(loose, slice(0, 4)).norm())
    exact_d, exact_dx = (dataclasses.replace(loose, labelled_fraction=f) for f in (3 / 4, 4 / 5))
    moved = step_sum(exact_dx, slice(0, 5)) - step_sum(exact_d, slice(0, 4)) - step_sum(exact_dx, slice(4, 5))
    assert float(moved.norm()) > 1e-3 * float(step_sum(loose, slice(0, 4)).norm())


def test_the_count_release_has_sensitivity_sqrt2_and_is_accounted_as_such(tmp_path) -> None:  # noqa: ANN001
    """Adding a labelled patch moves (n, labelled) by (1, 1): L2 sensitivity sqrt(2). With noise std s
    the ledger records noise multiplier s / sqrt(2) at rate 1, one step."""
    from common.privacy.accounting import counts_noise_multiplier, noisy_counts
    from common.privacy.budget import SitePrivacy
    from common.privacy.ledger import PrivacyLedger

    def release(n: int, labelled: int) -> tuple[int, int]:
        return noisy_counts(n, labelled, 1e-9, torch.Generator().manual_seed(0))

    (n0, l0), (n1, l1) = release(40, 17), release(41, 18)
    assert ((n1 - n0) ** 2 + (l1 - l0) ** 2) ** 0.5 == pytest.approx(2 ** 0.5)
    ledger = PrivacyLedger.in_folder(tmp_path)
    privacy = SitePrivacy.open(ledger, "data", {}, "run-a", 1, [])
    counts = privacy.release_counts(PrivacyConfig(enabled=True, count_noise_std=6.0), 40, 17, lambda attempt: attempt)
    assert counts.noise_std == 6.0 and counts_noise_multiplier(6.0) == pytest.approx(6.0 / 2 ** 0.5)
    assert ledger.history("data") == [(pytest.approx(6.0 / 2 ** 0.5), 1.0, 1)]
    # Released once: a second hospital process reuses them at no new cost.
    again = SitePrivacy.open(ledger, "data", {}, "run-b", 1, [])
    assert again.release_counts(PrivacyConfig(enabled=True), 40, 17, lambda attempt: attempt) == counts
    assert len(ledger.load().attempts["data"]) == 1


@pytest.mark.parametrize("scope", ["classifier", "discriminator"])
def test_the_dp_learning_rate_drives_exactly_the_scopes_covered_optimisers(tiny_cfg: ModelConfig, scope: str) -> None:
    """privacy.learning_rate replaces train.optim's rate of each group the scope's DP-SGD trains (the
    head; or the trunk and the head) and no other; null, or DP off, leaves train.optim's."""
    train = TrainConfig(batch_size=4)
    base = {"discriminator": train.optim.lr_discriminator, "classifier": train.optim.lr_classifier}
    assert 3e-3 not in base.values()
    model = build_model(tiny_cfg, 5, seed=0)
    dp = DPTraining(model, _plan(scope, batch=4, n=20), seed=0)
    trainer = LocalTrainer(model, private_train_config(train, PrivacyConfig(enabled=True, scope=scope,
                                                                            learning_rate=3e-3)), seed=0, privacy=dp)
    rates = {group: {g["lr"] for g in opt.param_groups}
             for group, opt in (("discriminator", trainer.opt_discriminator), ("classifier", trainer.opt_classifier))}
    covered = set(SCOPES[scope].dp_groups)
    assert rates == {group: {3e-3} if group in covered else {base[group]} for group in base}
    for pcfg in (PrivacyConfig(enabled=True, scope=scope, learning_rate=None),
                 PrivacyConfig(enabled=False, learning_rate=3e-3)):
        assert private_train_config(train, pcfg).optim == train.optim
    with pytest.raises(ConfigError, match="learning_rate"):
        privacy_config({"learning_rate": 0})


@pytest.mark.parametrize("scope", ["classifier", "discriminator"])
def test_dp_turns_pseudo_labels_off_because_its_step_has_no_pseudo_label_loss(scope: str) -> None:
    cfg = TrainConfig(pseudo_label=SelectionConfig(mode="rule"))
    assert private_train_config(cfg, PrivacyConfig(enabled=False)).pseudo_label.mode == "rule"
    private = private_train_config(cfg, PrivacyConfig(enabled=True, scope=scope))
    assert private.pseudo_label.mode == "none" and not private.pseudo_label.enabled
    assert private.weighting.enabled == (scope == "classifier")


@pytest.mark.parametrize("clipping", ["bookkeeping", "vmap"])
def test_the_adversarial_weight_scales_ds_adversarial_part_of_the_private_step(tiny_cfg: ModelConfig,
                                                                               clipping: str) -> None:
    """privacy.adversarial_weight multiplies D's adversarial losses (real and generated halves) inside
    the clipped step: at 0 the adversarial head gets no gradient at all (no noise here), at 1 it does."""
    grads = {}
    for weight in (0.0, 1.0):
        model = build_model(tiny_cfg, 5, seed=0)
        plan = dataclasses.replace(_plan("discriminator", sigma=0.0, clip=1.0, batch=4, n=20), clipping=clipping,
                                   adversarial_weight=weight)
        dp = DPTraining(model, plan, seed=0)
        cfg = private_train_config(TrainConfig(batch_size=4), PrivacyConfig(enabled=True, scope="discriminator"))
        trainer = LocalTrainer(model, cfg, seed=0, privacy=dp)
        trainer.unified_step(torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4) % 5)
        head = model.discriminator.adv_head
        grads[weight] = float(sum(p.grad.abs().sum() for p in head.parameters() if p.grad is not None))
        assert model.classifier.head.weight.grad is not None and model.classifier.head.weight.grad.abs().sum() > 0
    assert grads[0.0] == 0.0 and grads[1.0] > 0.0
