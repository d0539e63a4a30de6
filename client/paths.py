"""Paths that come from the coordinator's run configuration, confined to the hospital's own roots.

A value such as ``data.splits.train`` names something *inside* the hospital's data folder. It must
be relative, must not step up (``..``), and must resolve (symbolic links followed) to a place under
the root: ``data.splits.train=/`` or ``../../etc`` or a link out of the data folder are refused.
The refusal names the key, never what the hospital's disk holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from client.policy import Refusal


def confine(root: Path | str, value: Any, key: str) -> Path:
    """``root / value`` if it stays under ``root``; ``Refusal`` naming ``key`` otherwise."""
    text = str(value)
    pure = PurePath(text)
    if not text or "\x00" in text:
        raise Refusal(key, "an empty or malformed path")
    if pure.is_absolute() or text.startswith("~") or pure.drive:
        raise Refusal(key, "a path from the run configuration must be relative to the hospital's data folder")
    if ".." in pure.parts:
        raise Refusal(key, "a path from the run configuration must not contain '..'")
    base = Path(root).expanduser().resolve()
    target = (base / pure).resolve()
    if target != base and base not in target.parents:
        raise Refusal(key, "the path leads out of the hospital's data folder (through a symbolic link)")
    return target


def confine_splits(data: Mapping[str, Any]) -> None:
    """Every ``data.splits.<name>`` value stays under ``data.root`` (no-op without a root)."""
    root = data.get("root")
    splits = data.get("splits")
    if not root or not splits:
        return
    if not isinstance(splits, Mapping):
        raise Refusal("data.splits", "expected a mapping of split names to names under the data folder")
    for name, value in splits.items():
        if value not in (None, ""):
            confine(str(root), value, f"data.splits.{name}")
