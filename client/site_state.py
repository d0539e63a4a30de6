"""A hospital's own state folder: local training state saved per round and per run, on its disk.

Context state in Flower survives across rounds of one run; this folder also survives a restart of
the hospital's process and a resumed run. Each federated run has its own sub-folder
``<state-dir>/<site>/<run key>/`` (``run_key``: a hash of the coordinator's run folder, with
``run.json`` saying which run it is), so two runs never read or prune each other's files. Files are
``round-NNNN.safetensors`` (tensors plus a JSON metadata entry), written durably and atomically; the
newest ``keep_last`` of the run are kept. A newest file that cannot be read is skipped for the one
before it, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.durable import atomic_write_json, atomic_write_with

logger = logging.getLogger("fedvitgan.client")

RUN_FILE = "run.json"


class SiteStateError(RuntimeError):
    """State files exist but none can be read; the message names them."""


def run_key(run_id: str) -> str:
    """The folder name of a run's state: ``run-`` and 16 hex digits of SHA-256 of its id (the
    coordinator's run folder path), so no coordinator-sent text becomes a path component."""
    return "run-" + hashlib.sha256(str(run_id).encode()).hexdigest()[:16]


@dataclass
class LoadedState:
    """A state file read back: its round, tensors, metadata, and the newer files skipped."""

    round: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


class SiteStateStore:
    """Round-stamped local state of one hospital for one run, in ``folder``."""

    def __init__(self, folder: Path | str, keep_last: int, run_id: str | None = None) -> None:
        self.folder = Path(folder)
        self.keep_last = max(1, int(keep_last))
        self.run_id = run_id

    @classmethod
    def for_run(cls, site_folder: Path | str, run_id: str, keep_last: int) -> SiteStateStore:
        """The store of run ``run_id`` under a hospital's state folder, keeping its newest ``keep_last``
        rounds (``federation.local_state_keep_last``)."""
        return cls(Path(site_folder) / run_key(run_id), keep_last, run_id)

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
        """Write the state after ``server_round``; this run's older files beyond ``keep_last`` are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.run_id is not None and not (self.folder / RUN_FILE).is_file():
            atomic_write_json(self.folder / RUN_FILE, {"run": self.run_id, "first_saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        target = self.path(server_round)
        plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write_with(target, lambda tmp: save_file(plain, str(tmp), metadata={"meta": json.dumps(meta)}))
        for old in self.rounds()[: -self.keep_last]:
            self.path(old).unlink(missing_ok=True)
        return target

    def _read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
        if not isinstance(meta, dict):
            raise ValueError("metadata entry 'meta' is not a JSON object")
        return tensors, meta

    def load_before(self, server_round: int) -> LoadedState | None:
        """The newest readable state saved after a round earlier than ``server_round``, or None.

        Unreadable newer files are skipped (named in ``skipped`` and logged as warnings); if files
        exist and none can be read, ``SiteStateError``.
        """
        earlier = [r for r in self.rounds() if r < server_round]
        skipped: list[str] = []
        for rnd in reversed(earlier):
            path = self.path(rnd)
            try:
                tensors, meta = self._read(path)
            except (SafetensorError, OSError, ValueError) as error:
                skipped.append(f"cannot read the hospital state file {path}: {error}")
                logger.warning("%s; trying the previous one", skipped[-1])
                continue
            if skipped:
                logger.warning("continuing from %s (round %d)", path, rnd)
            return LoadedState(rnd, tensors, meta, skipped)
        if skipped:
            raise SiteStateError("; ".join(skipped) + ". No readable state file is left: move them aside to start "
                                 "this hospital's local state afresh, or restore them from a backup.")
        return None
