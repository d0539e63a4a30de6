"""Book-keeping clipping (common/privacy/bookkeeping.py) against torch.func's per-sample gradients:
the same norms, the same clipped sums, the same DP step; and a clear refusal of what it cannot do."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from common.model import ModelConfig, build_model
from common.privacy.accounting import PrivacyPlan
from common.privacy.bookkeeping import Bookkeeping
from common.privacy.budget import private_train_config
from common.privacy.config import PrivacyConfig, privacy_config
from common.privacy.report import clipping_text
from common.privacy.wiring import DiscriminatorAdapter, DPTraining, clip_and_sum, per_sample_gradients
from common.train import LocalTrainer, TrainConfig
from common.train.losses import fake_adversarial_terms, labelled_cross_entropy, real_adversarial_terms
from common.train.selection import SelectionConfig


def _plan(scope: str, clipping: str, sigma: float = 0.0, clip: float = 0.5, batch: int = 4) -> PrivacyPlan:
    return PrivacyPlan(scope=scope, accountant="rdp", noise_multiplier=sigma, max_grad_norm=clip,
                       expected_batch=batch, sample_rate=batch / 40, delta=1e-5, steps_per_round=3,
                       planned_rounds=2, num_examples=40, labelled_fraction=0.5, max_epsilon=None,
                       clipping=clipping)


def _example_loss(outputs: tuple[torch.Tensor, torch.Tensor], _images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    score, logits = outputs
    return real_adversarial_terms(score, "hinge") + 0.7 * labelled_cross_entropy(logits, labels)


@pytest.mark.parametrize(("classifier_depth", "classifier_grid"), [(0, 0), (1, 0), (0, 2), (1, 2)])
def test_norms_and_weighted_sums_equal_per_sample_gradients(tiny_cfg: ModelConfig, classifier_depth: int,
                                                            classifier_grid: int) -> None:
    """Every covered parameter (blocks, patch embedding, CLS token, position embedding, class
    projection, heads, a head on the pooled patch grid): per-example norms and an arbitrary
    row-weighted sum match torch.func."""
    cfg = dataclasses.replace(tiny_cfg, classifier_depth=classifier_depth, classifier_grid=classifier_grid)
    _assert_matches_torch_func(build_model(cfg, 5, seed=0))


def test_layer_norm_gradients_match_for_any_scale_and_shift(tiny_cfg: ModelConfig) -> None:
    """A LayerNorm's per-example weight gradient is read from its output, ``(y - b) / w``, unless a
    weight is near 0: both ways match torch.func once the LayerNorms have trained scales and shifts
    (fresh ones are w = 1, b = 0, where the shift would not show)."""
    model = build_model(dataclasses.replace(tiny_cfg, classifier_depth=1), 5, seed=0)
    norms = [m for m in model.discriminator.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) >= 4
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.5)
        norms[1].weight[3] = 0.0  # a channel switched off: this one needs its input normalised again
        norms[2].weight[0] = -1e-3
    _assert_matches_torch_func(model)


def _assert_matches_torch_func(model: nn.Module) -> None:
    adapter = DiscriminatorAdapter(model)
    names = [n for n, p in adapter.named_parameters() if p.requires_grad]
    torch.manual_seed(0)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, -1, 3, 4, 1])  # one unlabelled patch: no projection, no cross-entropy

    per_sample, losses = per_sample_gradients(adapter, names, _example_loss, (images, labels))
    _, want_norms = clip_and_sum(per_sample, 1.0)
    weights = torch.tensor([0.3, 1.0, -0.5, 2.0, 0.1])

    book = Bookkeeping(adapter, names, DiscriminatorAdapter.broadcast_parameters)
    with book.record(5) as (record, forward):
        outputs = forward(images, labels)
    got_losses = _example_loss(outputs, images, labels)
    book.backward(record, got_losses.sum())
    torch.testing.assert_close(got_losses.detach(), losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(book.squared_norms(record, slice(None)).sqrt(), want_norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(book.squared_norms(record, slice(1, 3)).sqrt(), want_norms[1:3], rtol=1e-4, atol=1e-6)
    # Layer by layer, so that a small layer's error cannot hide in the total.
    parts = book.squared_norms_by_part(record, slice(None))
    owners = {**{n: n for n in book.broadcast}, **{full: layer for layer, own in book.layers.items() for full in own.values()}}
    assert set(owners) == set(names) and set(parts) == set(owners.values())
    for layer, got in parts.items():
        want = sum(per_sample[n].reshape(5, -1).pow(2).sum(1) for n in names if owners[n] == layer)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9, msg=layer)
    summed = book.weighted_sum(record, weights)
    assert list(summed) == names
    for name in names:
        want = torch.einsum("i,i...->...", weights, per_sample[name])
        torch.testing.assert_close(summed[name], want, rtol=1e-4, atol=1e-6, msg=name)
    # Part by part (group-wise clipping): each part's norms, and sums with each part's own row weights.
    assert book.parts() == ["discriminator", "classifier"]
    by_part = {"discriminator": weights, "classifier": torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0])}
    for part in book.parts():
        want = sum(per_sample[n].reshape(5, -1).pow(2).sum(1) for n in names if n.startswith(part + "."))
        torch.testing.assert_close(book.squared_norms(record, slice(None), part=part), want, rtol=1e-4, atol=1e-9,
                                   msg=part)
    summed = book.weighted_sum(record, by_part)
    for name in names:
        want = torch.einsum("i,i...->...", by_part[name.split(".", 1)[0]], per_sample[name])
        torch.testing.assert_close(summed[name], want, rtol=1e-4, atol=1e-6, msg=name)
    # The recording left nothing behind: no hook fires outside the pass, no parameter has a gradient.
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_the_ghost_norm_and_the_materialised_norm_agree() -> None:
    """The two per-layer norm formulas: a layer wide enough for the ghost norm and one narrow enough
    for the materialised one, each against the per-example gradient by hand."""
    torch.manual_seed(1)
    for tokens, d_in, d_out in ((3, 40, 50), (30, 4, 3)):  # ghost: 9*90 < 3*2000; materialised otherwise
        layer = nn.Linear(d_in, d_out)
        x = torch.randn(4, tokens, d_in)
        book = Bookkeeping(layer, ["weight", "bias"])
        with book.record(4) as (record, forward):
            out = forward(x)
        loss = (out ** 2).sum(dim=(1, 2)) * torch.arange(1.0, 5.0)
        book.backward(record, loss.sum())
        want = []
        for i in range(4):
            grads = torch.autograd.grad(((layer(x[i]) ** 2).sum() * (i + 1)), [layer.weight, layer.bias])
            want.append(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        torch.testing.assert_close(book.squared_norms(record, slice(None)).sqrt(), torch.stack(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scope", ["classifier", "discriminator"])
def test_a_private_gradient_is_the_same_with_either_clipping(tiny_cfg: ModelConfig, scope: str) -> None:
    """Same seed, same batch: book-keeping and vmap give the same noisy gradient (noise included)."""
    model = build_model(tiny_cfg, 5, seed=0)
    torch.manual_seed(2)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, -1, 2, 3, 1, 4])
    results = {}
    for clipping in ("bookkeeping", "vmap"):
        dp = DPTraining(model, _plan(scope, clipping, sigma=1.0, clip=0.05), seed=7)
        assert (dp.bookkeeping is not None) == (clipping == "bookkeeping")
        if scope == "classifier":
            trunk = model.trunk(images)
            noisy, losses = dp.head_gradient(trunk.tokens, trunk.features, labels, weight=0.8)
        else:
            noisy, losses = dp.discriminator_gradient(images, labels, "hinge", weight_adv=1.0, weight_cls=0.5)
        assert dp.history == [(1.0, 0.1, 1)]
        results[clipping] = (noisy, losses)
    assert list(results["bookkeeping"][0]) == list(results["vmap"][0])
    for name, want in results["vmap"][0].items():
        torch.testing.assert_close(results["bookkeeping"][0][name], want, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(results["bookkeeping"][1], results["vmap"][1], rtol=1e-5, atol=1e-6)


def test_the_one_pass_unified_step_updates_the_model_as_the_two_pass_step(tiny_cfg: ModelConfig) -> None:
    """scope=discriminator: real and generated images in one pass (book-keeping) against the
    generated half's ordinary backward plus the real half's torch.func gradients (vmap), for three
    steps with selection active: every weight, the selection counts and the reported losses agree."""
    models, metrics = {}, {}
    for clipping in ("bookkeeping", "vmap"):
        model = build_model(tiny_cfg, 5, seed=0)
        plan = _plan("discriminator", clipping, sigma=1.0, clip=0.5, batch=6)
        dp = DPTraining(model, plan, seed=3)
        cfg = private_train_config(
            TrainConfig(batch_size=6, selection=SelectionConfig(warmup_steps=0, min_history=1, confidence_threshold=0.0)),
            PrivacyConfig(enabled=True, scope="discriminator"))
        trainer = LocalTrainer(model, cfg, seed=0, privacy=dp)
        torch.manual_seed(4)
        steps = []
        for size in (6, 4, 0):  # Poisson batches vary, and may be empty
            images = torch.rand(size, 3, 32, 32) * 2 - 1
            steps.append(trainer.unified_step(images, torch.arange(size) % 5 - (torch.arange(size) == 1).long() * 10))
        models[clipping], metrics[clipping] = model, steps
        assert dp.steps_total == 3
    assert sum(s["selected"] for s in metrics["vmap"]) > 0
    for got, want in zip(metrics["bookkeeping"], metrics["vmap"]):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    trained = dict(models["vmap"].named_parameters())
    for name, p in models["bookkeeping"].named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_generated_images_gradient_is_bounded_by_c_only_with_clip_generated(tiny_cfg: ModelConfig) -> None:
    """privacy.clip_generated: each generated image's D/C gradient is clipped to C / m, so their sum
    is at most C, the bound the real half has (its clipped sum / B); unclipped it is far larger."""
    model = build_model(tiny_cfg, 5, seed=0)
    torch.manual_seed(5)
    fake, fake_labels = torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8) % 5
    no_real, no_labels = torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)

    def generated_loss(score: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return fake_adversarial_terms(score, "hinge").mean() + F.cross_entropy(logits, fake_labels)

    norms = {}
    for clip_generated in (True, False):
        plan = dataclasses.replace(_plan("discriminator", "bookkeeping", clip=0.05), clip_generated=clip_generated)
        grads, _ = DPTraining(model, plan, seed=0).discriminator_gradient_with_generated(
            no_real, no_labels, "hinge", 1.0, 1.0, fake, fake_labels, generated_loss)
        norms[clip_generated] = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
    assert 0.0 < norms[True] <= 0.05 * (1 + 1e-4)
    assert norms[False] > 10 * 0.05


def test_a_layer_it_cannot_handle_is_refused_by_name(tiny_cfg: ModelConfig) -> None:
    class WithBatchNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.norm = nn.BatchNorm1d(2)

    with pytest.raises(ValueError, match=r"norm\.weight, norm\.bias.*privacy\.clipping=vmap"):
        Bookkeeping(WithBatchNorm(), ["linear.weight", "linear.bias", "norm.weight", "norm.bias"])
    with pytest.raises(ValueError, match="patch embedding"):
        Bookkeeping(nn.Conv2d(3, 4, 3, padding=1), ["weight", "bias"])
    with pytest.raises(ValueError, match="leading size 1"):
        Bookkeeping(nn.Linear(3, 2), ["weight"], broadcast=("weight",))
    # Through the DP wiring, a config error that names the key.
    model = build_model(tiny_cfg, 5, seed=0)
    model.discriminator.trunk.extra = nn.Parameter(torch.zeros(2, 4))
    with pytest.raises(ConfigError, match=r"privacy\.clipping=bookkeeping.*discriminator\.trunk\.extra"):
        DPTraining(model, _plan("discriminator", "bookkeeping"), seed=0)
    DPTraining(model, _plan("discriminator", "vmap"), seed=0)  # the generic path takes it


def test_the_clipping_key_is_validated() -> None:
    assert privacy_config({"enabled": True}).clipping == "bookkeeping"
    assert privacy_config({"enabled": True, "clipping": "vmap"}).clipping == "vmap"
    with pytest.raises(ConfigError, match="clipping"):
        privacy_config({"enabled": True, "clipping": "ghost"})


@pytest.mark.parametrize("views", [2, 3])
def test_an_example_of_several_views_has_the_norm_of_its_views_summed_gradient(tiny_cfg: ModelConfig,
                                                                                views: int) -> None:
    """Augmentation multiplicity: an example spans ``views`` consecutive rows (same label, different
    images); its book-keeping norm, layer by layer included the ghost norm over the group's tokens,
    is the norm of its rows' summed torch.func gradients, not the sum of the rows' norms."""
    model = build_model(dataclasses.replace(tiny_cfg, classifier_depth=1), 5, seed=0)
    adapter = DiscriminatorAdapter(model)
    names = [n for n, p in adapter.named_parameters() if p.requires_grad]
    torch.manual_seed(3)
    labels = torch.tensor([2, -1, 4]).repeat_interleave(views)
    images = torch.rand(len(labels), 3, 32, 32) * 2 - 1
    per_row, _ = per_sample_gradients(adapter, names, _example_loss, (images, labels))
    per_example = {n: g.reshape(3, views, *g.shape[1:]).sum(1) for n, g in per_row.items()}
    want = clip_and_sum(per_example, 1.0)[1]
    book = Bookkeeping(adapter, names, DiscriminatorAdapter.broadcast_parameters)
    with book.record(len(labels)) as (record, forward):
        outputs = forward(images, labels)
    book.backward(record, _example_loss(outputs, images, labels).sum())
    torch.testing.assert_close(book.squared_norms(record, slice(None), group=views).sqrt(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(book.squared_norms(record, slice(views, 3 * views), group=views).sqrt(), want[1:],
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(book.squared_norms(record, slice(None)).sqrt().reshape(3, views).sum(1), want, rtol=1e-2)
    with pytest.raises(ValueError, match="whole examples"):
        book.squared_norms(record, slice(0, views + 1), group=views)
    mixed = torch.tensor([2, 3, 4, 4, 1, 1])[:2 * views] if views == 2 else torch.tensor([2, 2, 3, 4, 4, 4, 1, 1, 1])
    with book.record(len(mixed)) as (record, forward):
        outputs = forward(images[:len(mixed)], mixed)
    book.backward(record, _example_loss(outputs, images[:len(mixed)], mixed).sum())
    with pytest.raises(RuntimeError, match="share its label"):
        book.squared_norms(record, slice(None), group=views)


def test_augmentation_multiplicity_clips_each_patch_s_mean_view_gradient_to_c(tiny_cfg: ModelConfig) -> None:
    """privacy.augmentation_multiplicity k: a patch's k views enter one private gradient whose part
    from that patch is the mean of its views' gradients, clipped to C as a whole: with no noise and
    one patch, the private gradient is C times the unit mean-view gradient (so its bound, and the
    guarantee, are one view's), and it counts one DP step."""
    model = build_model(tiny_cfg, 5, seed=0)
    torch.manual_seed(6)
    views, clip = 4, 0.05
    images, labels = torch.rand(views, 3, 32, 32) * 2 - 1, torch.full((views,), 3)
    plan = dataclasses.replace(_plan("discriminator", "bookkeeping", clip=clip, batch=1), augmentations=views)
    dp = DPTraining(model, plan, seed=0)
    noisy, losses = dp.discriminator_gradient(images, labels, "hinge", weight_adv=1.0, weight_cls=1.0)
    assert losses.shape == (1,) and dp.steps_total == 1
    adapter = DiscriminatorAdapter(model)
    names = list(noisy)
    per_row, row_losses = per_sample_gradients(
        adapter, names, lambda o, _i, y: real_adversarial_terms(o[0], "hinge") + 2.0 * labelled_cross_entropy(o[1], y),
        (images, labels))  # labelled_fraction 0.5: the cross-entropy weighs 2
    mean = {n: g.mean(0) for n, g in per_row.items()}
    norm = torch.sqrt(sum((g ** 2).sum() for g in mean.values()))
    assert norm > 10 * clip
    assert float(losses[0]) == pytest.approx(float(row_losses.mean()), rel=1e-5)
    for name in names:
        torch.testing.assert_close(noisy[name], mean[name] * clip / norm, rtol=1e-3, atol=1e-7, msg=name)


def test_augmentation_multiplicity_is_validated() -> None:
    assert privacy_config({"enabled": True}).augmentation_multiplicity == 1
    cfg = privacy_config({"enabled": True, "scope": "discriminator", "augmentation_multiplicity": 4})
    assert cfg.augmentation_multiplicity == 4
    for bad in ({"augmentation_multiplicity": 0}, {"augmentation_multiplicity": 2.5},
                {"augmentation_multiplicity": 2, "scope": "classifier"},
                {"augmentation_multiplicity": 2, "scope": "discriminator", "clipping": "vmap"}):
        with pytest.raises(ConfigError, match="augmentation_multiplicity"):
            privacy_config({"enabled": True, **bad})


@pytest.mark.parametrize("method", ["unified", "supervised"])
def test_a_private_step_with_several_views_trains_and_counts_one_dp_step(tiny_cfg: ModelConfig, method: str) -> None:
    """Both private steps of scope=discriminator take augmentation multiplicity: the model moves,
    the per-patch real loss is reported, and each step is one DP step (the views are not examples)."""
    model = build_model(tiny_cfg, 5, seed=0)
    before = {n: p.detach().clone() for n, p in model.discriminator.named_parameters()}
    plan = dataclasses.replace(_plan("discriminator", "bookkeeping", sigma=1.0, clip=0.5, batch=4), augmentations=3)
    dp = DPTraining(model, plan, seed=1)
    cfg = private_train_config(TrainConfig(batch_size=4, method=method), PrivacyConfig(enabled=True, scope="discriminator"))
    trainer = LocalTrainer(model, cfg, seed=0, privacy=dp)
    torch.manual_seed(2)
    for size in (4, 0):
        images, labels = torch.rand(size, 3, 32, 32) * 2 - 1, torch.arange(size) % 5
        step = trainer.unified_step(images, labels) if method == "unified" else trainer.supervised_step(images, labels)
        assert "real_loss" in step
    assert dp.steps_total == 2
    assert any(not torch.equal(p, before[n]) for n, p in model.discriminator.named_parameters())


def _norm(grads: dict[str, torch.Tensor], part: str | None = None) -> float:
    return float(torch.sqrt(sum((g ** 2).sum() for n, g in grads.items() if part is None or n.startswith(part + "."))))


@pytest.mark.parametrize("freeze_trunk", [True, False])
def test_clipping_part_by_part_bounds_each_part_and_one_patch_s_whole_change_by_c(tiny_cfg: ModelConfig,
                                                                                   freeze_trunk: bool) -> None:
    """privacy.discriminator_clip_share s: one real patch's clipped contribution has its
    discriminator part at most sqrt(s) C and its head part at most sqrt(1 - s) C, so the whole is at
    most C (the sensitivity the noise is calibrated to); with large gradients each part sits at its
    bound. A patch whose adversarial gradient is large keeps the head's share: a flat clip gives the
    head less. Measured as the sensitivity is defined: the step with and without one patch, no noise."""
    model = build_model(tiny_cfg, 5, seed=0)
    torch.manual_seed(8)
    images, labels = torch.rand(3, 3, 32, 32) * 2 - 1, torch.tensor([1, 4, 2])
    fake, fake_labels = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 3])
    clip, share = 0.01, 0.1

    def generated_loss(score: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return fake_adversarial_terms(score, "hinge").mean() + F.cross_entropy(logits, fake_labels)

    def contribution(discriminator_clip_share: float | None) -> dict[str, torch.Tensor]:
        """The third patch's part of the step: (step with it - step without it) * B."""
        plan = dataclasses.replace(_plan("discriminator", "bookkeeping", clip=clip, batch=3), freeze_trunk=freeze_trunk,
                                   discriminator_clip_share=discriminator_clip_share)
        steps = []
        for rows in (3, 2):
            dp = DPTraining(model, plan, seed=0)
            grads, _ = dp.discriminator_gradient_with_generated(images[:rows], labels[:rows], "hinge", 1.0, 1.0,
                                                                fake, fake_labels, generated_loss)
            steps.append(grads)
        return {n: (steps[0][n] - steps[1][n]) * 3 for n in steps[0]}

    split = contribution(share)
    assert _norm(split, "discriminator") == pytest.approx(share ** 0.5 * clip, rel=1e-3)
    assert _norm(split, "classifier") == pytest.approx((1 - share) ** 0.5 * clip, rel=1e-3)
    assert _norm(split) == pytest.approx(clip, rel=1e-3)  # at most C, and C is reached
    flat = contribution(None)
    assert _norm(flat) == pytest.approx(clip, rel=1e-3)
    assert _norm(flat, "classifier") < 0.9 * _norm(split, "classifier")  # D's large gradient took the head's share
    assert any(n.startswith("discriminator.trunk.") for n in split) is not freeze_trunk  # the trunk is D's part


def test_the_discriminator_clip_share_is_validated() -> None:
    assert privacy_config({"enabled": True}).discriminator_clip_share is None
    assert privacy_config({"enabled": True, "scope": "discriminator",
                           "discriminator_clip_share": 0.25}).discriminator_clip_share == 0.25
    for bad in ({"discriminator_clip_share": 0.0}, {"discriminator_clip_share": 1.0},
                {"discriminator_clip_share": True}, {"discriminator_clip_share": "half"},
                {"discriminator_clip_share": 0.2, "scope": "classifier"},
                {"discriminator_clip_share": 0.2, "scope": "discriminator", "clipping": "vmap"}):
        with pytest.raises(ConfigError, match="discriminator_clip_share"):
            privacy_config({"enabled": True, "scope": "discriminator", **bad} if "scope" not in bad
                           else {"enabled": True, **bad})


def test_the_report_says_how_each_patch_was_clipped() -> None:
    """The report's clipping row: part by part with the share and C for the unified model; one flat
    clip for the plain classifier (no adversarial part) and without the share."""
    split = privacy_config({"enabled": True, "scope": "discriminator", "discriminator_clip_share": 0.1})
    text = clipping_text(split, {"train": {"method": "unified"}}, 1.0)
    assert "part by part" in text and "sqrt(0.1) C" in text and "sqrt(0.9) C" in text and "C = 1" in text
    assert "flat" in clipping_text(split, {"train": {"method": "supervised"}}, 1.0)
    assert "flat" in clipping_text(privacy_config({"enabled": True, "scope": "discriminator"}),
                                   {"train": {"method": "unified"}}, 1.0)
