"""A hospital's own policy: the privacy floor it keeps and the paths it owns, whatever the run says.

In a deployment the run configuration is written by the coordinator, so nothing that protects the
hospital's patients may come from it. The policy comes from the SuperNode's ``--node-config``
(deployment) or, in a simulation where one person runs every side, from
``sites.<site name>.policy`` in the run configuration:

| node config key        | simulation key         | meaning |
|------------------------|------------------------|---------|
| ``data-root``          | ``data_root``          | the data folder (pinned: the run's ``data.root`` is ignored) |
| ``state-dir``          | ``state_dir``          | the hospital's state folder (local state, privacy ledger) |
| ``cache-dir``          | ``cache_dir``          | where compressed data files are inflated |
| ``privacy-required``   | ``privacy_required``   | refuse every training round without DP |
| ``privacy-scope``      | ``privacy_scope``      | the least DP scope accepted; unset with DP required: ``discriminator`` (the strict reading) |
| ``min-noise-multiplier`` | ``min_noise_multiplier`` | refuse less noise (DP-SGD, the count and head-centre releases) |
| ``max-epsilon``        | ``max_epsilon``        | lifetime budget; the stricter of this and ``privacy.max_epsilon`` wins |
| ``max-grad-norm``      | ``max_grad_norm``      | refuse a larger clipping norm ``privacy.max_grad_norm`` |
| ``max-delta``          | ``max_delta``          | the largest delta at which this hospital's epsilon is judged (default with DP required: min(1e-5, 1/(10 n))) |
| ``max-score-bins``     | ``max_score_bins``     | refuse ``federation.score_bins`` above it (default 1000): finer bins reveal single patches' scores |
| ``min-count-noise-multiplier`` | ``min_count_noise_multiplier`` | with DP required, refuse a count release with less noise (default 1; ``min-noise-multiplier`` when that is higher) |
| ``secure-aggregation-required`` | ``secure_aggregation_required`` | refuse every training round whose update would leave in the clear (no SecAgg+) |
| ``max-update-norm``    | ``max_update_norm``    | with SecAgg+, refuse a clipping norm ``federation.secaggplus.update_norm`` above it |

Any privacy floor (scope, noise, budget, clipping) implies ``privacy-required``: a round without
DP has no finite epsilon. A hospital that requires DP and names no ``privacy-scope`` gets the strict
reading: everything a real patch's gradient reaches (``discriminator``) must be DP, because the
head-only scope sends a discriminator trained without DP while its reply reports an epsilon. The coordinator may ask for more privacy, never less. In a deployment a
run that sets ``privacy.seed``, ``privacy.ledger_dir``, ``federation.state_dir`` or
``data.cache_dir``, or ``data.root`` for a hospital that pins none, is refused. Every refusal is a
``Refusal`` naming the key; the hospital trains nothing that round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.config import ConfigError, dataclass_from_mapping
from common.privacy.config import SCOPES, PrivacyConfig


class PublicError(ConfigError):
    """An error whose message names keys only (no local path, no listing): safe to send to the coordinator."""


class Refusal(PublicError):
    """The hospital's policy refuses the run configuration's ``key``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: refused by this hospital: {reason}")
        self.key = key


#: Node config keys of the policy (deployment spelling) -> field names (simulation spelling).
NODE_KEYS: dict[str, str] = {
    "data-root": "data_root", "state-dir": "state_dir", "cache-dir": "cache_dir",
    "privacy-required": "privacy_required", "privacy-scope": "privacy_scope",
    "min-noise-multiplier": "min_noise_multiplier", "max-epsilon": "max_epsilon", "max-grad-norm": "max_grad_norm",
    "max-delta": "max_delta", "min-count-noise-multiplier": "min_count_noise_multiplier",
    "max-score-bins": "max_score_bins", "secure-aggregation-required": "secure_aggregation_required",
    "max-update-norm": "max_update_norm",
}
FIELD_KEYS: dict[str, str] = {field: key for key, field in NODE_KEYS.items()}
#: Keys a run may set only in a simulation (one person runs both sides).
SIMULATION_ONLY = ("privacy.seed", "privacy.ledger_dir", "federation.state_dir", "data.cache_dir")


