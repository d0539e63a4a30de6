"""``conf/privacy/default.yaml`` as a typed, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError, dataclass_from_mapping, defaults_from_conf
from common.privacy.scopes import SCOPES as SCOPE_TABLE
from common.train.adversarial_scale import PRIVATE_ADVERSARIAL_TRUNK
from common.train.config import TrainConfig
from common.train.methods import method_names, training_method

#: ``privacy.scope`` values, from the one covering least to the one covering most.
SCOPES: tuple[str, ...] = tuple(SCOPE_TABLE)
ACCOUNTANTS = ("rdp", "prv")
#: ``privacy.clipping``: how per-example gradients are clipped (the same arithmetic either way).
CLIPPINGS = ("bookkeeping", "vmap")


def check_private_method(method: str, cfg: PrivacyConfig) -> None:
    """``ConfigError`` when ``cfg`` asks for DP-SGD under a training method that has no private step;
    the coordinator refuses such a run at start, and a hospital before it releases anything."""
    if cfg.enabled and not training_method(method).private:
        raise ConfigError(f"privacy.enabled=true with train.method={method}: DP-SGD is implemented for "
                          f"train.method {' and '.join(method_names(private_only=True))} only (its steps have no "
                          f"private version)")
    if cfg.enabled and cfg.subspace_dim is not None and not training_method(method).trains_generator:
        raise ConfigError(f"privacy.subspace_dim with train.method={method}: the subspace is spanned by the "
                          f"generator's images, which only train.method=unified has")


def check_private_centre(centred_model: bool, cfg: PrivacyConfig) -> None:
    """``ConfigError`` for a model whose head centre (``model.classifier_centre``) would be set by DP-SGD's
    release while its trunk learns: the centre is measured once, on a frozen trunk's features."""
    if cfg.enabled and centred_model and not cfg.freeze_trunk:
        raise ConfigError("model.classifier_centre=true with privacy.enabled=true needs privacy.freeze_trunk=true "
                          "(privacy.scope=discriminator): the centre is released once, on the frozen trunk's features, "
                          "and a trunk that learns would move them away from it")


def check_private_training(train: TrainConfig, cfg: PrivacyConfig) -> None:
    """:func:`check_private_method`, and the train settings the private step cannot honour: ``ConfigError``
    for a run no hospital could train (the coordinator refuses it at start, a hospital before it releases
    anything)."""
    check_private_method(train.method, cfg)
    # ramp_passes is switched off under DP by private_train_config, not refused
    if cfg.enabled and not dataclasses.replace(train.adversarial_trunk, ramp_passes=0.0).passes_everything:
        raise ConfigError(PRIVATE_ADVERSARIAL_TRUNK)


