"""A hospital's privacy ledger: every DP round it ever trained, per data set, in its state folder.

``privacy-ledger.json`` (atomic rewrites, append-only content)::

    {"format": "fedvitgan-privacy-ledger/1",
     "datasets": {"<fingerprint>": {"description": {...},
                                    "entries": [{"run": ..., "round": 3, "attempt": 1,
                                                 "noise_multiplier": 1.0, "sample_rate": 0.25,
                                                 "steps": 50, "delta": 1e-05, "scope": ...,
                                                 "accountant": "rdp", "recorded": "..."}]}}}

Entries are never removed or replaced: a round trained twice (a crash between training and the
server's checkpoint, then a resume) has two entries, because the data were used twice. Epsilon over
all entries of a data set is the hospital's lifetime figure; over one run's entries, that run's.
A ledger that exists but cannot be read stops training (starting afresh would under-count).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.privacy.accounting import History, compact

FORMAT = "fedvitgan-privacy-ledger/1"
FILENAME = "privacy-ledger.json"


class LedgerError(RuntimeError):
    """The ledger file exists but cannot be used; the message names it."""


def dataset_fingerprint(data: Mapping[str, Any], site_id: int, seed: int) -> tuple[str, dict[str, Any]]:
    """(key, description) of a hospital's training data for the ledger.

    Coarse on purpose, so that it errs towards composing more: a data set is its name and folder
    (resolved); re-partitioned, resized or relabelled copies of the same folder share one key. The
    synthetic set has no folder: its patches are defined by the seed and the hospital's index.
    """
    root = data.get("root")
    description: dict[str, Any] = {"dataset": str(data.get("name")),
                                   "root": str(Path(str(root)).expanduser().resolve()) if root else None}
    if not root:
        description.update({"seed": int(seed), "site_id": int(site_id)})
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return key, description


class PrivacyLedger:
    """Read and append the ledger at ``path``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @classmethod
    def in_folder(cls, folder: Path | str) -> PrivacyLedger:
        return cls(Path(folder) / FILENAME)

    def load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"format": FORMAT, "datasets": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            raise LedgerError(f"cannot read the privacy ledger {self.path}: {error}. Training stops rather than "
                              f"restart the privacy accounting; restore the file from a backup.") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("datasets"), dict):
            raise LedgerError(f"{self.path} is not a fedvitgan privacy ledger ({FORMAT}); restore it from a backup")
        return data

    def entries(self, dataset: str) -> list[dict[str, Any]]:
        return list(self.load()["datasets"].get(dataset, {}).get("entries", []))

    def history(self, dataset: str, run: str | None = None, exclude_run: str | None = None) -> History:
        """Accountant history of the entries of ``dataset`` (of one run, or all but one run)."""
        rows = [e for e in self.entries(dataset)
                if (run is None or e["run"] == run) and (exclude_run is None or e["run"] != exclude_run)]
        return compact((float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in rows)

    def append(self, dataset: str, description: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
        """Add one trained round (atomic rewrite); returns the stored entry with its attempt number."""
        data = self.load()
        record = data["datasets"].setdefault(dataset, {"description": dict(description), "entries": []})
        same = [e for e in record["entries"] if e["run"] == entry["run"] and e["round"] == entry["round"]]
        stored = {**dict(entry), "attempt": len(same) + 1, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        record["entries"].append(stored)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        with open(tmp, "w") as handle:
            handle.write(json.dumps(data, indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        return stored
