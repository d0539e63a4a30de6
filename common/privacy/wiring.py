"""DP-SGD on the covered parameters, without wrapping or renaming any module.

The *real* patches' losses are differentiated for the covered parameters only, through small
adapter modules that hold the model's own sub-modules under their own names (``classifier.*``,
``discriminator.*``), so no module is wrapped and the state-dict keys never change (no
``_module.`` prefix can reach the server). Each example's gradient is clipped to an L2 norm of at
most ``max_grad_norm`` (over all covered parameters together, Opacus' flat clipping; in the unified
step with ``privacy.discriminator_clip_share`` part by part, to bounds whose squares sum to C^2), the clipped
gradients are summed, Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added and the
sum is divided by the expected batch size: Opacus' ``DPOptimizer`` arithmetic. ``plan.clipping``
says how the clipped sum is computed: ``bookkeeping`` (``common/privacy/bookkeeping.py``: norms
and the row-weighted sum from one ordinary pass, forward hooks present only during that pass) or
``vmap`` (per-sample gradients with ``torch.func``, ``vmap`` of ``grad`` over ``functional_call``).
Every call of :meth:`DPTraining.add_noise` is one noisy step and is recorded in the accountant
history, an empty Poisson batch included (it releases pure noise, and is counted like any other
step).

Covered parameters per scope (``common.privacy.scopes.SCOPES``, its ``dp_groups``):

- ``classifier``: the classifier head (``classifier.*``), on features of the discriminator trunk
  that are treated as given (detached);
- ``discriminator``: every discriminator parameter (trunk, adversarial head, class projection
  embedding) and every classifier parameter: all that a real patch's gradient reaches. The
  generator never sees a real patch, only the discriminator's outputs, so it is private by
  post-processing.

The real-data loader samples with Opacus' ``UniformWithReplacementSampler`` (Poisson sampling with
rate q = B / n~, n~ the released noisy training-set size). Noise, sampling and real-patch
augmentation draw from generators seeded afresh for every training attempt (``secret_seed``, or
``attempt_seed`` in the reproducible test mode): nothing random is saved or restored, so a train
message sent twice for one round never repeats a draw. On a GPU each step's noise is drawn ahead on a
host thread (``common/privacy/noise.py``): the same numbers, drawn while the step computes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

from common.config import ConfigError
from common.model import UnifiedViTGAN
from common.model.discriminator import TrunkOutput
from common.privacy.accounting import History, PrivacyPlan, compact, total_steps
from common.privacy.bookkeeping import Bookkeeping, RecordedPass, grouped_rows
from common.privacy.noise import NoiseSource
from common.privacy.scopes import SCOPES
from common.privacy.step import (
    private_classifier_update,
    private_discriminator_update,
    private_inputs,
)
from common.privacy.subspace import PublicSubspace
from common.train.losses import fake_adversarial_terms, labelled_cross_entropy, real_adversarial_terms
from common.train.step_gradients import DiscriminatorUpdate, GeneratedBatch, RealBatch

if TYPE_CHECKING:
    from common.train.engine import LocalTrainer


def secret_seed() -> int:
    """A 63-bit seed from the OS's CSPRNG: unknown to the server and the other hospitals."""
    return secrets.randbits(63)


