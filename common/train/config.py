"""Local training hyper-parameters (``conf/train/*.yaml``) as typed, validated dataclasses."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from common.config import ConfigError, dataclass_from_mapping, defaults_from_conf
from common.train.adversarial_scale import AdversarialTrunkConfig
from common.train.augment import AugmentConfig
from common.train.fit_gate import FitGateConfig
from common.train.gan_signals import GanSignalsConfig
from common.train.gate import PseudoLabelGateConfig
from common.train.host_memory import HOST_MEMORY_POLICIES
from common.train.losses import ADVERSARIAL_LOSSES
from common.train.methods import training_method
from common.train.selection import SelectionConfig
from common.train.weighting import WeightingConfig
from common.train.whitening import WhiteningConfig

SCHEDULES = ("constant", "cosine")
#: How the shared trunk learns from D's and C's losses (``OptimConfig.trunk_update``).
TRUNK_UPDATES = ("joint", "split")


def learning_rate_factor(cfg: OptimConfig, step: int) -> float:
    """Multiplier of every base learning rate at local step ``step`` (0-based) under ``cfg.schedule``."""
    warmup = learning_rate_warmup(cfg, step)
    if cfg.schedule == "constant":
        return warmup
    total = int(cfg.schedule_steps or 1)
    return warmup * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def learning_rate_warmup(cfg: OptimConfig, step: int) -> float:
    """The linear warm-up factor at local step ``step``: ``(step + 1) / n`` for the first
    ``n = warmup_fraction * schedule_steps`` steps, then 1 (always 1 without a schedule length)."""
    if cfg.warmup_fraction <= 0 or not cfg.schedule_steps:
        return 1.0
    length = max(1, int(round(cfg.warmup_fraction * int(cfg.schedule_steps))))
    return min(1.0, (step + 1) / length)


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "optim")
class OptimConfig:
    """Adam with betas (0, 0.99) for G (ViTGAN/StyleGAN practice); for the shared trunk (with D's
    own layers) and the head the plain classifier's AdamW (lr 1e-3, betas (0.9, 0.999), decay 0.05)."""

    lr_generator: float
    lr_discriminator: float
    lr_classifier: float
    lr_loss_weights: float
    gan_betas: tuple[float, float]
    discriminator_betas: tuple[float, float] | None  # null: gan_betas (the trunk learns with D)
    discriminator_weight_decay: float
    classifier_weight_decay: float
    schedule: str  # constant | cosine (every learning rate decays to 0 over schedule_steps)
    schedule_steps: int | None  # the run's total local steps per hospital (needed by cosine)
    warmup_fraction: float  # linear warm-up over this fraction of schedule_steps (0: none)
    # joint: the trunk learns from D's and C's losses through one optimiser (the discriminator's);
    # split: C's losses reach the trunk through a classifier's AdamW of their own (below), D's
    # adversarial loss through the discriminator's optimiser, each with its own moments.
    trunk_update: str
    lr_trunk_classifier: float
    trunk_classifier_betas: tuple[float, float]
    trunk_classifier_weight_decay: float
    fused: bool | None  # fused Adam/AdamW kernels; None: on CUDA, not on the CPU

    def __post_init__(self) -> None:
        if self.fused is not None and not isinstance(self.fused, bool):
            raise ValueError(f"fused must be true, false or null (on CUDA only), got {self.fused!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.schedule == "cosine" and (self.schedule_steps is None or self.schedule_steps < 1):
            raise ValueError("schedule cosine needs schedule_steps (the run's total local steps) >= 1")
        if self.trunk_update not in TRUNK_UPDATES:
            raise ValueError(f"trunk_update must be one of {TRUNK_UPDATES}, got {self.trunk_update!r}")
        object.__setattr__(self, "trunk_classifier_betas", tuple(float(b) for b in self.trunk_classifier_betas))
        object.__setattr__(self, "gan_betas", tuple(float(b) for b in self.gan_betas))
        if len(self.gan_betas) != 2:
            raise ValueError(f"gan_betas needs two values, got {self.gan_betas}")
        if self.discriminator_betas is not None:
            object.__setattr__(self, "discriminator_betas", tuple(float(b) for b in self.discriminator_betas))
            if len(self.discriminator_betas) != 2:
                raise ValueError(f"discriminator_betas needs two values, got {self.discriminator_betas}")

    def use_fused(self, device: torch.device) -> bool:
        """Whether the optimisers on ``device`` use fused kernels (``fused``; null: on CUDA only)."""
        return self.fused if self.fused is not None else device.type == "cuda"

    @property
    def trunk_betas(self) -> tuple[float, float]:
        """Adam betas of the discriminator group (trunk, adversarial head, projection)."""
        return self.discriminator_betas if self.discriminator_betas is not None else self.gan_betas  # type: ignore[return-value]


#: How real patches are drawn: a labelled and an unlabelled batch each step, or one mixed batch.
STREAMS = ("separate", "mixed")
#: When G learns in a unified step: from a second trunk pass after D/C's update, or from D/C's own pass.
GENERATOR_UPDATES = ("after_discriminator", "same_pass")
#: Mixed precision of the forward passes (float32 master weights either way).
AMP_MODES = ("none", "bf16")


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "semi_supervised")
class SemiSupervisedConfig:
    """``method: semi_supervised``: FixMatch (Sohn et al. 2020) on the same trunk, no generator.

    An unlabelled patch's weak view (``classifier_augment``) gives a pseudo-label when the
    classifier's confidence reaches ``confidence_threshold``; its strong view (``augment``) learns
    it with weight ``unlabelled_weight``.
    """

    confidence_threshold: float
    unlabelled_weight: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml")
