"""The ``partition`` config section (``conf/partition/<name>.yaml``) as a typed, validated dataclass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError, dataclass_from_mapping

#: Partition names, each with its own ``conf/partition/<name>.yaml``.
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "quantity", "natural", "none")
#: Partitions that draw Dirichlet(alpha) shares and need ``alpha`` and ``min_size``.
SKEWED: tuple[str, ...] = ("dirichlet", "quantity")


@dataclass(frozen=True)
class PartitionConfig:
    """How patches are split across hospitals; ``alpha`` and ``min_size`` only for ``dirichlet``/``quantity``.

    No key has a default here: each partition's yaml sets the keys it uses.
    """

    name: str
    alpha: float | None = None
    min_size: int | None = None

    def __post_init__(self) -> None:
        if self.name not in PARTITIONS:
            raise ConfigError(f"partition.name {self.name!r} is not known; choose one of {list(PARTITIONS)}")
        if self.name in SKEWED:
            for key in ("alpha", "min_size"):
                if getattr(self, key) is None:
                    raise ConfigError(f"partition.{key} is required for partition={self.name} "
                                      f"(conf/partition/{self.name}.yaml sets it)")
            object.__setattr__(self, "alpha", float(self.alpha))  # type: ignore[arg-type]
            object.__setattr__(self, "min_size", int(self.min_size))  # type: ignore[arg-type]
            if not self.alpha > 0:  # type: ignore[operator]
                raise ConfigError(f"partition.alpha must be > 0, got {self.alpha}")
            if self.min_size < 1:  # type: ignore[operator]
                raise ConfigError(f"partition.min_size must be >= 1, got {self.min_size}")

    @property
    def skew_alpha(self) -> float:
        """``alpha`` of a ``dirichlet``/``quantity`` partition (validated present)."""
        assert self.alpha is not None, f"partition {self.name} has no alpha"
        return self.alpha

    @property
    def skew_min_size(self) -> int:
        """``min_size`` of a ``dirichlet``/``quantity`` partition (validated present)."""
        assert self.min_size is not None, f"partition {self.name} has no min_size"
        return self.min_size


def partition_config(section: PartitionConfig | Mapping[str, Any] | Any) -> PartitionConfig:
    """The ``partition`` section as a ``PartitionConfig`` (one already built passes through)."""
    if isinstance(section, PartitionConfig):
        return section
    return dataclass_from_mapping(PartitionConfig, section, "partition")