def _truthy(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise PublicError(f"node config {key!r} must be true or false, got {value!r}")


def _positive(value: Any, key: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise PublicError(f"node config {key!r} must be a number, got {value!r}") from error
    if not (math.isfinite(number) and number > 0):
        raise PublicError(f"node config {key!r} must be a positive number, got {value!r}")
    return number


@dataclass(frozen=True)
class SitePolicy:
    """What this hospital accepts (see the module docstring); the defaults accept any run."""

    data_root: str | None = None
    state_dir: str | None = None
    cache_dir: str | None = None
    privacy_required: bool = False
    privacy_scope: str | None = None
    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None
    max_grad_norm: float | None = None
    max_delta: float | None = None
    min_count_noise_multiplier: float = 1.0
    max_score_bins: int = 1000
    secure_aggregation_required: bool = False
    max_update_norm: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "privacy_required", _truthy(self.privacy_required, FIELD_KEYS["privacy_required"]))
        object.__setattr__(self, "secure_aggregation_required",
                           _truthy(self.secure_aggregation_required, FIELD_KEYS["secure_aggregation_required"]))
        for name in ("min_noise_multiplier", "max_epsilon", "max_grad_norm", "max_delta", "min_count_noise_multiplier",
                     "max_update_norm"):
            object.__setattr__(self, name, _positive(getattr(self, name), FIELD_KEYS[name]))
        try:
            bins = int(self.max_score_bins)
        except (TypeError, ValueError) as error:
            raise PublicError(f"node config 'max-score-bins' must be an integer, got {self.max_score_bins!r}") from error
        if bins < 2:
            raise PublicError(f"node config 'max-score-bins' must be >= 2, got {self.max_score_bins!r}")
        object.__setattr__(self, "max_score_bins", bins)
        if self.max_delta is not None and not self.max_delta < 1.0:
            raise PublicError(f"node config 'max-delta' must be below 1, got {self.max_delta!r}")
        if self.privacy_scope is not None and self.privacy_scope not in SCOPES:
            raise PublicError(f"node config 'privacy-scope' must be one of {list(SCOPES)}, got {self.privacy_scope!r}")
        for name in ("data_root", "state_dir", "cache_dir"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value in (None, "") else str(value))

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        return cls(**{field: node_config[key] for key, field in NODE_KEYS.items() if key in node_config})

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, where: str) -> SitePolicy:
        return cls() if not mapping else dataclass_from_mapping(cls, mapping, where)

    @property
    def required_scope(self) -> str | None:
        """The least DP scope this hospital accepts: its ``privacy-scope``, or, when it requires DP
        without naming one, the strictest scope (``discriminator``); None when DP is not required."""
        if self.privacy_scope is not None:
            return self.privacy_scope
        return SCOPES[-1] if self.requires_privacy else None

    @property
    def requires_privacy(self) -> bool:
        """DP is required explicitly or by any privacy floor."""
        return self.privacy_required or any(v is not None for v in (self.privacy_scope, self.min_noise_multiplier,
                                                                    self.max_epsilon, self.max_grad_norm,
                                                                    self.max_delta))

    @property
    def count_noise_floor(self) -> float:
        """The least noise multiplier of the count release this hospital accepts (with DP required)."""
        return max(self.min_count_noise_multiplier, self.min_noise_multiplier or 0.0)

    def describe(self) -> str:
        """``key=value`` of the floors set (for messages)."""
        return " ".join(f"{FIELD_KEYS[f.name]}={getattr(self, f.name)}" for f in fields(self)
                        if f.name not in ("data_root", "state_dir", "cache_dir", "min_count_noise_multiplier",
                                          "max_score_bins", "secure_aggregation_required", "max_update_norm")
                        and getattr(self, f.name) not in (None, False))


def _get(run: Mapping[str, Any], dotted: str) -> Any:
    node: Any = run
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def check_deployment_keys(run: Mapping[str, Any], policy: SitePolicy) -> None:
    """In a deployment: refuse coordinator-set keys that only the hospital may decide."""
    for key in SIMULATION_ONLY:
        if _get(run, key) not in (None, ""):
            raise Refusal(key, "a deployed hospital decides this itself (in its node config); the run "
                               "configuration must leave it null")
    data = run.get("data") or {}
    if data.get("root") not in (None, "") and policy.data_root is None:
        raise Refusal("data.root", "a deployed hospital's data folder comes from its node config ('data-root'), "
                                   "never from the run configuration")


def check_evaluation(score_bins: int, policy: SitePolicy) -> None:
    """Before an evaluation: the score histograms are no finer than this hospital allows."""
    if int(score_bins) > policy.max_score_bins:
        raise Refusal("federation.score_bins", f"{score_bins} bins would place single patches' class scores "
                                               f"too precisely; this hospital allows at most {policy.max_score_bins} "
                                               f"(node config max-score-bins)")


