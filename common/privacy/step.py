"""DP-SGD's updates of a step (``DPTraining``, the gradient strategy of a trainer built with ``privacy``;
``common/train/step_gradients.py``): the unified step's D/C update and the plain classifier's update.

It sees the DP machinery only through :class:`PrivateGradients` (``common/privacy/wiring.py`` implements it).

Differences from the plain step (``common/train/engine.py``), all needed for the guarantee:

- the real batch is a Poisson sample (its size varies and may be 0); the generated batch has a
  fixed, public size (``train.generated_batch_size``, or B, the expected real batch, when that is
  null), and real patches are augmented with the DP
  generator's randomness, so nothing the trainer's own generator drives depends on the realised size;
- real-image losses are summed per example and divided by B, not averaged over the realised batch;
- the covered parameters receive ``(sum_i clip_C(g_i) + N(0, sigma^2 C^2)) / B`` for the real patches'
  gradients ``g_i`` (``common/privacy/wiring.py``) plus the gradient of the generated images'
  losses, which depend on the data only through earlier private outputs. In scope=discriminator
  each generated image's gradient is clipped too (``privacy.clip_generated``, default), to C / m for
  m generated images: their sum is then bounded by C like the real half's, and cannot swamp it (an
  unclipped generated half is often 10x the clipped real one, and Adam's step sizes then follow it);
- scope=discriminator: with ``privacy.augmentation_multiplicity`` k > 1 each real patch enters the
  pass as k independently augmented views whose mean gradient is clipped as the patch's one
  gradient (De et al. 2022); the bound per patch, and so the guarantee, are those of one view;
- scope=discriminator, unified step: D's adversarial losses (real and generated halves) are weighted
  by ``privacy.adversarial_weight`` (default 0.2) inside each clipped gradient, so that the labels'
  part gets most of the clipping bound (a public constant: no effect on the guarantee);
- scope=classifier: the head's real-image gradient is the private one; the trunk still learns from the
  real images without DP through a copy of the head with frozen weights (declared: no end-to-end
  guarantee);
- scope=discriminator: D and C learn from real images only through the private gradient. With
  ``privacy.clipping=bookkeeping`` (default) real and generated images share one D/C pass whose
  real rows are clipped and noised (``common/privacy/bookkeeping.py``); with ``vmap`` the generated
  half has its own pass and the real half's per-sample gradients come from ``torch.func``. The two
  real-data side channels are disabled here: the loss weights are fixed (the trainer is built with
  ``weighting.enabled=false``, see ``common/privacy/budget.py``), and selective augmentation keeps a
  generated image by the (private) classifier's confidence alone, without real class centroids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.model.discriminator import TrunkOutput
from common.privacy.accounting import PrivacyPlan
from common.train.augment import diff_augment
from common.train.losses import (
    fake_adversarial_terms,
    labelled_cross_entropy,
    masked_cross_entropy,
    real_adversarial_terms,
)
from common.train.step_gradients import DiscriminatorUpdate, GeneratedBatch, RealBatch
from common.train.transfer import host_rows

if TYPE_CHECKING:
    from common.train.engine import LocalTrainer


class PrivateGradients(Protocol):
    """What the private step needs from the DP machinery (``common.privacy.wiring.DPTraining``
    implements it): the plan, the DP generator for the real patches' augmentation, and the noisy
    gradients of the covered parameters."""

    plan: PrivacyPlan
    augment_rng: torch.Generator
    bookkeeping: object | None

    def prefetch(self, device: torch.device) -> None: ...

    def head_gradient(self, tokens: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                      weight: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...

    def discriminator_gradient(self, images: torch.Tensor, labels: torch.Tensor, adversarial_loss: str,
                               weight_adv: float, weight_cls: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...

    def generated_bound(self, rows: int) -> float | None: ...

    def observe_public(self, images: torch.Tensor, labels: torch.Tensor, adversarial_loss: str, weight_adv: float,
                       weight_cls: float) -> None: ...

    def generated_gradient(self, images: torch.Tensor, labels: torch.Tensor, adversarial_loss: str,
                           weight_adv: float, weights_cls: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def discriminator_gradient_with_generated(
        self, images: torch.Tensor, labels: torch.Tensor, adversarial_loss: str, weight_adv: float, weight_cls: float,
        generated: torch.Tensor, generated_labels: torch.Tensor,
        generated_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...


def select_by_confidence(trainer: LocalTrainer, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Selective augmentation without real-data statistics: keep a generated image of class y when
    the classifier's confidence in y reaches the threshold (after the warm-up); counts as ``select``.
    Returns a host mask."""
    selector, cfg = trainer.selector, trainer.selector.cfg
    probs, labels = probs.detach().float().cpu(), labels.cpu()
    selector.proposed += torch.bincount(labels, minlength=selector.num_classes)
    if not cfg.enabled or trainer.global_step < cfg.warmup_steps:
        return torch.zeros(len(labels), dtype=torch.bool)
    keep = probs.gather(1, labels.view(-1, 1)).squeeze(1) >= cfg.confidence_threshold
    if cfg.mode == "all":
        keep = torch.ones(len(labels), dtype=torch.bool)
    selector.accepted += torch.bincount(labels[keep], minlength=selector.num_classes)
    return keep