@dataclass(frozen=True)
@defaults_from_conf("privacy/default.yaml")
class PrivacyConfig:
    """DP-SGD at each hospital; every key and its default is in ``conf/privacy/default.yaml``, nowhere
    else (``PrivacyConfig()`` is that file's section)."""

    enabled: bool
    scope: str
    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float | None
    max_grad_norm: float
    accountant: str
    max_epsilon: float | None
    ledger_dir: str | None
    seed: int | None
    count_noise_std: float
    clipping: str
    clip_generated: bool
    subspace_dim: int | None
    subspace_history: int
    adversarial_weight: float
    discriminator_clip_share: float | None
    learning_rate: float | None
    augmentation_multiplicity: int
    freeze_trunk: bool
    centre_noise_multiplier: float
    centre_radius: float | None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {CLIPPINGS}, got {self.clipping!r}")
        if self.subspace_dim is not None:
            if isinstance(self.subspace_dim, bool) or not isinstance(self.subspace_dim, int) or self.subspace_dim < 1:
                raise ValueError(f"subspace_dim must be a positive integer or null, got {self.subspace_dim!r}")
            if self.scope != "discriminator" or self.clipping != "vmap":
                raise ValueError("subspace_dim needs scope=discriminator and clipping=vmap (the projection works on "
                                 "each real patch's whole D/C gradient)")
        if isinstance(self.subspace_history, bool) or not isinstance(self.subspace_history, int) \
                or self.subspace_history < 1:
            raise ValueError(f"subspace_history must be a positive integer, got {self.subspace_history!r}")
        if isinstance(self.adversarial_weight, bool) or not isinstance(self.adversarial_weight, (int, float)) \
                or not 0.0 <= float(self.adversarial_weight) <= 1.0:
            raise ValueError(f"adversarial_weight must be a number in [0, 1], got {self.adversarial_weight!r}")
        share = self.discriminator_clip_share
        if share is not None:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
                raise ValueError(f"discriminator_clip_share must be a number in (0, 1) or null, got {share!r}")
            if self.scope != "discriminator" or self.clipping != "bookkeeping":
                raise ValueError("discriminator_clip_share needs scope=discriminator and clipping=bookkeeping (it "
                                 "splits the clipping bound between the discriminator's and the head's parameters)")
        if self.learning_rate is not None and (isinstance(self.learning_rate, bool)
                                               or not isinstance(self.learning_rate, (int, float))
                                               or not math.isfinite(self.learning_rate) or not self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number or null, got {self.learning_rate!r}")
        if isinstance(self.augmentation_multiplicity, bool) or not isinstance(self.augmentation_multiplicity, int) \
                or self.augmentation_multiplicity < 1:
            raise ValueError(f"augmentation_multiplicity must be a positive integer, got {self.augmentation_multiplicity!r}")
        if self.augmentation_multiplicity > 1 and (self.scope != "discriminator" or self.clipping != "bookkeeping"):
            raise ValueError("augmentation_multiplicity > 1 needs scope=discriminator and clipping=bookkeeping (the "
                             "views of a patch are clipped together as that patch's one gradient)")
        if not isinstance(self.freeze_trunk, bool):
            raise ValueError(f"freeze_trunk must be true or false, got {self.freeze_trunk!r}")
        if self.freeze_trunk and self.scope != "discriminator":
            raise ValueError("freeze_trunk needs scope=discriminator (with scope=classifier the trunk is not "
                             "private whether it learns or not, and the scope's statement says so)")
        if isinstance(self.centre_noise_multiplier, bool) or not isinstance(self.centre_noise_multiplier, (int, float)) \
                or not math.isfinite(self.centre_noise_multiplier) or not self.centre_noise_multiplier > 0:
            raise ValueError(f"centre_noise_multiplier must be a positive number, got {self.centre_noise_multiplier!r}")
        if self.centre_radius is not None and (isinstance(self.centre_radius, bool)
                                               or not isinstance(self.centre_radius, (int, float))
                                               or not math.isfinite(self.centre_radius) or not self.centre_radius > 0):
            raise ValueError(f"centre_radius must be a positive number or null, got {self.centre_radius!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.delta is not None and not 0.0 < float(self.delta) < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.max_epsilon is not None and not float(self.max_epsilon) > 0:
            raise ValueError(f"max_epsilon must be > 0 or null, got {self.max_epsilon}")
        if self.noise_multiplier is not None and not float(self.noise_multiplier) > 0:
            raise ValueError(f"noise_multiplier must be > 0 (or null with target_epsilon), got {self.noise_multiplier}")
        if not float(self.count_noise_std) > 0:
            raise ValueError(f"count_noise_std must be > 0, got {self.count_noise_std}")
        if self.target_epsilon is not None and not float(self.target_epsilon) > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.enabled:
            if self.noise_multiplier is None and self.target_epsilon is None:
                raise ValueError("set noise_multiplier, or noise_multiplier=null and target_epsilon")
            if self.noise_multiplier is not None and self.target_epsilon is not None:
                raise ValueError("noise_multiplier and target_epsilon are both set: set noise_multiplier=null "
                                 "to derive the noise from target_epsilon, or target_epsilon=null")


def privacy_config(section: Any) -> PrivacyConfig:
    """Build a PrivacyConfig from the ``privacy`` config section (absent: DP off)."""
    if section is None:
        return PrivacyConfig()
    cfg = dataclass_from_mapping(PrivacyConfig, section, "privacy")
    floats = {k: (None if getattr(cfg, k) is None else float(getattr(cfg, k)))
              for k in ("noise_multiplier", "target_epsilon", "delta", "max_epsilon", "learning_rate", "centre_radius",
                        "discriminator_clip_share")}
    try:
        return PrivacyConfig(**{**cfg.__dict__, **floats, "max_grad_norm": float(cfg.max_grad_norm),
                                "count_noise_std": float(cfg.count_noise_std),
                                "centre_noise_multiplier": cfg.centre_noise_multiplier,
                                "adversarial_weight": cfg.adversarial_weight})
    except ValueError as error:
        raise ConfigError(f"privacy: {error}") from error
