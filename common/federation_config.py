"""The ``federation`` config section (``conf/federation/default.yaml``) as a typed, validated dataclass.

Built once per process from the run's config (the server when the run starts, a hospital per
instruction). No key has a default here: ``conf/federation/default.yaml`` is the one place each
default lives, and a missing or unknown key is an error that names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import dataclass_from_mapping
from common.records import TRANSPORT_DTYPES
from common.secure_aggregation import check_secure_aggregation


@dataclass(frozen=True)
class FederationConfig:
    """Hospitals, rounds, deadlines and what travels; every key is documented in the yaml."""

    num_sites: int
    rounds: int
    transport_dtype: str
    round_timeout_s: float
    reply_poll_s: float
    min_sites: int
    max_failed_rounds: int
    wait_for_sites_s: float
    evaluate_each_round: bool
    evaluate_batch_size: int
    score_bins: int
    max_site_examples: int
    max_abs_value: float
    checkpoint_keep_last: int
    local_state_keep_last: int
    state_dir: str | None
    #: Per-group rules; ``server.strategy.AggregationConfig`` types and checks them.
    aggregation: Mapping[str, Any]
    #: ``none`` or ``secaggplus`` (``common.secure_aggregation``), and the protocol's parameters.
    secure_aggregation: str
    secaggplus: Mapping[str, Any]
    #: The Flower simulation engine's resources per hospital.
    backend: Mapping[str, Any]

    def __post_init__(self) -> None:
        if self.transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"transport_dtype must be one of {sorted(TRANSPORT_DTYPES)}, got {self.transport_dtype!r}")
        at_least = {"num_sites": 1, "rounds": 0, "min_sites": 1, "max_failed_rounds": 1, "evaluate_batch_size": 1,
                    "score_bins": 1, "max_site_examples": 1, "checkpoint_keep_last": 0, "local_state_keep_last": 1}
        for key, low in at_least.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if isinstance(self.max_abs_value, bool) or not isinstance(self.max_abs_value, (int, float)) \
                or not 0 < self.max_abs_value < float("inf"):
            raise ValueError(f"max_abs_value must be a positive finite number, got {self.max_abs_value!r}")
        object.__setattr__(self, "max_abs_value", float(self.max_abs_value))
        for key in ("round_timeout_s", "wait_for_sites_s"):
            if not float(getattr(self, key)) >= 0:
                raise ValueError(f"{key} must be >= 0 seconds, got {getattr(self, key)!r}")
            object.__setattr__(self, key, float(getattr(self, key)))
        if isinstance(self.reply_poll_s, bool) or not isinstance(self.reply_poll_s, (int, float)) \
                or not 0 < self.reply_poll_s <= 60:
            raise ValueError(f"reply_poll_s must be between 0 (excluded) and 60 seconds, got {self.reply_poll_s!r}")
        object.__setattr__(self, "reply_poll_s", float(self.reply_poll_s))
        if not isinstance(self.evaluate_each_round, bool):
            raise ValueError(f"evaluate_each_round must be true or false, got {self.evaluate_each_round!r}")
        check_secure_aggregation(self.secure_aggregation, self.secaggplus, self.aggregation, self.num_sites)


def federation_config(section: Mapping[str, Any] | Any) -> FederationConfig:
    """The ``federation`` section as a ``FederationConfig`` (``ConfigError`` naming a bad key)."""
    return dataclass_from_mapping(FederationConfig, section, "federation")
