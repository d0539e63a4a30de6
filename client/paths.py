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


def pin_test_split(data: dict[str, Any], own: str | None) -> None:
    """A deployed hospital evaluates on its own held-out split: its node config's ``test-split``, or
    the data set's own (``test_split`` of ``conf/data/<name>.yaml`` as this hospital's pinned code ships
    it, not the run's). A run that names another is refused (``data.test_split``); the pinned name is
    written into ``data``."""
    from common.data.registry import data_set, shipped_option

    asked = data.get("test_split")
    if not data_set(data.get("name")).file_backed:  # a generated set has no split to choose
        if asked not in (None, ""):
            raise Refusal("data.test_split", f"a deployed hospital evaluates on its own held-out split, and data set "
                                             f"{data.get('name')!r} draws it itself: there is no split to choose")
        return
    mine = str(own) if own else str(shipped_option(str(data.get("name")), "test_split"))
    if asked not in (None, "") and str(asked) != mine:
        where = "its node config's test-split" if own else "the data set's own test split"
        raise Refusal("data.test_split", f"a deployed hospital evaluates on its own held-out split ({where}), "
                                         f"not one the run configuration chooses")
    data["test_split"] = mine


def check_held_out(data: Mapping[str, Any]) -> None:
    """The held-out split is not, and does not overlap, the training split: different split names,
    and (for file-backed sets with ``data.splits``) different places under the data folder, neither
    inside the other. ``Refusal`` naming the key otherwise."""
    from common.data.registry import data_set, site_splits

    if not data_set(data.get("name")).file_backed:
        return  # generated patches: training and held-out ones are drawn apart
    train, test = site_splits(data)
    if train == test:
        raise Refusal("data.test_split", f"the held-out split {test!r} is the training split")
    root, splits = data.get("root"), data.get("splits")
    if not root or not isinstance(splits, Mapping):
        return
    train_at, test_at = splits.get(train, train), splits.get(test, test)
    if train_at in (None, "") or test_at in (None, ""):
        return
    base = Path(str(root)).expanduser().resolve()
    a, b = (base / str(train_at)).resolve(), (base / str(test_at)).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise Refusal(f"data.splits.{test}", "the held-out split's place overlaps the training split's: "
                                             "evaluating there would send back scores of training patches")
