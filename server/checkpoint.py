"""Global model checkpoints (safetensors, keys prefixed by group) and the server's own state.

``checkpoints/round-NNNN.safetensors`` holds the global model after that round;
``checkpoints/server_state.json`` names the last complete round and its file. Both are written
atomically, so a run killed mid-write resumes from the previous complete round.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "server_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable; the message names the file."""


@dataclass
class ServerState:
    """What the server needs to continue: the last finished round and its checkpoint."""

    round: int
    checkpoint: str
    config_fingerprint: str
    extra: dict[str, Any]


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


class CheckpointStore:
    """Checkpoints of one run folder."""

    def __init__(self, run_dir: Path | str, keep_last: int = 0) -> None:
        self.folder = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, server_round: int, state: dict[str, torch.Tensor], fingerprint: str,
             extra: dict[str, Any] | None = None) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"round-{server_round:04d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"round": str(server_round)})
        os.replace(tmp, path)
        _atomic_json(self.folder / STATE_FILE,
                     asdict(ServerState(server_round, path.name, fingerprint, extra or {})))
        if self.keep_last > 0:
            files = sorted(self.folder.glob("round-*.safetensors"))
            for old in files[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def load_round(self, server_round: int) -> dict[str, torch.Tensor]:
        """The global model saved after ``server_round``; ``CheckpointError`` naming the file."""
        path = self.folder / f"round-{server_round:04d}.safetensors"
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read checkpoint {path} (round {server_round}): {error}") from error

    def latest(self) -> tuple[ServerState, dict[str, torch.Tensor]] | None:
        """The last complete round's state and weights, or None if the run has no checkpoint."""
        state_path = self.folder / STATE_FILE
        if not state_path.is_file():
            return None
        try:
            state = ServerState(**json.loads(state_path.read_text()))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"cannot read {state_path}: {error}") from error
        weights_path = self.folder / state.checkpoint
        try:
            weights = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read checkpoint {weights_path} (round {state.round}): {error}") from error
        return state, weights
