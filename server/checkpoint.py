"""Global model checkpoints (safetensors, keys prefixed by group) and the server's own state.

``checkpoints/round-NNNN.safetensors`` holds the global model after that round (its metadata
names the round and the architecture fingerprint); ``checkpoints/server_state.json`` names the
last complete round and its file. Both are written durably (``common.durable``), so a run killed
mid-write resumes from the previous complete round. If the newest checkpoint (or the state file)
cannot be read, ``latest`` falls back to the newest older checkpoint that can, and says so in
``warnings`` (the run records them in ``summary.json``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.durable import atomic_write_json, atomic_write_with

STATE_FILE = "server_state.json"

logger = logging.getLogger("fedvitgan.server")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable; the message names the file."""


@dataclass
class ServerState:
    """What the server needs to continue: the last finished round and its checkpoint."""

    round: int
    checkpoint: str
    config_fingerprint: str
    extra: dict[str, Any]


@dataclass
class LatestCheckpoint:
    """The checkpoint a run continues from, and what was skipped on the way (newest first)."""

    state: ServerState
    weights: dict[str, torch.Tensor]
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, index: int) -> Any:
        """``latest[0]``, ``latest[1]``: the (state, weights) pair ``latest()`` returned before."""
        return (self.state, self.weights)[index]


def _round_of(path: Path) -> int | None:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _bindings(state: ServerState | None, meta: dict[str, str]) -> dict[str, int]:
    """Site bindings for a fallback checkpoint: the state file's (newer, a superset), else the
    checkpoint's own metadata, else none."""
    if state is not None and state.extra.get("site_bindings"):
        return dict(state.extra["site_bindings"])
    try:
        return {str(k): int(v) for k, v in json.loads(meta.get("site_bindings", "{}")).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


class CheckpointStore:
    """Checkpoints of one run folder."""

    def __init__(self, run_dir: Path | str, keep_last: int = 0) -> None:
        self.folder = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:04d}.safetensors"

    def rounds(self) -> list[int]:
        found = [_round_of(p) for p in self.folder.glob("round-*.safetensors")] if self.folder.is_dir() else []
        return sorted(r for r in found if r is not None)

    def save(self, server_round: int, state: dict[str, torch.Tensor], fingerprint: str,
             extra: dict[str, Any] | None = None) -> Path:
        path = self.path(server_round)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        metadata = {"round": str(server_round), "config_fingerprint": fingerprint}
        if extra and extra.get("site_bindings") is not None:  # also here: a fallback checkpoint keeps them
            metadata["site_bindings"] = json.dumps(extra["site_bindings"], sort_keys=True)
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        atomic_write_json(self.folder / STATE_FILE, asdict(ServerState(server_round, path.name, fingerprint, extra or {})))
        if self.keep_last > 0:
            for old in self.rounds()[: -self.keep_last]:
                self.path(old).unlink(missing_ok=True)
        return path

    def load_round(self, server_round: int) -> dict[str, torch.Tensor]:
        """The global model saved after ``server_round``; ``CheckpointError`` naming the file."""
        path = self.path(server_round)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read checkpoint {path} (round {server_round}): {error}") from error

    def _read_state(self) -> tuple[ServerState | None, str | None]:
        state_path = self.folder / STATE_FILE
        if not state_path.is_file():
            return None, None
        try:
            return ServerState(**json.loads(state_path.read_text())), None
        except (OSError, ValueError, TypeError) as error:
            return None, f"cannot read {state_path}: {error}"

    def latest(self) -> LatestCheckpoint | None:
        """The newest readable checkpoint, or None if the run has none.

        Normally the one ``server_state.json`` names; if that file or the checkpoint is unreadable,
        the newest older checkpoint that reads, with a warning per file skipped. Raises
        ``CheckpointError`` when checkpoints exist and none can be read.
        """
        state, problem = self._read_state()
        warnings = [problem] if problem else []
        candidates = self.rounds()
        if state is not None:
            candidates = [r for r in candidates if r <= state.round]
            if state.round not in candidates:
                warnings.append(f"{self.folder / state.checkpoint} (round {state.round}, named in {STATE_FILE}) is missing")
        elif not candidates:
            if problem:
                raise CheckpointError(f"{problem}; and no checkpoint file is there to fall back to")
            return None
        for rnd in reversed(candidates):
            path = self.path(rnd)
            try:
                weights = load_file(str(path))
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata() or {}
            except (SafetensorError, OSError, ValueError) as error:
                warnings.append(f"cannot read checkpoint {path} (round {rnd}): {error}")
                continue
            fingerprint = meta.get("config_fingerprint") or (state.config_fingerprint if state else "")
            extra = dict(state.extra) if state is not None and state.round == rnd else {}
            if "site_bindings" not in extra:  # falling back: the bindings never shrink, keep the newest known
                extra["site_bindings"] = _bindings(state, meta)
            for warning in warnings:
                logger.warning("%s", warning)
            if warnings:
                logger.warning("continuing from the newest readable checkpoint, %s (round %d)", path, rnd)
            return LatestCheckpoint(ServerState(rnd, path.name, fingerprint, extra), weights, warnings)
        raise CheckpointError("no checkpoint in " + str(self.folder) + " can be read: " + "; ".join(warnings))