def _augment_real(trainer: LocalTrainer, dp: PrivateGradients, real: torch.Tensor) -> torch.Tensor:
    """DiffAugment of the real batch from the DP generator (its draws depend on the batch size,
    which must not leak into the trainer's generator); an empty batch passes through."""
    if real.shape[0] == 0:
        return real
    return diff_augment(real, trainer.cfg.augment, dp.augment_rng)


def _views(real: torch.Tensor, labels: torch.Tensor, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each real patch and its label repeated ``views`` times, consecutively (augmentation
    multiplicity, ``privacy.augmentation_multiplicity``): augmented afterwards, every copy draws its
    own transform, and the private gradient clips each patch's rows together."""
    if views == 1:
        return real, labels
    return real.repeat_interleave(views, 0), labels.repeat_interleave(views, 0)


def _add_grads(module: nn.Module, grads: dict[str, torch.Tensor], prefix: str) -> None:
    """Add ``grads`` (this step's own tensors, by full parameter name) to ``module``'s ``.grad``; a
    parameter without a gradient takes its tensor as is (nothing else holds it: no copy)."""
    for name, p in module.named_parameters():
        extra = grads.get(f"{prefix}.{name}")
        if extra is None:
            continue
        p.grad = extra if p.grad is None else p.grad + extra


def _classifier_scope(trainer: LocalTrainer, dp: PrivateGradients, real: torch.Tensor, labels: torch.Tensor,
                      labels_host: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
                      fake_labels_host: torch.Tensor) -> dict[str, torch.Tensor | float | None]:
    model, cfg = trainer.model, trainer.cfg
    b, big_b = real.shape[0], dp.plan.expected_batch
    both = torch.cat([_augment_real(trainer, dp, real), diff_augment(fake.detach(), cfg.augment, trainer.rng)])
    all_labels = torch.cat([labels, fake_labels])
    trunk = model.trunk(both)
    score = model.discriminator.score(model.classifier.centred_features(trunk.features), all_labels)
    adv_d = real_adversarial_terms(score[:b], cfg.adversarial_loss).sum() / big_b \
        + fake_adversarial_terms(score[b:], cfg.adversarial_loss).mean()
    labelled = labels_host >= 0
    real_trunk = TrunkOutput(trunk.tokens[:b], trunk.features[:b])
    fake_trunk = TrunkOutput(trunk.tokens[b:], trunk.features[b:])
    # The trunk learns from the real labels (no DP: not covered) through a frozen copy of the head;
    # the head itself learns from them only through the private gradient below.
    frozen = {n: p.detach() for n, p in model.classifier.named_parameters()}
    logits_real = functional_call(model.classifier, frozen, (real_trunk,))
    cls_real = None
    if bool(labelled.any()):
        cls_real = labelled_cross_entropy(logits_real, labels).sum() / (big_b * dp.plan.labelled_fraction)
    logits_fake = model.classifier(fake_trunk)
    # Class centroids of real features steer selection here without DP (declared, not covered).
    labelled_rows = host_rows(labelled, trainer.device)
    trainer.selector.update_real(trunk.features[:b].index_select(0, labelled_rows), labels_host[labelled])
    keep = trainer.selector.select(trunk.features[b:], F.softmax(logits_fake.detach(), dim=1), fake_labels_host,
                                   trainer.global_step)
    cls_syn = masked_cross_entropy(logits_fake, fake_labels, keep)
    loss_d = trainer.discriminator_objective(adv_d, cls_real, cls_syn)
    trainer.zero_discriminator_grads()
    loss_d.backward()
    # Private head gradient of the real patches, with the same weight the trunk's term has.
    weight = trainer.weighting.weights()["cls_real"]
    noisy, _ = dp.head_gradient(trunk.tokens[:b], trunk.features[:b], labels, weight)
    _add_grads(model.classifier, noisy, "classifier")
    trainer.step_discriminator(weights_learned=cfg.weighting.enabled)
    step: dict[str, torch.Tensor | float | None] = {"adv_discriminator": adv_d, "selected": float(keep.sum())}
    if cls_real is not None:
        step["cls_real"] = cls_real
    if cls_syn is not None:
        step["cls_synthetic"] = cls_syn
    return step


def _discriminator_scope(trainer: LocalTrainer, dp: PrivateGradients, real: torch.Tensor, labels: torch.Tensor,
                         labels_host: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
                         fake_labels_host: torch.Tensor) -> dict[str, torch.Tensor | float | None]:
    model, cfg = trainer.model, trainer.cfg
    weights = trainer.weighting.weights()  # fixed in this scope (weighting.enabled is false)
    w_adv = dp.plan.adversarial_weight * (weights.get("adv_discriminator", 1.0)
                                          if cfg.weighting.include_adversarial else 1.0)
    w_real, w_syn = weights["cls_real"], weights["cls_synthetic"]
    real, labels = _views(real, labels, dp.plan.augmentations)
    aug_real = _augment_real(trainer, dp, real)
    aug_fake = diff_augment(fake.detach(), cfg.augment, trainer.rng)
    parts: dict[str, torch.Tensor | None] = {}

    def generated_loss(score: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The generated half's loss: its gradient is an ordinary one (a function of the private D, C and G only)."""
        adv_fake = fake_adversarial_terms(score, cfg.adversarial_loss).mean()
        keep = select_by_confidence(trainer, F.softmax(logits.detach(), dim=1), fake_labels_host)
        cls_syn = masked_cross_entropy(logits, fake_labels, keep)
        parts.update(adv_fake=adv_fake, cls_syn=cls_syn, keep=keep)
        return w_adv * adv_fake + (w_syn * cls_syn if cls_syn is not None else 0.0)

    if dp.bookkeeping is not None:
        # One D/C pass over real and generated images; the real rows' gradients clipped and noised.
        noisy, losses = dp.discriminator_gradient_with_generated(aug_real, labels, cfg.adversarial_loss, w_adv,
                                                                 w_real, aug_fake, fake_labels, generated_loss)
        trainer.zero_discriminator_grads()
    else:
        # Two passes: the generated half (an ordinary backward, or per-image clipped gradients from
        # torch.func under privacy.clip_generated), then the real half's torch.func gradients.
        m = aug_fake.shape[0]
        bound = dp.generated_bound(m)
        with torch.no_grad() if bound is not None else contextlib.nullcontext():
            out = model.discriminate(aug_fake, fake_labels)
            loss_fake = generated_loss(out.score, out.logits)
        trainer.zero_discriminator_grads()
        if bound is None:
            loss_fake.backward()
        else:
            keep = parts["keep"]
            assert keep is not None
            kept = int(keep.sum())
            weights_cls = keep.float() * (w_syn / kept) if kept else torch.zeros(m)
            generated = dp.generated_gradient(aug_fake, fake_labels, cfg.adversarial_loss, w_adv / m,
                                              weights_cls.to(aug_fake.device))
            _add_grads(model.discriminator, generated, "discriminator")
            _add_grads(model.classifier, generated, "classifier")
        dp.observe_public(aug_fake, fake_labels, cfg.adversarial_loss, w_adv, w_real)  # privacy.subspace_dim only
        noisy, losses = dp.discriminator_gradient(aug_real, labels, cfg.adversarial_loss, w_adv, w_real)
    _add_grads(model.discriminator, noisy, "discriminator")
    _add_grads(model.classifier, noisy, "classifier")
    trainer.step_discriminator(weights_learned=False)
    adv_fake, cls_syn, keep = parts["adv_fake"], parts["cls_syn"], parts["keep"]
    assert adv_fake is not None and keep is not None
    # "real_loss" (the real patches' summed losses / B) is a local diagnostic only: real-image losses
    # are left out of the reply in this scope (see REAL_DATA_METRICS in common/privacy/budget.py).
    step: dict[str, torch.Tensor | float | None] = {"adv_discriminator_generated": adv_fake,
                                                    "real_loss": float(losses.sum()) / dp.plan.expected_batch,
                                                    "selected": float(keep.sum())}
    if cls_syn is not None:
        step["cls_synthetic"] = cls_syn
    return step


def private_inputs(trainer: LocalTrainer, dp: PrivateGradients, real: torch.Tensor, labels: torch.Tensor) -> RealBatch:
    """The Poisson batch on the trainer's device; starts drawing the step's noise on the host first
    (while the device computes)."""
    dp.prefetch(trainer.device)
    return trainer.device_batch(real, labels)


def private_classifier_update(trainer: LocalTrainer, dp: PrivateGradients, batch: RealBatch) -> dict[str, float]:
    """The plain classifier's update (``train.method=supervised``) with DP-SGD; counts one DP step.

    The labelled rows of the Poisson batch, with the classifier's label-safe augmentation drawn by the
    DP generator; unlabelled rows count in the batch (B) and contribute nothing. scope=classifier: the
    head learns from the private gradient, the trunk from the same loss without DP through a frozen
    copy of the head (as in the unified step: no end-to-end guarantee). scope=discriminator: the trunk
    and the head learn from the private gradient alone (the adversarial parts get none: weight 0)."""
    model, cfg = trainer.model, trainer.cfg
    real, labels, labels_host = batch.images, batch.labels, batch.labels_host
    if dp.plan.scope == "discriminator":
        real, labels = _views(real, labels, dp.plan.augmentations)
    images = diff_augment(real, cfg.classifier_augment, dp.augment_rng) if real.shape[0] else real
    trainer.zero_discriminator_grads()
    if dp.plan.scope == "classifier":
        trunk = model.trunk(images)
        frozen = {n: p.detach() for n, p in model.classifier.named_parameters()}
        logits = functional_call(model.classifier, frozen, (trunk,))
        labelled = labels_host >= 0
        loss = labelled_cross_entropy(logits, labels).sum() / (dp.plan.expected_batch * dp.plan.labelled_fraction)
        if bool(labelled.any()):
            loss.backward()
        noisy, _ = dp.head_gradient(trunk.tokens, trunk.features, labels, 1.0)
        _add_grads(model.classifier, noisy, "classifier")
        step: dict[str, float] = {"cls_real": float(loss.detach())}
    else:
        noisy, losses = dp.discriminator_gradient(images, labels, cfg.adversarial_loss, 0.0, 1.0)
        _add_grads(model.discriminator, noisy, "discriminator")
        _add_grads(model.classifier, noisy, "classifier")
        # a local diagnostic only: real-image losses are left out of the reply in this scope
        step = {"real_loss": float(losses.sum()) / dp.plan.expected_batch}
    trainer.step_discriminator(weights_learned=False)
    step["selected"] = 0.0
    return step


def private_discriminator_update(trainer: LocalTrainer, dp: PrivateGradients, batch: RealBatch,
                                 generated: GeneratedBatch) -> DiscriminatorUpdate:
    """D's and C's update of a unified step with DP-SGD (``dp``) on the covered parameters; counts one
    DP step. G learns afterwards from its own pass (its real-feature matching gets no real rows)."""
    scope = _classifier_scope if dp.plan.scope == "classifier" else _discriminator_scope
    losses = scope(trainer, dp, batch.images, batch.labels, batch.labels_host, generated.images, generated.labels,
                   generated.labels_host)
    return DiscriminatorUpdate(losses)
