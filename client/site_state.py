"""A hospital's own state folder: local training state saved per round, on the hospital's disk.

Context state in Flower survives across rounds of one run; this folder also survives a restart of
the hospital's process and a resumed run. Files are ``round-NNNN.safetensors`` (tensors plus a JSON
metadata entry), written atomically; the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class SiteStateError(RuntimeError):
    """A state file exists but cannot be read; the message names it."""


class SiteStateStore:
    """Round-stamped local state of one hospital in ``folder``."""

    def __init__(self, folder: Path | str, keep_last: int = 2) -> None:
        self.folder = Path(folder)
        self.keep_last = max(1, int(keep_last))

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:04d}.safetensors"

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = []
        for file in self.folder.glob("round-*.safetensors"):
            try:
                found.append(int(file.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(found)

    def save(self, server_round: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        """Write the state after ``server_round``; older files beyond ``keep_last`` are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(server_round)
        tmp = target.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"meta": json.dumps(meta)})
        os.replace(tmp, target)
        for old in self.rounds()[: -self.keep_last]:
            self.path(old).unlink(missing_ok=True)
        return target

    def load_before(self, server_round: int) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest state saved after a round earlier than ``server_round``, or None."""
        earlier = [r for r in self.rounds() if r < server_round]
        if not earlier:
            return None
        path = self.path(earlier[-1])
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as error:
            raise SiteStateError(
                f"cannot read the hospital state file {path}: {error}. Move it aside to start this "
                f"hospital's local state afresh, or restore it from a backup."
            ) from error
        return earlier[-1], tensors, meta