class TrainConfig:
    """One hospital's local training: method, batches, steps per round, losses and their parts.

    Every default is in ``conf/train/default.yaml`` (which explains each key), nowhere else:
    ``TrainConfig()`` is that file's section, ``TrainConfig(batch_size=8)`` the same with one key changed."""

    method: str
    batch_size: int  # real patches per step: the labelled batch with separate streams
    unlabelled_batch_size: int  # unlabelled real patches per step (separate streams)
    generated_batch_size: int | None  # generated images per step; null: as many as real ones
    streams: str
    local_steps: int
    adversarial_loss: str
    class_projection: bool  # D(x, y) = psi(phi(x)) + <E[y], phi(x)>; false: psi(phi(x)) alone
    classifier_score: bool  # psi(phi(x)) := log sum_k exp C_k(phi(x)) (semi-supervised GAN)
    aux_generated_weight: float  # AC-GAN term that makes G's images class-faithful
    feature_matching_weight: float  # G also matches the mean trunk feature of real patches (Salimans et al.)
    unlabelled_entropy_weight: float  # entropy of C on unlabelled patches, minimised (Grandvalet & Bengio)
    pseudo_condition_discriminator: bool  # kept pseudo-labels also condition D's projection
    grad_clip_norm: float | None
    iterate_average: float  # EMA decay of the parameters over a round's steps; the round ends at the average (0: off)
    generator_update: str  # same_pass: G's loss from D/C's pass (one trunk pass fewer)
    amp: str  # bf16: forward passes under autocast (GPU); none: float32
    compile: bool  # torch.compile the trunk and the generator (GPU; slow first steps)
    loader_workers: int  # DataLoader worker processes for the real batches (pinned memory on CUDA)
    host_memory: str  # retain: freed host memory is reused, not returned (glibc; common/train/host_memory.py)
    optim: OptimConfig
    adversarial_trunk: AdversarialTrunkConfig
    whitening: WhiteningConfig  # of the head's input, with model.classifier_whitening
    gan_signals: GanSignalsConfig  # whether the GAN's signals reach C, from the run's passes over its labels
    fit_gate: FitGateConfig  # generated images reach C as it fits its labelled patches
    augment: AugmentConfig  # DiffAugment on D's inputs (and FixMatch's strong view)
    classifier_augment: AugmentConfig  # the label-safe view (plain input; weak view for pseudo-labels)
    weighting: WeightingConfig
    selection: SelectionConfig  # of generated images
    pseudo_label: SelectionConfig  # of unlabelled real patches
    pseudo_label_gate: PseudoLabelGateConfig
    semi_supervised: SemiSupervisedConfig

    def __post_init__(self) -> None:
        training_method(self.method)  # ValueError naming the registered methods
        if self.streams not in STREAMS:
            raise ValueError(f"streams must be one of {STREAMS}, got {self.streams!r}")
        if self.adversarial_loss not in ADVERSARIAL_LOSSES:
            raise ValueError(f"adversarial_loss must be one of {ADVERSARIAL_LOSSES}, got {self.adversarial_loss!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.unlabelled_batch_size < 0:
            raise ValueError(f"unlabelled_batch_size must be >= 0, got {self.unlabelled_batch_size}")
        if self.generated_batch_size is not None and self.generated_batch_size < 1:
            raise ValueError(f"generated_batch_size must be >= 1 or null, got {self.generated_batch_size}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if not 0.0 <= float(self.iterate_average) < 1.0:
            raise ValueError(f"iterate_average must be in [0, 1), got {self.iterate_average}")
        if self.generator_update not in GENERATOR_UPDATES:
            raise ValueError(f"generator_update must be one of {GENERATOR_UPDATES}, got {self.generator_update!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
        if self.streams == "mixed" and self.pseudo_label_gate.governs == "unlabelled":
            raise ValueError("pseudo_label_gate.governs=unlabelled needs streams=separate (a mixed batch may hold "
                             "no labelled patch once the unlabelled ones are withheld)")
        if self.host_memory not in HOST_MEMORY_POLICIES:
            raise ValueError(f"host_memory must be one of {HOST_MEMORY_POLICIES}, got {self.host_memory!r}")

    @property
    def uses_generator(self) -> bool:
        """Whether this method trains (and so ever calls) the generator."""
        return training_method(self.method).trains_generator


def train_config(section: Any, symmetries: str | None = None) -> TrainConfig:
    """Build a TrainConfig from the ``train`` config section (a mapping or DictConfig).

    ``symmetries`` (the data set's ``data.symmetries``) sets which flips and rotations every
    augmentation may use; None keeps the dataclass default (d4, as for histology).
    """
    cfg = dataclass_from_mapping(TrainConfig, section, "train")
    return cfg if symmetries is None else with_symmetries(cfg, symmetries)


def with_symmetries(cfg: TrainConfig, symmetries: str) -> TrainConfig:
    """``cfg`` with every augmentation (D's view, the classifier's view, FixMatch's weak and strong
    views) limited to the label-safe ``symmetries`` of the data set."""
    return replace(cfg, augment=replace(cfg.augment, symmetries=symmetries),
                   classifier_augment=replace(cfg.classifier_augment, symmetries=symmetries))


def run_train_config(run: Mapping[str, Any]) -> TrainConfig:
    """The ``train`` section of a whole run config, with the symmetries its ``data`` section declares."""
    data = run.get("data")
    if not isinstance(data, Mapping) or data.get("symmetries") is None:
        raise ConfigError("data.symmetries is not set: every conf/data/<name>.yaml sets it (d4 | flips | none)")
    cfg = train_config(run["train"])
    try:
        return with_symmetries(cfg, str(data["symmetries"]))
    except ValueError as error:
        raise ConfigError(f"data.symmetries: {error}") from error