def check_secure_policy(run: Mapping[str, Any], policy: SitePolicy, secure: bool) -> None:
    """Before training: an update leaves this hospital in the clear only where the run and the
    hospital allow it, and under SecAgg+ the clipping norm is within the hospital's ceiling."""
    declared = _get(run, "federation.secure_aggregation")
    if not secure and declared not in (None, "none"):
        raise Refusal("federation.secure_aggregation", f"the run declares {declared!r}, but this instruction is "
                                                       f"not part of a secure-aggregation round; no update is sent "
                                                       f"in the clear")
    if not secure and policy.secure_aggregation_required:
        raise Refusal("federation.secure_aggregation", "this hospital sends its update only through secure "
                                                       "aggregation (node config secure-aggregation-required)")
    if secure and policy.max_update_norm is not None:
        norm = _get(run, "federation.secaggplus.update_norm")
        if not isinstance(norm, (int, float)) or float(norm) > policy.max_update_norm:
            raise Refusal("federation.secaggplus.update_norm", f"{norm} is above this hospital's ceiling "
                                                               f"(node config max-update-norm={policy.max_update_norm:g})")


def check_privacy(cfg: PrivacyConfig, policy: SitePolicy) -> None:
    """Before any data is read: the run's privacy settings against the hospital's floor."""
    if not policy.requires_privacy:
        return
    floor = policy.describe()
    if not cfg.enabled:
        raise Refusal("privacy.enabled", f"this hospital trains only with differential privacy ({floor})")
    required = policy.required_scope
    if required is not None and SCOPES.index(cfg.scope) < SCOPES.index(required):
        why = "" if policy.privacy_scope is not None else (
            f"; it names no privacy-scope, which means the strict one, {required!r}")
        raise Refusal("privacy.scope", f"{cfg.scope!r} covers less than this hospital requires ({floor}{why})")
    if policy.max_grad_norm is not None and cfg.max_grad_norm > policy.max_grad_norm:
        raise Refusal("privacy.max_grad_norm", f"{cfg.max_grad_norm:g} is above this hospital's ceiling ({floor})")
    if policy.min_noise_multiplier is not None:
        if cfg.noise_multiplier is not None and cfg.noise_multiplier < policy.min_noise_multiplier:
            raise Refusal("privacy.noise_multiplier",
                          f"{cfg.noise_multiplier:g} is below this hospital's floor ({floor})")
        if cfg.centre_noise_multiplier < policy.min_noise_multiplier:  # the head centre's release (if the model has one)
            raise Refusal("privacy.centre_noise_multiplier",
                          f"{cfg.centre_noise_multiplier:g} is below this hospital's floor ({floor})")
    from common.privacy.accounting import counts_noise_multiplier  # Opacus: only when DP is asked for

    count_sigma = counts_noise_multiplier(cfg.count_noise_std)
    if count_sigma < policy.count_noise_floor:
        raise Refusal("privacy.count_noise_std",
                      f"{cfg.count_noise_std:g} gives the count release a noise multiplier of {count_sigma:.3g}, "
                      f"below this hospital's floor of {policy.count_noise_floor:g} ({floor})")


def check_derived_noise(noise_multiplier: float, cfg: PrivacyConfig, policy: SitePolicy) -> None:
    """A noise multiplier derived from ``privacy.target_epsilon`` against the floor."""
    if policy.min_noise_multiplier is not None and noise_multiplier < policy.min_noise_multiplier:
        raise Refusal("privacy.target_epsilon",
                      f"{cfg.target_epsilon:g} needs a noise multiplier of {noise_multiplier:.4g}, below this "
                      f"hospital's floor ({policy.describe()})")


def judged_delta(run_delta: float, num_examples: int, policy: SitePolicy) -> float:
    """The delta at which this hospital's epsilon is accounted and its budget judged: the run's,
    but never above the hospital's ``max-delta``, nor, for a hospital that requires DP without
    setting one, above the default min(1e-5, 1/(10 n)). (The same noise at a smaller delta is a
    larger epsilon: a coordinator cannot buy steps by raising delta.)"""
    from common.privacy.accounting import default_delta

    if policy.max_delta is not None:
        return min(run_delta, policy.max_delta)
    if policy.requires_privacy:
        return min(run_delta, default_delta(num_examples))
    return run_delta


def pre_release_delta(run_delta: float | None, policy: SitePolicy) -> float:
    """The delta of the budget check made before the count release (n not yet released): the
    smallest of the run's, the hospital's ``max-delta`` and 1e-5, so the check never under-counts."""
    return min(d for d in (run_delta, policy.max_delta, 1e-5) if d is not None)


def effective_max_epsilon(cfg: PrivacyConfig, policy: SitePolicy) -> tuple[float | None, str]:
    """The stricter lifetime budget of the run's and the hospital's, and where it comes from."""
    run, own = cfg.max_epsilon, policy.max_epsilon
    if own is not None and (run is None or own < run):
        return own, (f"this hospital's max-epsilon (node config; the run's privacy.max_epsilon is "
                     f"{'null' if run is None else format(run, 'g')})")
    return run, "privacy.max_epsilon"