def attempt_seed(seed: int, dataset: str, attempt: int, site: str) -> int:
    """The reproducible-mode seed of one attempt: ``seed`` mixed with the data set, the attempt
    number from the hospital's ledger and the hospital's name (simulated hospitals partitioning one
    folder share its data-set key, and must not draw the same noise: FedAvg would then average
    nothing out). No protection against whoever knows ``seed``."""
    digest = hashlib.sha256(f"fedvitgan-dp:{int(seed)}:{dataset}:{int(attempt)}:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class HeadAdapter(nn.Module):
    """The classifier head alone, as a function of detached trunk outputs."""

    def __init__(self, model: UnifiedViTGAN) -> None:
        super().__init__()
        self.classifier = model.classifier

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(TrunkOutput(tokens, features))


class DiscriminatorAdapter(nn.Module):
    """Trunk, adversarial head with class projection, and classifier head: all a real patch reaches."""

    #: Parameters the trunk adds to (or concatenates with) every image's tokens.
    broadcast_parameters = ("discriminator.trunk.cls_token", "discriminator.trunk.pos_embed")

    def __init__(self, model: UnifiedViTGAN) -> None:
        super().__init__()
        self.discriminator = model.discriminator
        self.classifier = model.classifier

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.discriminator.trunk(images)
        return self.discriminator.score(self.classifier.centred_features(trunk.features), labels), self.classifier(trunk)


@contextlib.contextmanager
def _unfused_attention(module: nn.Module) -> Iterator[None]:
    """timm's fused attention has no vmap batching rule on the CPU; the explicit one is the same math."""
    changed = [m for m in module.modules() if getattr(m, "fused_attn", False)]
    for m in changed:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


def per_sample_gradients(adapter: nn.Module, names: list[str], example_loss: Callable[..., torch.Tensor],
                         inputs: tuple[torch.Tensor, ...], extras: tuple[torch.Tensor, ...] = ()
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients of ``example_loss(adapter(*inputs_i), *inputs_i, *extras_i)``.

    Every tensor in ``inputs`` and ``extras`` has the examples along dim 0; each example is run as
    a batch of one. Returns ({name: (b, *shape)}, per-example losses (b,)). Only the parameters
    ``names`` of ``adapter`` are differentiated; all others are constants.
    """
    batch = (*inputs, *extras)
    n_inputs = len(inputs)
    params = {n: p.detach() for n, p in adapter.named_parameters() if n in names}

    def loss(p: dict[str, torch.Tensor], *example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [e.unsqueeze(0) for e in example]
        value = example_loss(functional_call(adapter, p, tuple(rows[:n_inputs])), *rows).sum()
        return value, value.detach()

    with _unfused_attention(adapter):
        grads, values = vmap(grad(loss, has_aux=True), in_dims=(None, *[0] * len(batch)))(params, *batch)
    return grads, values


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' flat clipping factors: ``min(1, C / (norm + 1e-6))`` per example."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_sum(per_sample: dict[str, torch.Tensor], max_grad_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Opacus' flat clipping: scale each example's gradient (all tensors together) to norm <= C, sum.

    Returns (summed clipped gradients, per-example norms before clipping).
    """
    first = next(iter(per_sample.values()))
    b = first.shape[0]
    if b == 0:
        return {n: torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for n, g in per_sample.items()}, first.new_zeros(0)
    norms = torch.stack([g.reshape(b, -1).norm(2, dim=1) for g in per_sample.values()], dim=1).norm(2, dim=1)
    factor = clip_factors(norms, max_grad_norm)
    return {n: torch.einsum("i,i...->...", factor.to(g.dtype), g) for n, g in per_sample.items()}, norms


def _collate_or_empty(shape: tuple[int, ...]) -> Callable[[list[Any]], tuple[torch.Tensor, torch.Tensor]]:
    def collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if not items:
            return torch.zeros((0, *shape)), torch.zeros((0,), dtype=torch.long)
        images = torch.stack([item[0] for item in items])
        labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        return images, labels

    return collate


class DPTraining:
    """One training attempt's DP-SGD for the covered parameters: clipping, noise, Poisson batches.

    ``history`` is this attempt's accountant history (Opacus' (noise, rate, steps) entries). The
    lasting record is the hospital's privacy ledger: ``on_step(k)`` is called before step k's noise
    is added to a gradient (the ledger counts it then; the noise itself may be drawn earlier).
    ``seed``: None draws a fresh secret seed; an integer is for tests and the reproducible
    simulation mode only.
    """

    def __init__(self, model: UnifiedViTGAN, plan: PrivacyPlan, seed: int | None = None,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.plan = plan
        if plan.scope == "discriminator" and model.cfg.spectral_norm:
            raise ConfigError("privacy.scope=discriminator does not support model.spectral_norm=true (its power "
                              "iteration updates buffers inside the per-sample gradient computation)")
        if plan.scope == "discriminator":  # every round: a hospital's cached model may come from another plan
            for parameter in model.discriminator.trunk.parameters():
                parameter.requires_grad_(not plan.freeze_trunk)
        self.adapter: nn.Module = HeadAdapter(model) if plan.scope == "classifier" else DiscriminatorAdapter(model)
        self.names = [n for n, p in self.adapter.named_parameters() if p.requires_grad]
        if {n.split(".", 1)[0] for n in self.names} != set(SCOPES[plan.scope].dp_groups):
            raise RuntimeError(f"privacy.scope={plan.scope}: the adapter's parameters are not the scope's groups")
        self.bookkeeping: Bookkeeping | None = None
        if plan.clipping == "bookkeeping":
            try:
                self.bookkeeping = Bookkeeping(self.adapter, self.names,
                                               getattr(self.adapter, "broadcast_parameters", ()))
            except ValueError as error:
                raise ConfigError(f"privacy.clipping=bookkeeping: {error}") from error
        self.history: History = []
        self.round_steps = 0
        self.on_step = on_step
        base = secret_seed() if seed is None else int(seed)
        self.sampler_rng = torch.Generator().manual_seed(base)
        self.noise_rng = torch.Generator().manual_seed(base ^ 0x5DEECE66D)
        params = dict(self.adapter.named_parameters())
        self.noise = NoiseSource(self.noise_rng, [tuple(params[n].shape) for n in self.names],
                                 plan.noise_multiplier * plan.max_grad_norm)
        self.subspace: PublicSubspace | None = None
        if plan.subspace_dim is not None:
            self.subspace = PublicSubspace(self.names, [tuple(params[n].shape) for n in self.names],
                                           plan.subspace_dim, plan.subspace_history)
        # Draw each step's noise ahead on a host thread: None = when the covered parameters are on a GPU.
        self.prefetch_noise: bool | None = None
        # Augmentation of real patches draws from its own generator, so the trainer's generator
        # (fake images, their augmentation) never depends on the realised Poisson batch size.
        self.augment_rng = torch.Generator().manual_seed(base ^ 0x2545F4914F6CDD1D)

    @property
    def noise_multiplier(self) -> float:
        """The plan's sigma: the noise std is ``sigma * max_grad_norm``."""
        return float(self.plan.noise_multiplier)

    @property
    def steps_total(self) -> int:
        return total_steps(self.history)

    # -------------------------------------------------------------- the mechanism
    def record_step(self) -> None:
        """One noisy optimizer step on the covered parameters happened: account for it."""
        self.history = compact([*self.history, (self.plan.noise_multiplier, self.plan.sample_rate, 1)])
        self.round_steps += 1

    def privatize(self, per_sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(sum of clipped per-sample gradients + N(0, (sigma C)^2)) / B; counts one DP step. With
        ``plan.subspace_dim`` the same in the public subspace (``privatize_in_subspace``)."""
        if self.subspace is not None:
            return self.privatize_in_subspace(per_sample)
        summed, _ = clip_and_sum(per_sample, self.plan.max_grad_norm)
        return self.add_noise(summed)

    def privatize_in_subspace(self, per_sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``V (sum_i clip_C(V^T g_i) + N(0, (sigma C)^2 I_k)) / B`` for the public basis V (d x k); counts
        one DP step. The same Gaussian mechanism on a sum of vectors of norm <= C, in k dimensions."""
        assert self.subspace is not None
        plan = self.plan
        basis = self.subspace.basis()
        coefficients = self.subspace.flatten(per_sample) @ basis.to(per_sample[self.names[0]].dtype)
        factors = clip_factors(coefficients.norm(dim=1), plan.max_grad_norm)
        summed = (factors.unsqueeze(1) * coefficients).sum(dim=0)
        if self.on_step is not None:
            self.on_step(self.round_steps + 1)  # counted before its noise reaches a gradient
        noise = torch.randn(summed.shape, generator=self.noise_rng, dtype=summed.dtype) * (plan.noise_multiplier
                                                                                            * plan.max_grad_norm)
        out = self.subspace.unflatten(basis @ (summed + noise.to(summed.device)) / plan.expected_batch)
        self.record_step()
        return out

    def observe_public(self, images: torch.Tensor, labels: torch.Tensor, adversarial_loss: str, weight_adv: float,
                       weight_cls: float) -> None:
        """``plan.subspace_dim``: the generated images' per-example gradients of the real patches' loss
        (as if they were real and labelled), kept to span the subspace. No DP step: public."""
        if self.subspace is None or images.shape[0] == 0:
            return
        example_loss = self._discriminator_example_loss(adversarial_loss, weight_adv, weight_cls)
        per_sample, _ = per_sample_gradients(self.adapter, self.names, example_loss, (images.detach(), labels))
        self.subspace.observe(per_sample)

    def add_noise(self, summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(summed + N(0, (sigma C)^2)) / B for a sum of clipped gradients; counts one DP step.

        The noise is drawn per parameter in ``names`` order (``summed`` must hold exactly those, in
        that order), by ``prefetch`` earlier in the step or here."""
        plan = self.plan
        if list(summed) != self.names:
            raise RuntimeError(f"add_noise: the summed gradient's parameters {list(summed)[:3]}... are not the "
                               f"covered ones in order {self.names[:3]}...")
        if self.noise.std != plan.noise_multiplier * plan.max_grad_norm:
            raise RuntimeError("add_noise: the noise source's std no longer matches the plan's sigma * C")
        if self.on_step is not None:
            self.on_step(self.round_steps + 1)  # counted before its noise reaches a gradient
        out: dict[str, torch.Tensor] = {}
        for (name, total), noise in zip(summed.items(), self.noise.take()):
            noise = noise.to(device=total.device, dtype=total.dtype, non_blocking=noise.is_pinned())
            out[name] = torch.add(total, noise).div_(plan.expected_batch)  # (total + noise) / B, one allocation
        self.record_step()
        return out

    def prefetch(self, device: torch.device) -> None:
        """Start drawing this step's noise on a host thread (``prefetch_noise``; default: on a GPU)."""
        on_gpu = device.type == "cuda"
        if self.prefetch_noise if self.prefetch_noise is not None else on_gpu:
            self.noise.pin = on_gpu
            self.noise.prefetch()

    def _empty_per_sample(self, device: torch.device) -> dict[str, torch.Tensor]:
        params = dict(self.adapter.named_parameters())
        return {n: torch.zeros((0, *params[n].shape), device=device, dtype=params[n].dtype) for n in self.names}

    def head_gradient(self, tokens: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                      weight: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """scope=classifier: the noisy head gradient of the real patches' weighted cross-entropy.

        Example i's loss is ``weight * CE_i / labelled_fraction`` (0 if unlabelled) on detached trunk
        outputs. Returns (noisy gradient by parameter name, per-example losses).
        """
        scale = weight / self.plan.labelled_fraction

        def example_loss(logits: torch.Tensor, _tokens: torch.Tensor, _features: torch.Tensor,
                         label: torch.Tensor) -> torch.Tensor:
            return scale * labelled_cross_entropy(logits, label)

        return self._private_sum((tokens.detach(), features.detach()), (labels,), example_loss)

    def discriminator_gradient(self, images: torch.Tensor, labels: torch.Tensor, adversarial_loss: str,
                               weight_adv: float, weight_cls: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """scope=discriminator: the noisy D/C gradient of the real patches' losses.

        Example i's loss is ``weight_adv * adv_i + weight_cls * CE_i / labelled_fraction`` (the real
        half of the discriminator loss plus the real classification loss, fixed weights).
        """
        example_loss = self._discriminator_example_loss(adversarial_loss, weight_adv, weight_cls)
        return self._private_sum((images, labels), (), example_loss, group=self.plan.augmentations)

    def _discriminator_example_loss(self, adversarial_loss: str, weight_adv: float, weight_cls: float
                                    ) -> Callable[..., torch.Tensor]:
        """A real row's loss; with ``plan.augmentations`` views per patch each row weighs 1 / views, so
        that a patch's rows sum to the mean of its views' losses."""
        views = self.plan.augmentations
        scale = weight_cls / self.plan.labelled_fraction / views
        weight_adv = weight_adv / views

        def example_loss(outputs: tuple[torch.Tensor, torch.Tensor], _images: torch.Tensor,
                         label: torch.Tensor) -> torch.Tensor:
            score, logits = outputs
            return weight_adv * real_adversarial_terms(score, adversarial_loss) + scale * labelled_cross_entropy(logits, label)

        return example_loss

    def _private_sum(self, inputs: tuple[torch.Tensor, ...], extras: tuple[torch.Tensor, ...],
                     example_loss: Callable[..., torch.Tensor], group: int = 1
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The noisy gradient of ``sum_i example_loss(adapter(*inputs_i), *inputs_i, *extras_i)`` over the
        rows of ``inputs`` (per-example clipping by ``plan.clipping``; an example is ``group``
        consecutive rows, its views); counts one DP step. Returns (noisy gradient by parameter name,
        per-example losses)."""
        rows = inputs[0].shape[0]
        if rows == 0:
            empty = self._empty_per_sample(inputs[0].device)
            return self.add_noise(clip_and_sum(empty, self.plan.max_grad_norm)[0]), inputs[0].new_zeros(0)
        if self.bookkeeping is None:
            if group != 1:
                raise ValueError("several views per example need privacy.clipping=bookkeeping")
            per_sample, losses = per_sample_gradients(self.adapter, self.names, example_loss, inputs, extras)
            return self.privatize(per_sample), losses
        with self.bookkeeping.record(rows) as (record, forward):
            outputs = forward(*inputs)
        losses = example_loss(outputs, *inputs, *extras)
        self.bookkeeping.backward(record, losses.sum())
        return self.add_noise(self.clipped_sum(record, rows, group=group)), grouped_rows(losses.detach(), group)

    def clipped_sum(self, record: RecordedPass, real_rows: int, other_weight: float = 0.0,
                    other_bound: float | None = None, group: int = 1,
                    part_bounds: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Book-keeping: the sum of the first ``real_rows`` rows' gradients, each example (``group``
        consecutive rows: its views) clipped to C as a whole, plus ``other_weight`` times the gradient
        of the remaining rows of ``record``, each of those rows first clipped to ``other_bound`` when
        it is given (unclipped when None).

        ``part_bounds`` (:meth:`part_bounds`): each example's gradient clipped part by part instead,
        part k's parameters to bound C_k (the remaining rows as above)."""
        assert self.bookkeeping is not None
        rest = torch.full((record.rows - real_rows,), float(other_weight), device=self.bookkeeping.device(),
                          dtype=self.bookkeeping.dtype())
        if other_bound is not None and record.rows > real_rows:
            other = self.bookkeeping.squared_norms(record, slice(real_rows, record.rows)).sqrt()
            rest = rest * clip_factors(other, other_bound)
        real = slice(0, real_rows)
        if part_bounds is None:
            norms = self.bookkeeping.squared_norms(record, real, group=group).sqrt()
            factors = clip_factors(norms, self.plan.max_grad_norm).repeat_interleave(group)
            return self.bookkeeping.weighted_sum(record, torch.cat([factors, rest]))
        weights = {}
        for part, bound in part_bounds.items():
            norms = self.bookkeeping.squared_norms(record, real, group=group, part=part).sqrt()
            weights[part] = torch.cat([clip_factors(norms, bound).repeat_interleave(group), rest])
        return self.bookkeeping.weighted_sum(record, weights)

    def part_bounds(self) -> dict[str, float] | None:
        """``plan.discriminator_clip_share`` s: the bound of each part of a real patch's gradient, the
        discriminator's parameters sqrt(s) C and the classifier head's sqrt(1 - s) C. The parts are
        disjoint, so the squares add to C^2 and the whole clipped gradient has norm <= C, as with one
        flat clip (the noise is calibrated to C). None: one flat clip."""
        share = self.plan.discriminator_clip_share
        if share is None:
            return None
        c = self.plan.max_grad_norm
        bounds = {"discriminator": math.sqrt(share) * c, "classifier": math.sqrt(1.0 - share) * c}
        assert self.bookkeeping is not None and set(self.bookkeeping.parts()) <= set(bounds)
        return {part: bounds[part] for part in self.bookkeeping.parts()}

    def generated_bound(self, rows: int) -> float | None:
        """The bound on each generated image's D/C gradient (``plan.clip_generated``): C / rows, so the
        generated images' summed gradient is at most C; None when they are not clipped."""
        return self.plan.max_grad_norm / rows if self.plan.clip_generated and rows > 0 else None

    def generated_gradient(self, images: torch.Tensor, labels: torch.Tensor, adversarial_loss: str,
                           weight_adv: float, weights_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two-pass path's generated half: the D/C gradient of ``sum_j weight_adv * adv_fake_j +
        weights_cls[j] * CE_j`` over the generated images, each image's gradient clipped to
        :meth:`generated_bound` (torch.func). No noise and no DP step: the generated images depend on
        the data only through earlier private outputs."""
        bound = self.generated_bound(images.shape[0])
        assert bound is not None

        def example_loss(outputs: tuple[torch.Tensor, torch.Tensor], _images: torch.Tensor, label: torch.Tensor,
                         weight_cls: torch.Tensor) -> torch.Tensor:
            score, logits = outputs
            return (weight_adv * fake_adversarial_terms(score, adversarial_loss)
                    + weight_cls * F.cross_entropy(logits, label, reduction="none"))

        per_sample, _ = per_sample_gradients(self.adapter, self.names, example_loss, (images, labels), (weights_cls,))
        return clip_and_sum(per_sample, bound)[0]

    def discriminator_gradient_with_generated(
        self, images: torch.Tensor, labels: torch.Tensor, adversarial_loss: str, weight_adv: float, weight_cls: float,
        generated: torch.Tensor, generated_labels: torch.Tensor,
        generated_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """scope=discriminator with book-keeping: the real patches' noisy gradient (as
        :meth:`discriminator_gradient`) plus the ordinary gradient of ``generated_loss(score, logits)``
        of the generated images, from one forward and one backward pass over both.

        Returns (the D/C gradient: ``(clipped real sum + noise) / B + generated gradient``, the real
        patches' per-example losses). Counts one DP step.
        """
        assert self.bookkeeping is not None
        b = images.shape[0]
        rows = b + generated.shape[0]
        with self.bookkeeping.record(rows) as (record, forward):
            score, logits = forward(torch.cat([images, generated]), torch.cat([labels, generated_labels]))
        real_losses = self._discriminator_example_loss(adversarial_loss, weight_adv, weight_cls)(
            (score[:b], logits[:b]), images, labels)
        self.bookkeeping.backward(record, real_losses.sum() + generated_loss(score[b:], logits[b:]))
        # Generated rows weigh B here, so that the division by B in add_noise leaves their (clipped) gradient as is.
        views = self.plan.augmentations
        summed = self.clipped_sum(record, b, other_weight=self.plan.expected_batch,
                                  other_bound=self.generated_bound(generated.shape[0]), group=views,
                                  part_bounds=self.part_bounds())
        return self.add_noise(summed), grouped_rows(real_losses.detach(), views)

    # -------------------------------------------------------------- data
    def poisson_loader(self, dataset: Dataset, steps: int) -> DataLoader:
        """``steps`` Poisson batches (rate q, possibly empty) of ``dataset``, freshly seeded."""
        n = len(dataset)  # type: ignore[arg-type]
        if n < 1:
            raise ValueError("Poisson sampling needs a training set with at least one patch")
        shape = tuple(dataset[0][0].shape)
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=self.plan.sample_rate,
                                                generator=self.sampler_rng, steps=steps)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_or_empty(shape), num_workers=0)

    # -------------------------------------------------------------- the gradient strategy
    def inputs(self, trainer: LocalTrainer, real: torch.Tensor, labels: torch.Tensor) -> RealBatch:
        """The Poisson batch of a step on the trainer's device (the step's noise starts drawing)."""
        return private_inputs(trainer, self, real, labels)

    def generated_rows(self, trainer: LocalTrainer, real_rows: int) -> int:
        """Public and fixed (``train.generated_batch_size``, else B, the expected real batch): the
        realised real batch size is not revealed."""
        return trainer.cfg.generated_batch_size or self.plan.expected_batch

    def update_discriminator(self, trainer: LocalTrainer, batch: RealBatch,
                             generated: GeneratedBatch) -> DiscriminatorUpdate:
        """D's and C's private update of a unified step (``common.privacy.step``); counts one DP step."""
        return private_discriminator_update(trainer, self, batch, generated)

    def update_classifier(self, trainer: LocalTrainer, batch: RealBatch) -> dict[str, float]:
        """The plain classifier's private update (``common.privacy.step``); counts one DP step."""
        return private_classifier_update(trainer, self, batch)

    # -------------------------------------------------------------- local state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing: the random generators are seeded afresh for every attempt (never restored), and
        the accounting lives in the hospital's privacy ledger."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Ignores saved state, including generator states written by earlier versions: restoring
        them would replay noise already used."""
