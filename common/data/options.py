"""A data set's own options, typed: the keys of ``conf/data/<name>.yaml`` beyond the shared ones.

Each data set declares a frozen dataclass of its options (a subclass of :class:`DataSetOptions`, no
field with a default: ``conf/data/<name>.yaml`` holds every default) and registers it with its loader
(``common/data/catalog.py``). :func:`read_options` builds it from the ``data`` section and names any
key the data set does not know, or one its file does not set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.config import ConfigError, to_plain
from common.data.config import SHARED_DATA_KEYS
from common.data.errors import DataError

#: Keys of every ``data`` section that are not a data set's own options (the hospitals read them).
SITE_KEYS: tuple[str, ...] = (*SHARED_DATA_KEYS, "symmetries")

OptionsT = TypeVar("OptionsT", bound="DataSetOptions")


@dataclass(frozen=True, kw_only=True)
class DataSetOptions:
    """``data.name``, ``data.root`` and, in a subclass, the data set's own keys."""

    name: str
    root: str | None


@dataclass(frozen=True, kw_only=True)
class FileDataSetOptions(DataSetOptions):
    """A data set read from ``data.root``: also the splits its hospitals train and evaluate on."""

    train_split: str
    test_split: str


def read_options(cls: type[OptionsT], section: Mapping[str, Any] | Any) -> OptionsT:
    """``cls`` built from the ``data`` section; ``ConfigError`` naming an unknown or a missing key."""
    values = to_plain(section)
    name = values.get("name")
    fields = {f.name for f in dataclasses.fields(cls)}
    own = {k: v for k, v in values.items() if k in fields or k not in SITE_KEYS}
    unknown = sorted(set(own) - fields)
    if unknown:
        raise ConfigError(f"data.{unknown[0]} is not an option of data set {name!r}; its options are "
                          f"{sorted(fields - {'name', 'root'})} and {sorted(SITE_KEYS)} (conf/data/{name}.yaml)")
    missing = sorted(fields - set(own))
    if missing:
        raise ConfigError(f"data set {name!r}: data.{missing[0]} is not set (conf/data/{name}.yaml sets "
                          f"{', '.join(missing)})")
    return cls(**own)


def data_root(options: DataSetOptions) -> Path:
    """``data.root`` as an existing folder; ``DataError`` naming the key when unset or missing."""
    name, root = options.name, options.root
    if root in (None, ""):
        raise DataError(f"data.root is not set for data set {name!r}; give the folder that holds the data "
                        f"set's files (e.g. data.root=/data/{name} on the command line)")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root {path} for data set {name!r} does not exist or is not a folder; "
                        f"expected the folder that holds the data set's files")
    return path


def split_names(splits: Mapping[str, Any] | None) -> dict[str, str]:
    """Split name -> on-disk name (file token or folder) from ``data.splits``; a split mapped to null
    is not available."""
    given = splits or {}
    if not isinstance(given, Mapping):
        raise DataError(f"data.splits must map split names to file or folder names, got {given!r}")
    return {str(k): str(v) for k, v in given.items() if v not in (None, "")}


def resolve_split(split: str, splits: Mapping[str, str], name: str) -> str:
    """The on-disk name of ``split``; ``DataError`` listing the known splits when it has none."""
    if split not in splits:
        raise DataError(f"data set {name!r} has no split {split!r}; its splits are {sorted(splits)} "
                        f"(set data.splits.{split} to add one)")
    return splits[split]


def class_names_option(names: Any) -> tuple[str, ...] | None:
    """``data.class_names`` as a tuple, or None when unset."""
    return tuple(str(n) for n in names) if names else None
