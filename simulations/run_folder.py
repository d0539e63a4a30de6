"""A finished (or running) run folder as the post-run commands read it: summary and checkpoints.

``fedvitgan predict``, ``export``, ``generate`` and ``report`` take ``RUN`` (a run folder, using its
latest checkpoint or ``--round N``) or, where a model is read, a checkpoint file
``RUN/checkpoints/round-NNNN.safetensors``. The run's resolved config comes from its
``summary.json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT = re.compile(r"^round-(\d+)\.safetensors$")


class RunFolderError(ValueError):
    """A folder or file that is not a readable fedvitgan run (folder, checkpoint, summary); the
    message names the file at fault."""


def load_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``; ``RunFolderError`` naming the file when missing or unreadable."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise RunFolderError(f"{path} not found: is {run_dir} a fedvitgan run folder?")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunFolderError(f"cannot read {path}: {error}") from error
    if not isinstance(summary, dict) or not isinstance(summary.get("rounds", []), list):
        raise RunFolderError(f"{path} is not a fedvitgan run summary (no 'rounds' list)")
    if not isinstance(summary.get("config"), dict):
        raise RunFolderError(f"{path} holds no resolved config ('config'); is it a fedvitgan run summary?")
    return summary


@dataclass(frozen=True)
class RunCheckpoint:
    """One global checkpoint of a run: its folder, file, round and the run's summary."""

    run_dir: Path
    path: Path
    round: int
    summary: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.summary["config"]


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Round -> checkpoint file of every ``checkpoints/round-NNNN.safetensors`` in the run folder."""
    folder = run_dir / "checkpoints"
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = CHECKPOINT.match(path.name)
            if match:
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _latest(run_dir: Path, available: dict[int, Path]) -> int:
    """The last complete round: ``server_state.json``'s, else the highest checkpoint's."""
    state = run_dir / "checkpoints" / "server_state.json"
    if state.is_file():
        try:
            rnd = int(json.loads(state.read_text())["round"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunFolderError(f"cannot read {state}: {error}") from error
        if rnd in available:
            return rnd
    return max(available)


def resolve_checkpoint(path: Path | str, round_: int | None = None) -> RunCheckpoint:
    """The checkpoint ``path`` names: a run folder (its latest round, or ``round_``) or a checkpoint
    file inside a run folder's ``checkpoints/``."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        match = CHECKPOINT.match(path.name)
        if not match or path.parent.name != "checkpoints":
            raise RunFolderError(f"{path} is not a run checkpoint; expected RUN/checkpoints/round-NNNN.safetensors or "
                                 f"a run folder")
        if round_ is not None and round_ != int(match.group(1)):
            raise RunFolderError(f"--round {round_} contradicts the checkpoint file {path.name}")
        run_dir = path.parent.parent
        return RunCheckpoint(run_dir, path, int(match.group(1)), load_summary(run_dir))
    if not path.is_dir():
        raise RunFolderError(f"{path} does not exist; expected a run folder or a checkpoint file")
    summary = load_summary(path)
    available = checkpoints(path)
    if not available:
        raise RunFolderError(f"{path / 'checkpoints'} holds no round-NNNN.safetensors: the run has not finished a "
                             f"round yet")
    if round_ is None:
        round_ = _latest(path, available)
    if round_ not in available:
        raise RunFolderError(f"{path} has no checkpoint of round {round_}; it has rounds {list(available)}")
    return RunCheckpoint(path, available[round_], round_, summary)
