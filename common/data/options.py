"""Reading a data set's options from its plain ``data`` config section, with the loader's defaults."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.data.errors import DataError


def data_root(cfg: Mapping[str, Any]) -> Path:
    """``data.root`` as an existing folder; ``DataError`` naming the key when unset or missing."""
    name = cfg.get("name")
    root = cfg.get("root")
    if root in (None, ""):
        raise DataError(f"data.root is not set for data set {name!r}; give the folder that holds the data "
                        f"set's files (e.g. data.root=/data/{name} on the command line)")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root {path} for data set {name!r} does not exist or is not a folder; "
                        f"expected the folder that holds the data set's files")
    return path


def split_names(cfg: Mapping[str, Any], defaults: Mapping[str, str | None]) -> dict[str, str]:
    """Split name -> on-disk name (file token or folder) from ``data.splits`` over ``defaults``.

    A split mapped to null is not available.
    """
    given = cfg.get("splits") or {}
    if not isinstance(given, Mapping):
        raise DataError(f"data.splits must map split names to file or folder names, got {given!r}")
    merged = {**defaults, **given}
    return {str(k): str(v) for k, v in merged.items() if v not in (None, "")}


def resolve_split(split: str, splits: Mapping[str, str], name: str) -> str:
    """The on-disk name of ``split``; ``DataError`` listing the known splits when it has none."""
    if split not in splits:
        raise DataError(f"data set {name!r} has no split {split!r}; its splits are {sorted(splits)} "
                        f"(set data.splits.{split} to add one)")
    return splits[split]


def class_names_option(cfg: Mapping[str, Any]) -> tuple[str, ...] | None:
    """``data.class_names`` as a tuple, or None when unset."""
    names = cfg.get("class_names")
    return tuple(str(n) for n in names) if names else None
