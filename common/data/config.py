"""The ``partition`` and ``data`` config sections (``conf/partition/``, ``conf/data/``) as typed, validated dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError, dataclass_from_mapping, to_plain

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


#: Keys every ``conf/data/<name>.yaml`` sets; the rest of the section is the data set's own options.
SHARED_DATA_KEYS: tuple[str, ...] = ("name", "root", "labeled_fraction", "labeled_per_class", "val_fraction",
                                     "drop_unlabelled")
#: Label-safe flips and rotations a data set may declare (``data.symmetries``): the 8 symmetries of
#: the square (histology), left-right mirroring alone, or none (digits, text). Mirrors
#: ``common.train.augment.SYMMETRIES``, which the data layer does not import.
DATA_SYMMETRIES: tuple[str, ...] = ("d4", "flips", "none")


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section: the keys every data set shares, typed and checked, and the whole section
    (``section``) for the data set's loader, which reads its own options from it."""

    name: str
    root: str | None
    labeled_fraction: float
    labeled_per_class: int | None
    val_fraction: float | None
    drop_unlabelled: bool
    section: Mapping[str, Any]

    def __post_init__(self) -> None:  # the ranges are checked where the labels are kept (common.data.labels)
        if not isinstance(self.drop_unlabelled, bool):
            raise ConfigError(f"data.drop_unlabelled must be true or false, got {self.drop_unlabelled!r}")
        symmetries = self.section.get("symmetries")  # read by training (every conf/data yaml sets it), not by loaders
        if symmetries is not None and symmetries not in DATA_SYMMETRIES:
            raise ConfigError(f"data.symmetries must be one of {list(DATA_SYMMETRIES)}, got {symmetries!r}")


def data_config(section: DataConfig | Mapping[str, Any] | Any) -> DataConfig:
    """The ``data`` section as a ``DataConfig`` (one already built passes through); a shared key that
    is missing is a ``ConfigError`` naming it."""
    if isinstance(section, DataConfig):
        return section
    values = to_plain(section)
    if not isinstance(values, Mapping):
        raise ConfigError(f"data: expected a mapping, got {type(values).__name__}")
    missing = [k for k in SHARED_DATA_KEYS if k not in values]
    if missing:
        raise ConfigError(f"data: missing required key(s) {missing} (every conf/data/<name>.yaml sets them)")
    return DataConfig(**{k: values[k] for k in SHARED_DATA_KEYS}, section=dict(values))
