"""A hospital's local training: the unified step (and the baselines' steps) and ``train_round``.

One unified step, on a real batch (labelled rows first, then unlabelled ones labelled -1; see
``common/train/streams.py``) and a class-balanced generated batch:
  0. (``pseudo_label.mode`` not none) unlabelled real patches get pseudo-labels from a weak view:
     the same selection rule as generated images, with the predicted class as the candidate's class.
  1. D/C update: the trunk scores real and generated images (adversarial loss with class
     projection) and classifies them; C's losses on real labels, on the *selected* generated images
     and on the kept pseudo-labels are balanced by the dynamic loss weighting. One backward serves
     D, C and the log-variances.
  2. G update: adversarial loss plus the AC-GAN cross-entropy of C on G's images.
G runs forward once per step; its images are detached for step 1 and re-scored for step 2.
How D's and C's gradients are formed is the trainer's gradient strategy
(``common/train/step_gradients.py``): :class:`Backpropagation` below, or, with ``privacy`` (DP-SGD,
privacy.enabled=true), the one ``common.privacy`` builds: Poisson real batches, per-sample clipping
and noise on the covered parameters, every step counted. The rest of a step is the same code for both.

``train.method`` picks what a step trains, from the registry (``common/train/methods.py``): ``unified``
(the above), ``supervised`` (the same trunk and head on labelled patches only: the plain baseline) or
``semi_supervised`` (FixMatch on the same trunk and head, no generator). Every method keeps the same
local state layout.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from common.model import UnifiedViTGAN
from common.model.unified import DiscriminatorOutput
from common.train.adversarial_scale import PRIVATE_ADVERSARIAL_TRUNK, AdversarialTrunkScale
from common.train.augment import diff_augment
from common.train.averaging import IterateAverage
from common.train.config import TrainConfig, learning_rate_factor
from common.train.fit_gate import FitGate
from common.train.gan_signals import gan_signals_reach_classifier
from common.train.gate import PseudoLabelGate
from common.train.host_memory import apply_host_memory_policy
from common.train.local_state import flatten_optimizer, load_flat_optimizer
from common.train.losses import discriminator_loss, generator_loss, masked_cross_entropy
from common.train.methods import method_names, training_method
from common.train.selection import SampleSelector
from common.train.step_gradients import (
    DiscriminatorUpdate,
    GeneratedBatch,
    RealBatch,
    StepGradients,
)
from common.train.transfer import host_rows, to_device, to_floats
from common.train.weighting import DynamicLossWeighting
from common.train.whitening import HeadWhitenings, express_head_in, refresh_whitening

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class RoundMetrics:
    """What one call of ``train_round`` reports (means over its steps)."""

    steps: int
    real_images: int
    seconds: float
    losses: dict[str, float]
    loss_weights: dict[str, float]
    log_variances: dict[str, float]
    acceptance: dict[str, float]
    selected_images: int
    global_step: int
    pseudo_acceptance: dict[str, float] = field(default_factory=dict)
    pseudo_labelled: int = 0
    gate: dict[str, float] = field(default_factory=dict)  # the pseudo-label gate's entries (gate/...)

    @property
    def images_per_second(self) -> float:
        """Real images consumed per second of training."""
        return self.real_images / self.seconds if self.seconds > 0 else 0.0

    def as_flat_dict(self) -> dict[str, float]:
        """Flat ``{name: number}`` view (for metric records and JSON)."""
        flat: dict[str, float] = {
            "steps": float(self.steps),
            "real_images": float(self.real_images),
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "selected_images": float(self.selected_images),
            "global_step": float(self.global_step),
        }
        for prefix, values in (("loss", self.losses), ("weight", self.loss_weights),
                               ("log_var", self.log_variances), ("acceptance", self.acceptance),
                               ("pseudo_acceptance", self.pseudo_acceptance)):
            flat.update({f"{prefix}/{k}": float(v) for k, v in values.items()})
        if self.pseudo_acceptance:
            flat["pseudo_labelled"] = float(self.pseudo_labelled)
        flat.update({k: float(v) for k, v in self.gate.items()})
        return flat


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    if isinstance(batches, Iterator):  # an endless stream (common/train/streams.py): keep its position
        while True:  # next(), not ``yield from``: closing this generator must not close the stream
            batch = next(batches, None)
            if batch is None:
                raise ValueError("the training batch stream ended")
            yield batch
    while True:
        produced = False
        for batch in batches:
            produced = True
            yield batch
        if not produced:
            raise ValueError("the training data loader yielded no batch (empty local data set?)")


def weighted_loss_names(cfg: TrainConfig) -> list[str]:
    """The classification losses the dynamic weighting balances under ``cfg``."""
    names = ["cls_real", "cls_synthetic"]
    if cfg.pseudo_label.enabled:
        names.append("cls_pseudo")
    if cfg.weighting.include_adversarial:
        names.append("adv_discriminator")
    return names


class LocalTrainer:
    """A hospital's optimisers, loss weighting, sample selectors and random state around a model.

    Everything here except ``model`` is local state (``state_dict``) that never leaves the site.
    """

    def __init__(
        self,
        model: UnifiedViTGAN,
        cfg: TrainConfig,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
        privacy: StepGradients | None = None,
        validation: Dataset | None = None,
        labelled_examples: int | None = None,
        run_steps: int | None = None,
    ) -> None:
        """``validation``: the hospital's labelled validation patches, read (never trained on) by the
        pseudo-label gate (``train.pseudo_label_gate``; common/train/gate.py); ``labelled_examples``: how
        many labelled training patches it has and ``run_steps`` how many local steps the whole run takes
        (default ``train.optim.schedule_steps``): ``train.gan_signals`` and ``train.adversarial_trunk.ramp_passes``
        count passes over the labelled patches."""
        apply_host_memory_policy(cfg.host_memory)  # process-wide, once: freed host memory kept for reuse
        self.model = model.to(device)
        self.cfg = cfg
        self.device = torch.device(device)
        # The head's whitening from free images, before any step (common/train/whitening.py): outside
        # train_round the head is in the matrix every hospital shares, inside it in the hospital's own.
        self.whitenings: HeadWhitenings | None = None
        if model.cfg.classifier_whitening:
            self.whitenings = refresh_whitening(model, cfg.whitening.sources(cfg.uses_generator), cfg.whitening,
                                                noise_multiplier=privacy.noise_multiplier if privacy is not None else None)
        self.num_classes = model.num_classes
        self.class_names = tuple(class_names) if class_names else tuple(str(k) for k in range(self.num_classes))
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a {self.num_classes}-class model")
        self.method = training_method(cfg.method)
        if privacy is not None and not self.method.private:
            raise ValueError(f"DP-SGD (privacy.enabled) is implemented for train.method "
                             f"{' and '.join(method_names(private_only=True))}, not {cfg.method!r}")
        if cfg.optim.trunk_update == "split" and (privacy is not None or cfg.generator_update != "after_discriminator"):
            raise ValueError("train.optim.trunk_update=split needs train.generator_update=after_discriminator and no DP")
        if privacy is not None and (cfg.amp != "none" or cfg.compile or cfg.generator_update != "after_discriminator"):
            raise ValueError("DP-SGD (privacy.enabled) runs its own step: use train.amp=none, train.compile=false "
                             "and train.generator_update=after_discriminator with it")
        if privacy is not None and not cfg.adversarial_trunk.passes_everything:
            raise ValueError(PRIVATE_ADVERSARIAL_TRUNK)
        if cfg.compile:  # in place: the state-dict keys stay those of the plain modules
            if cfg.generator_update == "same_pass":
                # two backward passes share one compiled graph (retain_graph), which donated buffers forbid
                import torch._functorch.config as functorch_config

                functorch_config.donated_buffer = False
            model.discriminator.trunk.compile()
            model.generator.compile()
            model.classifier.compile()
        o = cfg.optim
        # One fused kernel per optimiser step instead of a few per parameter; the same update up to
        # rounding. ``None`` leaves torch's own choice (foreach kernels on CUDA, a loop on the CPU).
        fused = True if o.use_fused(self.device) else None
        self.opt_generator = torch.optim.Adam(model.generator.parameters(), lr=o.lr_generator, betas=o.gan_betas,
                                              fused=fused)
        trunk_optimizer = torch.optim.AdamW if o.discriminator_weight_decay else torch.optim.Adam
        self.opt_discriminator = trunk_optimizer(
            model.discriminator.parameters(), lr=o.lr_discriminator, betas=o.trunk_betas,
            weight_decay=o.discriminator_weight_decay, fused=fused,
        )
        self.opt_classifier = torch.optim.AdamW(
            model.classifier.parameters(), lr=o.lr_classifier, weight_decay=o.classifier_weight_decay, fused=fused
        )
        # trunk_update=split: C's losses move the trunk through an optimiser of their own.
        self.opt_trunk_classifier = torch.optim.AdamW(
            model.discriminator.trunk.parameters(), lr=o.lr_trunk_classifier, betas=o.trunk_classifier_betas,
            weight_decay=o.trunk_classifier_weight_decay, fused=fused,
        ) if o.trunk_update == "split" else None
        self.weighting = DynamicLossWeighting(weighted_loss_names(cfg), cfg.weighting).to(self.device)
        self.opt_weights = torch.optim.Adam(self.weighting.parameters(), lr=o.lr_loss_weights, fused=fused)
        self.selector = SampleSelector(self.num_classes, model.cfg.embed_dim, cfg.selection)
        self.pseudo = SampleSelector(self.num_classes, model.cfg.embed_dim, cfg.pseudo_label)
        steps_per_pass = labelled_examples / cfg.batch_size if labelled_examples else None
        self.adversarial_scale = AdversarialTrunkScale(cfg.adversarial_trunk, cfg.optim.schedule_steps, steps_per_pass)
        self.fit_gate = FitGate(cfg.fit_gate, self.num_classes)
        self.gan_signals = gan_signals_reach_classifier(cfg.gan_signals, run_steps or cfg.optim.schedule_steps,
                                                        cfg.batch_size, labelled_examples)
        gated = cfg.method == "unified" and cfg.pseudo_label.enabled and cfg.pseudo_label_gate.enabled
        self.gate = PseudoLabelGate(cfg.pseudo_label_gate, cfg.pseudo_label.confidence_threshold, validation,
                                    self.device) if gated else None
        self.rng = torch.Generator().manual_seed(int(seed))
        self.global_step = 0
        self._optimizers = tuple(opt for opt in (self.opt_generator, self.opt_discriminator, self.opt_classifier,
                                                 self.opt_trunk_classifier) if opt is not None)
        self._base_lrs = [[group["lr"] for group in opt.param_groups] for opt in self._optimizers]
        # DP-SGD on the covered parameters (common/privacy); None: no DP.
        self.privacy = privacy
        # How every step forms D's and C's gradients: DP-SGD's, or ordinary back-propagation.
        self.gradients: StepGradients = privacy if privacy is not None else Backpropagation()

    # ----------------------------------------------------------------- shared pieces
    def autocast(self) -> AbstractContextManager[object]:
        """The context of every forward pass: bfloat16 autocast under ``train.amp=bf16``, else nothing."""
        if self.cfg.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def balanced_labels_host(self, n: int) -> torch.Tensor:
        """``n`` class labels as even over the classes as ``n`` allows, in an order from the trainer's
        generator, on the host."""
        labels = torch.arange(n) % self.num_classes
        return labels[torch.randperm(n, generator=self.rng)]

    def balanced_labels(self, n: int) -> torch.Tensor:
        """``balanced_labels_host(n)`` on the trainer's device."""
        return to_device(self.balanced_labels_host(n), self.device)

    def device_batch(self, real: torch.Tensor, labels: torch.Tensor) -> RealBatch:
        """The batch on the trainer's device, and its labels on the host too: every mask a step takes
        from the labels is then known without waiting for the GPU (labels from a loader are on the host)."""
        labels_host = labels.cpu()
        on_device = labels.to(self.device) if labels.device.type != "cpu" else to_device(labels_host, self.device)
        return RealBatch(real.to(self.device, non_blocking=True), on_device, labels_host)

    def _projected(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels D's class projection sees: all -1 (psi alone) when ``class_projection`` is off."""
        return labels if self.cfg.class_projection else torch.full_like(labels, -1)

    def _generator_loss(self, out_fake: DiscriminatorOutput, fake_labels: torch.Tensor,
                        real_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G's loss on D/C's pass over its images: adversarial + AC-GAN cross-entropy (+ feature matching
        against ``real_features`` when ``feature_matching_weight`` > 0); returns (loss, adversarial, AC-GAN)."""
        cfg = self.cfg
        adv_g = generator_loss(out_fake.score, cfg.adversarial_loss)
        aux = F.cross_entropy(out_fake.logits, fake_labels)
        loss_g = adv_g + cfg.aux_generated_weight * aux
        if cfg.feature_matching_weight > 0 and real_features is not None and len(real_features):
            gap = out_fake.features.mean(dim=0) - real_features.detach().mean(dim=0)
            loss_g = loss_g + cfg.feature_matching_weight * gap.pow(2).sum()
        return loss_g, adv_g, aux

    def _step_generator(self, loss_g: torch.Tensor) -> None:
        """Backward of G's loss into G's parameters only (D's and C's gradients are neither computed
        nor touched), optional clipping, G's optimiser step."""
        params = list(self.model.generator.parameters())
        self.opt_generator.zero_grad(set_to_none=True)
        loss_g.backward(inputs=params)
        if self.cfg.grad_clip_norm:
            nn.utils.clip_grad_norm_(params, self.cfg.grad_clip_norm)
        self.opt_generator.step()

    def generator_step(self, fake: torch.Tensor, fake_labels: torch.Tensor,
                        real_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """G's update against the current D and C from a fresh pass over its images; returns the
        adversarial and AC-GAN losses."""
        with self.autocast():
            out_fake = self.model.discriminate(diff_augment(fake, self.cfg.augment, self.rng),
                                               self._projected(fake_labels), self.cfg.classifier_score)
            loss_g, adv_g, aux = self._generator_loss(out_fake, fake_labels, real_features)
        self._step_generator(loss_g)
        return adv_g, aux

    def discriminator_objective(
        self, adv_d: torch.Tensor, cls_real: torch.Tensor | None, cls_syn: torch.Tensor | None,
        cls_pseudo: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """D/C loss: adversarial term plus the weighted classification losses (absent ones skipped)."""
        balanced = {k: v for k, v in (("cls_real", cls_real), ("cls_synthetic", cls_syn), ("cls_pseudo", cls_pseudo))
                    if v is not None}
        if self.cfg.weighting.include_adversarial:
            balanced["adv_discriminator"] = adv_d
            return self.weighting.combine(balanced)
        return adv_d + (self.weighting.combine(balanced) if balanced else 0.0)

    def _discriminator_parameters(self) -> list[nn.Parameter]:
        """What D/C's loss trains: the discriminator group, the head and the loss weights."""
        return [*self.model.discriminator.parameters(), *self.model.classifier.parameters(),
                *self.weighting.parameters()]

    def zero_discriminator_grads(self) -> None:
        for opt in (self.opt_discriminator, self.opt_classifier, self.opt_weights):
            opt.zero_grad(set_to_none=True)

    def step_discriminator(self, weights_learned: bool) -> None:
        """Optimiser steps of D and C (after optional clipping) and, if learned, the loss weights."""
        if self.cfg.grad_clip_norm:
            nn.utils.clip_grad_norm_(
                list(self.model.discriminator.parameters()) + list(self.model.classifier.parameters()),
                self.cfg.grad_clip_norm,
            )
        self.opt_discriminator.step()
        self.opt_classifier.step()
        if weights_learned:
            self.opt_weights.step()
            self.weighting.project_()

    @torch.no_grad()
    def _pseudo_labels(self, unlabelled: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels of unlabelled patches from a weak view (-1 where the rule rejects them), on the host."""
        with self.autocast():
            trunk = self.model.trunk(diff_augment(unlabelled, self.cfg.classifier_augment, self.rng))
            probs = F.softmax(self.model.classifier(trunk).float(), dim=1)
        predicted = probs.argmax(dim=1).cpu()
        keep = self.pseudo.select(trunk.features, probs, predicted, self.global_step)
        return torch.where(keep, predicted, torch.full_like(predicted, -1))

    # ----------------------------------------------------------------- the steps
    def _schedule_learning_rates(self) -> None:
        """Set G's, D's and C's learning rates for ``global_step`` (a pure function of it, so a
        restored trainer continues the schedule exactly)."""
        factor = learning_rate_factor(self.cfg.optim, self.global_step)
        for opt, bases in zip(self._optimizers, self._base_lrs):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * factor

    def step(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One local step of ``cfg.method`` on a real batch; returns the step's losses and counts."""
        self._schedule_learning_rates()
        return self.method.step(self, real, labels)

    def supervised_step(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The plain baseline: trunk + head on the labelled rows, label-safe augmentation, no generator."""
        step = self.gradients.update_classifier(self, self.gradients.inputs(self, real, labels))
        self.global_step += 1
        return step

    def semi_supervised_step(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """FixMatch: labelled weak views, plus unlabelled strong views learning confident weak-view labels."""
        cfg = self.cfg.semi_supervised
        batch = self.device_batch(real, labels)
        real, labels, labels_host = batch.images, batch.labels, batch.labels_host
        labelled_rows = host_rows(labels_host >= 0, self.device)
        labelled_labels = labels.index_select(0, labelled_rows)
        weak = diff_augment(real.index_select(0, labelled_rows), self.cfg.classifier_augment, self.rng)
        unlabelled = real.index_select(0, host_rows(labels_host < 0, self.device))
        n = weak.shape[0]
        step: dict[str, float] = {"selected": 0.0}
        if unlabelled.shape[0] == 0:
            with self.autocast():
                logits = self.model.classify(weak)
                loss = F.cross_entropy(logits, labelled_labels)
            step["cls_real"] = float(loss.detach())
        else:
            with torch.no_grad(), self.autocast():
                probs = F.softmax(self.model.classify(
                    diff_augment(unlabelled, self.cfg.classifier_augment, self.rng)).float(), 1)
                confidence, pseudo = probs.max(dim=1)
                mask = (confidence >= cfg.confidence_threshold).float()
                self.pseudo.proposed += torch.bincount(pseudo.cpu(), minlength=self.num_classes)
                self.pseudo.accepted += torch.bincount(pseudo[mask > 0].cpu(), minlength=self.num_classes)
            strong = diff_augment(unlabelled, self.cfg.augment, self.rng)
            with self.autocast():
                logits = self.model.classify(torch.cat([weak, strong]))
                cls_real = F.cross_entropy(logits[:n], labelled_labels)
                cls_pseudo = (F.cross_entropy(logits[n:], pseudo, reduction="none") * mask).mean()
            loss = cls_real + cfg.unlabelled_weight * cls_pseudo
            step.update(cls_real=float(cls_real.detach()), cls_pseudo=float(cls_pseudo.detach()),
                        pseudo_selected=float(mask.sum()))
        self.zero_discriminator_grads()
        loss.backward()
        self.step_discriminator(weights_learned=False)
        self.global_step += 1
        return step

    def generate(self, rows: int) -> GeneratedBatch:
        """``rows`` images of G, class-balanced labels in an order from the trainer's generator."""
        labels_host = self.balanced_labels_host(rows)
        labels = to_device(labels_host, self.device)
        z = to_device(torch.randn(rows, self.model.cfg.z_dim, generator=self.rng), self.device)
        with self.autocast():
            images = self.model.generator(z, labels)
        return GeneratedBatch(images, labels, labels_host)

    def unified_step(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One unified step on a real batch (D/C's update by the gradient strategy, then G's); returns
        this step's losses and selection counts."""
        batch = self.gradients.inputs(self, real, labels)
        generated = self.generate(self.gradients.generated_rows(self, batch.size))
        update = self.gradients.update_discriminator(self, batch, generated)
        adv_g, aux = update.generator or self.generator_step(generated.images, generated.labels, update.real_features)
        self.global_step += 1
        losses = {**update.losses, "adv_generator": adv_g, "aux_generated": aux}
        step = {k: v for k, v in losses.items() if isinstance(v, float)}
        step.update(to_floats({k: v for k, v in losses.items() if isinstance(v, torch.Tensor)}))
        return step

    def _split_trunk_backward(self, adv_d: torch.Tensor, loss_d: torch.Tensor) -> None:
        """trunk_update=split: step the trunk by C's losses through ``opt_trunk_classifier`` now, and
        leave D's adversarial gradient in every discriminator parameter's ``.grad`` for
        ``opt_discriminator`` (``step_discriminator``). Two backward passes through the trunk."""
        trunk = list(self.model.discriminator.trunk.parameters())
        discriminator = list(self.model.discriminator.parameters())
        adversarial = torch.autograd.grad(adv_d, discriminator, retain_graph=True, allow_unused=True)
        classification = loss_d - adv_d  # the weighted classification losses (+ entropy), adv_d's own term removed
        classification.backward(inputs=[*trunk, *self.model.classifier.parameters(), *self.weighting.parameters()])
        self.opt_trunk_classifier.step()
        self.opt_trunk_classifier.zero_grad(set_to_none=True)
        for param, grad in zip(discriminator, adversarial):
            param.grad = grad

    @torch.no_grad()
    def _select_generated(self, out: DiscriminatorOutput, b: int, labels_host: torch.Tensor,
                          fake_labels_host: torch.Tensor) -> torch.Tensor:
        """Fold the labelled real rows of D/C's pass into the selectors' statistics, then the host mask
        of the generated rows (after the first ``b``) the classifier may learn from. The features and
        class probabilities come to the host in one copy: the step's one wait for the GPU before its
        backward pass."""
        probs = F.softmax(out.logits.detach().float(), dim=1)
        host = torch.cat([out.features.detach().float(), probs], dim=1).cpu()
        features, probs = host[:, : out.features.shape[1]], host[:, out.features.shape[1]:]
        labelled = labels_host >= 0
        self.selector.update_real(features[:b][labelled], labels_host[labelled])
        if self.cfg.pseudo_label.enabled:
            self.pseudo.update_real(features[:b][labelled], labels_host[labelled])
        return self.selector.select(features[b:], probs[b:], fake_labels_host, self.global_step)

    # ----------------------------------------------------------------- a round
    def train_round(
        self,
        batches: Iterable[Batch],
        steps: int | None = None,
        progress: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> RoundMetrics:
        """Run ``steps`` local steps (default ``cfg.local_steps``), cycling ``batches``.

        ``progress(step, steps, losses)`` is called after each step when given.
        """
        steps = self.cfg.local_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        own_whitening = self.whitenings is not None and self.whitenings.local is not self.whitenings.shared
        if own_whitening:  # the steps in the floor the hospital's noise sets; the same function
            express_head_in(self.model, self.whitenings.local)
        self.model.train()
        self.selector.reset_counters()
        self.pseudo.reset_counters()
        if self.gate is not None:
            self.gate.reset_counters()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        real_images, selected, pseudo_labelled = 0, 0, 0
        start = time.perf_counter()
        data = _cycle(batches)
        average = IterateAverage(self.model, self.cfg.iterate_average) if self.cfg.iterate_average > 0 else None
        for index in range(steps):
            images, labels = next(data)
            if self.gate is not None:
                if self.gate.due(self.global_step, first_of_round=index == 0):
                    self.gate.check(self.model, self.global_step)
                self.gate.count()
            result = self.step(images, labels)
            if average is not None:
                average.update()
            real_images += images.shape[0]
            selected += int(result.pop("selected"))
            pseudo_labelled += int(result.pop("pseudo_selected", 0))
            for key, value in result.items():
                sums[key] += value
                counts[key] += 1
            if progress is not None:
                progress(index + 1, steps, result)
        if average is not None:
            average.apply()
        if own_whitening:  # back in the matrix every hospital shares, before the head may leave
            express_head_in(self.model, self.whitenings.shared)
        seconds = time.perf_counter() - start
        return RoundMetrics(
            steps=steps,
            real_images=real_images,
            seconds=seconds,
            losses={k: sums[k] / counts[k] for k in sums},
            loss_weights=self.weighting.weights(),
            log_variances=self.weighting.log_variances(),
            acceptance=dict(zip(self.class_names, self.selector.acceptance())) if self.cfg.uses_generator else {},
            selected_images=selected,
            global_step=self.global_step,
            pseudo_acceptance=(dict(zip(self.class_names, self.pseudo.acceptance()))
                               if self.cfg.pseudo_label.enabled or self.cfg.method == "semi_supervised" else {}),
            pseudo_labelled=pseudo_labelled,
            gate=self.gate.metrics() if self.gate is not None else {},
        )
    # ----------------------------------------------------------------- local state
    def _named_optimizers(self) -> list[tuple[str, torch.optim.Optimizer]]:
        named = [("opt_generator", self.opt_generator), ("opt_discriminator", self.opt_discriminator),
                 ("opt_classifier", self.opt_classifier), ("opt_weights", self.opt_weights)]
        if self.opt_trunk_classifier is not None:
            named.append(("opt_trunk_classifier", self.opt_trunk_classifier))
        return named

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All local state as named CPU tensors (never includes the model's weights)."""
        state: dict[str, torch.Tensor] = {}
        for prefix, opt in self._named_optimizers():
            state.update(flatten_optimizer(prefix, opt))
        state["weighting.log_vars"] = self.weighting.log_vars.detach().cpu().clone()
        state.update({f"selection.{k}": v for k, v in self.selector.state_dict().items()})
        state.update({f"pseudo.{k}": v for k, v in self.pseudo.state_dict().items()})
        state.update({f"adversarial_scale.{k}": v for k, v in self.adversarial_scale.state_dict().items()})
        state.update({f"fit_gate.{k}": v for k, v in self.fit_gate.state_dict().items()})
        state["rng"] = self.rng.get_state().clone()
        state["global_step"] = torch.tensor(self.global_step, dtype=torch.long)
        if self.privacy is not None:
            state.update({f"privacy.{k}": v for k, v in self.privacy.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``'s output (from this or an earlier process)."""
        missing = [k for k in ("weighting.log_vars", "rng", "global_step") if k not in state]
        if missing:
            raise KeyError(f"local training state lacks {missing}")
        for prefix, opt in self._named_optimizers():
            load_flat_optimizer(prefix, opt, state)
        log_vars = state["weighting.log_vars"]
        if log_vars.shape != self.weighting.log_vars.shape:
            raise ValueError(
                f"loss weighting state has {tuple(log_vars.shape)} log-variances, expected "
                f"{tuple(self.weighting.log_vars.shape)} ({self.weighting.learned}; weighting.anchor="
                f"{self.weighting.anchor!r} has none)"
            )
        with torch.no_grad():
            self.weighting.log_vars.copy_(log_vars.to(self.weighting.log_vars.device))
        self.selector.load_state_dict(
            {k[len("selection."):]: v for k, v in state.items() if k.startswith("selection.")}
        )
        self.pseudo.load_state_dict({k[len("pseudo."):]: v for k, v in state.items() if k.startswith("pseudo.")})
        self.adversarial_scale.load_state_dict(
            {k[len("adversarial_scale."):]: v for k, v in state.items() if k.startswith("adversarial_scale.")})
        self.fit_gate.load_state_dict({k[len("fit_gate."):]: v for k, v in state.items() if k.startswith("fit_gate.")})
        self.rng.set_state(state["rng"].clone().to(torch.uint8))
        self.global_step = int(state["global_step"])
        if self.privacy is not None:
            self.privacy.load_state_dict({k[len("privacy."):]: v for k, v in state.items() if k.startswith("privacy.")})


class Backpropagation:
    """The gradient strategy without DP (``common/train/step_gradients.py``): D's and C's gradients are
    the ordinary gradients of their losses on the real and generated batch."""

    @property
    def noise_multiplier(self) -> None:
        """No noise."""
        return None

    def inputs(self, trainer: LocalTrainer, real: torch.Tensor, labels: torch.Tensor) -> RealBatch:
        return trainer.device_batch(real, labels)

    def generated_rows(self, trainer: LocalTrainer, real_rows: int) -> int:
        """``train.generated_batch_size``, or as many as the real batch has rows."""
        return trainer.cfg.generated_batch_size or real_rows

    def update_discriminator(self, trainer: LocalTrainer, batch: RealBatch,
                             generated: GeneratedBatch) -> DiscriminatorUpdate:
        """(0) pseudo-labels of the unlabelled rows (weak view, no gradient); (1) D/C's update on the
        real and generated images, with the generated images' selection from the same pass. The
        generated images are detached unless G also learns from this pass (generator_update=same_pass)."""
        model, cfg = trainer.model, trainer.cfg
        if trainer.gate is not None and trainer.gate.withholds_unlabelled:
            batch = batch.without_unlabelled()  # a closed gate withholds the unlabelled patches from D as well
        real, labels, labels_host = batch.images, batch.labels, batch.labels_host
        fake, fake_labels, fake_labels_host = generated.images, generated.labels, generated.labels_host
        b, m = batch.size, fake.shape[0]
        labelled, unlabelled = labels_host >= 0, labels_host < 0  # host masks: no wait for the GPU
        same_pass = cfg.generator_update == "same_pass"

        pseudo_host = torch.full_like(labels_host, -1)
        if cfg.pseudo_label.enabled and bool(unlabelled.any()) and (trainer.gate is None or trainer.gate.open):
            pseudo_host[unlabelled] = trainer._pseudo_labels(real.index_select(0, host_rows(unlabelled, trainer.device)))
        kept_pseudo = pseudo_host >= 0
        pseudo_labels = to_device(pseudo_host, trainer.device)
        conditioning = (torch.where(to_device(kept_pseudo, trainer.device), pseudo_labels, labels)
                        if cfg.pseudo_condition_discriminator else labels)

        generator: tuple[torch.Tensor, torch.Tensor] | None = None
        fit_share = trainer.fit_gate.share if trainer.gan_signals else 0.0  # generated images' share of C's learning
        trunk_scale = trainer.adversarial_scale.at(trainer.global_step) if trainer.gan_signals else 0.0
        if cfg.fit_gate.governs_adversarial:
            trunk_scale *= fit_share
        with trainer.autocast():
            both = diff_augment(torch.cat([real, fake if same_pass else fake.detach()]), cfg.augment, trainer.rng)
            out = model.discriminate(both, trainer._projected(torch.cat([conditioning, fake_labels])),
                                     cfg.classifier_score, trunk_scale)
            adv_d = discriminator_loss(out.score[:b], out.score[b:], cfg.adversarial_loss)
            cls_real = masked_cross_entropy(out.logits[:b], labels, labelled)
            keep = trainer._select_generated(out, b, labels_host, fake_labels_host)
            if fit_share == 0.0:  # the fit gate is closed, or the GAN's signals are off: no generated image reaches C
                keep = torch.zeros_like(keep)
            cls_syn = masked_cross_entropy(out.logits[b:], fake_labels, keep,
                                           m if cfg.selection.loss_over == "candidates" else None)
            if cls_syn is not None and fit_share < 1.0:
                cls_syn = cls_syn * fit_share
            cls_pseudo = masked_cross_entropy(out.logits[:b], pseudo_labels, kept_pseudo,
                                              int(unlabelled.sum()) if cfg.pseudo_label.loss_over == "candidates" else None)
            loss_d = trainer.discriminator_objective(adv_d, cls_real, cls_syn, cls_pseudo)
            entropy = None
            if cfg.unlabelled_entropy_weight > 0 and bool(unlabelled.any()):
                log_probs = F.log_softmax(out.logits[:b].index_select(0, host_rows(unlabelled, trainer.device)), dim=1)
                entropy = -(log_probs.exp() * log_probs).sum(dim=1).mean()
                loss_d = loss_d + cfg.unlabelled_entropy_weight * entropy
            if same_pass:  # G's loss against D and C as they were before this step's update
                fake_out = DiscriminatorOutput(out.score[b:], out.logits[b:], out.features[b:])
                loss_g, adv_g, aux = trainer._generator_loss(fake_out, fake_labels, out.features[:b])
                generator = (adv_g, aux)
        trainer.zero_discriminator_grads()
        if trainer.opt_trunk_classifier is not None:
            trainer._split_trunk_backward(adv_d, loss_d)
        else:
            loss_d.backward(inputs=trainer._discriminator_parameters(), retain_graph=same_pass)
        if same_pass:  # G's gradients through the same graph, before D's weights change in place
            trainer._step_generator(loss_g)
        trainer.step_discriminator(weights_learned=cfg.weighting.enabled)
        trainer.adversarial_scale.observe(out.score[:b])
        if bool(labelled.any()):
            trainer.fit_gate.observe(cls_real.detach())

        losses: dict[str, torch.Tensor | float | None] = {
            "adv_discriminator": adv_d, "cls_real": cls_real, "cls_synthetic": cls_syn, "cls_pseudo": cls_pseudo,
            "unlabelled_entropy": entropy, "selected": float(keep.sum())}
        if cfg.adversarial_trunk.adaptive or trainer.adversarial_scale.ramp_steps or cfg.adversarial_trunk.ramp_passes:
            losses["adversarial_trunk_scale"] = trunk_scale
        if cfg.fit_gate.enabled:
            losses["fit_gate_share"] = fit_share
        if cfg.gan_signals.min_label_passes > 0:
            losses["gan_signals"] = float(trainer.gan_signals)
        if cfg.pseudo_label.enabled:
            losses["pseudo_selected"] = float(kept_pseudo.sum())
        return DiscriminatorUpdate(losses, generator, out.features[:b])

    def update_classifier(self, trainer: LocalTrainer, batch: RealBatch) -> dict[str, float]:
        """Cross-entropy of the labelled rows' label-safe view (``train.classifier_augment``)."""
        real, labels, labelled = batch.images, batch.labels, batch.labels_host >= 0
        if not bool(labelled.any()):
            raise ValueError("a supervised step got a batch without labelled patches")
        if not bool(labelled.all()):
            rows = host_rows(labelled, trainer.device)
            real, labels = real.index_select(0, rows), labels.index_select(0, rows)
        images = diff_augment(real, trainer.cfg.classifier_augment, trainer.rng)
        with trainer.autocast():
            loss = F.cross_entropy(trainer.model.classify(images), labels)
        trainer.zero_discriminator_grads()
        loss.backward()
        trainer.step_discriminator(weights_learned=False)
        return {"cls_real": float(loss.detach()), "selected": 0.0}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """None: back-propagation keeps no state of its own."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None
