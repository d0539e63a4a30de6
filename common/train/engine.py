"""The unified local training step and ``LocalTrainer.train_round``.

One unified step, on a real batch and a class-balanced generated batch:
  1. D/C update: the trunk scores real and generated images (adversarial loss with class
     projection) and classifies them; C's loss on real labels and on the *selected* generated images
     are balanced by the dynamic loss weighting. One backward serves D, C and the log-variances.
  2. G update: adversarial loss plus the AC-GAN cross-entropy of C on G's images.
G runs forward once per step; its images are detached for step 1 and re-scored for step 2.
With ``privacy`` (DP-SGD, privacy.enabled=true) the step is ``common.privacy.step.dp_unified_step``:
Poisson real batches, per-sample clipping and noise on the covered parameters, every step counted.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from common.model import UnifiedViTGAN
from common.train.augment import diff_augment
from common.train.config import TrainConfig
from common.train.local_state import flatten_optimizer, load_flat_optimizer
from common.train.losses import discriminator_loss, generator_loss, masked_cross_entropy
from common.train.selection import SampleSelector
from common.train.weighting import DynamicLossWeighting

if TYPE_CHECKING:
    from common.privacy.wiring import DPTraining

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
    extra: dict[str, float] = field(default_factory=dict)

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
                               ("log_var", self.log_variances), ("acceptance", self.acceptance)):
            flat.update({f"{prefix}/{k}": float(v) for k, v in values.items()})
        flat.update(self.extra)
        return flat


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        produced = False
        for batch in batches:
            produced = True
            yield batch
        if not produced:
            raise ValueError("the training data loader yielded no batch (empty local data set?)")


class LocalTrainer:
    """A hospital's optimisers, loss weighting, sample selector and random state around a model.

    Everything here except ``model`` is local state (``state_dict``) that never leaves the site.
    """

    def __init__(
        self,
        model: UnifiedViTGAN,
        cfg: TrainConfig,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
        privacy: DPTraining | None = None,
    ) -> None:
        self.model = model.to(device)
        self.cfg = cfg
        self.device = torch.device(device)
        self.num_classes = model.num_classes
        self.class_names = tuple(class_names) if class_names else tuple(str(k) for k in range(self.num_classes))
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a {self.num_classes}-class model")
        o = cfg.optim
        self.opt_generator = torch.optim.Adam(model.generator.parameters(), lr=o.lr_generator, betas=o.gan_betas)
        self.opt_discriminator = torch.optim.Adam(
            model.discriminator.parameters(), lr=o.lr_discriminator, betas=o.gan_betas
        )
        self.opt_classifier = torch.optim.AdamW(
            model.classifier.parameters(), lr=o.lr_classifier, weight_decay=o.classifier_weight_decay
        )
        names = ["cls_real", "cls_synthetic"] + (["adv_discriminator"] if cfg.weighting.include_adversarial else [])
        self.weighting = DynamicLossWeighting(names, cfg.weighting).to(self.device)
        self.opt_weights = torch.optim.Adam(self.weighting.parameters(), lr=o.lr_loss_weights)
        self.selector = SampleSelector(self.num_classes, model.cfg.embed_dim, cfg.selection)
        self.rng = torch.Generator().manual_seed(int(seed))
        self.global_step = 0
        # DP-SGD on the covered parameters (common/privacy/wiring.py); None: no DP.
        self.privacy = privacy

    # ----------------------------------------------------------------- one step
    def _balanced_labels(self, n: int) -> torch.Tensor:
        labels = torch.arange(n) % self.num_classes
        return labels[torch.randperm(n, generator=self.rng)].to(self.device)

    def _set_requires_grad(self, modules: Sequence[nn.Module], flag: bool) -> None:
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(flag)

    def _generator_step(self, fake: torch.Tensor, fake_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G's update against the current D and C (adversarial + AC-GAN loss); returns both losses."""
        model, cfg = self.model, self.cfg
        frozen = (model.discriminator, model.classifier)
        self._set_requires_grad(frozen, False)
        try:
            out_fake = model.discriminate(diff_augment(fake, cfg.augment, self.rng), fake_labels)
            adv_g = generator_loss(out_fake.score, cfg.adversarial_loss)
            aux = F.cross_entropy(out_fake.logits, fake_labels)
            loss_g = adv_g + cfg.aux_generated_weight * aux
            self.opt_generator.zero_grad(set_to_none=True)
            loss_g.backward()
            if cfg.grad_clip_norm:
                nn.utils.clip_grad_norm_(model.generator.parameters(), cfg.grad_clip_norm)
            self.opt_generator.step()
        finally:
            self._set_requires_grad(frozen, True)
        return adv_g, aux

    def discriminator_objective(
        self, adv_d: torch.Tensor, cls_real: torch.Tensor | None, cls_syn: torch.Tensor | None
    ) -> torch.Tensor:
        """D/C loss: adversarial term plus the weighted classification losses (absent ones skipped)."""
        balanced = {k: v for k, v in (("cls_real", cls_real), ("cls_synthetic", cls_syn)) if v is not None}
        if self.cfg.weighting.include_adversarial:
            balanced["adv_discriminator"] = adv_d
            return self.weighting.combine(balanced)
        return adv_d + (self.weighting.combine(balanced) if balanced else 0.0)

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

    def unified_step(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One unified step on a real batch; returns this step's losses and selection counts."""
        if self.privacy is not None:
            from common.privacy.step import dp_unified_step  # DP-SGD variant (common/privacy)

            return dp_unified_step(self, real, labels)
        model, cfg = self.model, self.cfg
        real, labels = real.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        b = real.shape[0]
        fake_labels = self._balanced_labels(b)
        z = torch.randn(b, model.cfg.z_dim, generator=self.rng).to(self.device)
        fake = model.generator(z, fake_labels)

        # (1) D/C update on real + detached fake, selection from the same pass.
        both = diff_augment(torch.cat([real, fake.detach()]), cfg.augment, self.rng)
        out = model.discriminate(both, torch.cat([labels, fake_labels]))
        adv_d = discriminator_loss(out.score[:b], out.score[b:], cfg.adversarial_loss)
        labelled = labels >= 0
        cls_real = masked_cross_entropy(out.logits[:b], labels, labelled)
        self.selector.update_real(out.features[:b][labelled], labels[labelled])
        keep = self.selector.select(
            out.features[b:], F.softmax(out.logits[b:].detach(), dim=1), fake_labels.cpu(), self.global_step
        ).to(self.device)
        cls_syn = masked_cross_entropy(out.logits[b:], fake_labels, keep)
        loss_d = self.discriminator_objective(adv_d, cls_real, cls_syn)
        self.zero_discriminator_grads()
        loss_d.backward()
        self.step_discriminator(weights_learned=cfg.weighting.enabled)

        # (2) G update against the just-updated D and C.
        adv_g, aux = self._generator_step(fake, fake_labels)

        self.global_step += 1
        step = {
            "adv_discriminator": float(adv_d.detach()),
            "adv_generator": float(adv_g.detach()),
            "aux_generated": float(aux.detach()),
            "selected": float(keep.sum()),
        }
        if cls_real is not None:
            step["cls_real"] = float(cls_real.detach())
        if cls_syn is not None:
            step["cls_synthetic"] = float(cls_syn.detach())
        return step

    # ----------------------------------------------------------------- a round
    def train_round(self, batches: Iterable[Batch], steps: int | None = None) -> RoundMetrics:
        """Run ``steps`` unified steps (default ``cfg.local_steps``), cycling ``batches``."""
        steps = self.cfg.local_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model.train()
        self.selector.reset_counters()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        real_images, selected = 0, 0
        start = time.perf_counter()
        data = _cycle(batches)
        for _ in range(steps):
            images, labels = next(data)
            result = self.unified_step(images, labels)
            real_images += images.shape[0]
            selected += int(result.pop("selected"))
            for key, value in result.items():
                sums[key] += value
                counts[key] += 1
        seconds = time.perf_counter() - start
        acceptance = dict(zip(self.class_names, self.selector.acceptance()))
        return RoundMetrics(
            steps=steps,
            real_images=real_images,
            seconds=seconds,
            losses={k: sums[k] / counts[k] for k in sums},
            loss_weights=self.weighting.weights(),
            log_variances=dict(zip(self.weighting.names, self.weighting.clamped().tolist())),
            acceptance=acceptance,
            selected_images=selected,
            global_step=self.global_step,
        )

    # ----------------------------------------------------------------- local state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """All local state as named CPU tensors (never includes the model's weights)."""
        state: dict[str, torch.Tensor] = {}
        for prefix, opt in (("opt_generator", self.opt_generator), ("opt_discriminator", self.opt_discriminator),
                            ("opt_classifier", self.opt_classifier), ("opt_weights", self.opt_weights)):
            state.update(flatten_optimizer(prefix, opt))
        state["weighting.log_vars"] = self.weighting.log_vars.detach().cpu().clone()
        state.update({f"selection.{k}": v for k, v in self.selector.state_dict().items()})
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
        for prefix, opt in (("opt_generator", self.opt_generator), ("opt_discriminator", self.opt_discriminator),
                            ("opt_classifier", self.opt_classifier), ("opt_weights", self.opt_weights)):
            load_flat_optimizer(prefix, opt, state)
        log_vars = state["weighting.log_vars"]
        if log_vars.shape != self.weighting.log_vars.shape:
            raise ValueError(
                f"loss weighting state has {tuple(log_vars.shape)} log-variances, expected "
                f"{tuple(self.weighting.log_vars.shape)} ({self.weighting.names})"
            )
        with torch.no_grad():
            self.weighting.log_vars.copy_(log_vars.to(self.weighting.log_vars.device))
        self.selector.load_state_dict(
            {k[len("selection."):]: v for k, v in state.items() if k.startswith("selection.")}
        )
        self.rng.set_state(state["rng"].clone().to(torch.uint8))
        self.global_step = int(state["global_step"])
        if self.privacy is not None:
            self.privacy.load_state_dict({k[len("privacy."):]: v for k, v in state.items() if k.startswith("privacy.")})
