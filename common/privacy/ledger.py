"""A hospital's privacy ledger: every DP release it ever made, per data set, on its own disk.

``privacy-ledger.jsonl`` is append-only, one JSON record a line, each append made under an
exclusive ``fcntl`` lock and fsynced (``common.durable``), so concurrent processes never lose a
record and a crash loses at most the line being written (which is cut off by the next append)::

    {"type": "header", "format": "fedvitgan-privacy-ledger/2", "created": ...}
    {"type": "dataset", "dataset": "<fingerprint>", "description": {...}}
    {"type": "attempt", "dataset": ..., "attempt": 7, "kind": "sgd", "run": ..., "round": 3,
     "noise_multiplier": 1.0, "sample_rate": 0.25, "planned_steps": 50, ...}
    {"type": "step", "dataset": ..., "attempt": 7, "step": 1}          # before each step's noise
    {"type": "end", "dataset": ..., "attempt": 7, "steps": 50}
    {"type": "counts", "dataset": ..., "attempt": 1, "examples": 598, "labelled": 301}

Every training attempt gets the next attempt number of its data set (under the lock), which also
seeds the noise in the reproducible test mode. An attempt counts its steps from the moment each
step's noise is about to be drawn: an attempt cut short by a crash counts the steps it started,
none lost and none twice. Nothing is ever removed: a round trained twice (a crash between training
and the server's checkpoint, then a resume) is two attempts, because the data were used twice.

A ledger that existed and is gone (``privacy-ledger.marker.json`` in the hospital's state folder
remembers it) or cannot be read stops training, rather than restart the accounting at zero. The
format of the first version (``privacy-ledger.json``) is still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.durable import append_line, atomic_write_json, fsync_folder, locked
from common.privacy.accounting import History, compact

FORMAT = "fedvitgan-privacy-ledger/2"
FILENAME = "privacy-ledger.jsonl"
LEGACY_FORMAT = "fedvitgan-privacy-ledger/1"
LEGACY_FILENAME = "privacy-ledger.json"
MARKER = "privacy-ledger.marker.json"

SGD = "sgd"  # DP-SGD steps of one training attempt
COUNTS = "counts"  # the Gaussian release of the training-set size and labelled count


class LedgerError(RuntimeError):
    """The ledger cannot be used (unreadable, gone, or older than the local state); names the file."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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


@dataclass(frozen=True)
class Attempt:
    """One DP release of a data set: a training attempt (``sgd``) or the count release (``counts``)."""

    dataset: str
    number: int
    kind: str
    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    planned: int
    finished: bool

    @property
    def id(self) -> str:
        return f"{self.dataset}:{self.number}"

    @property
    def entry(self) -> tuple[float, float, int]:
        """Its accountant history entry (Opacus' (noise multiplier, sample rate, steps))."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def dp_steps(self) -> int:
        """DP-SGD steps (0 for the count release)."""
        return self.steps if self.kind == SGD else 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attempt:
        return cls(str(data["dataset"]), int(data["number"]), str(data["kind"]), str(data["run"]), int(data["round"]),
                   float(data["noise_multiplier"]), float(data["sample_rate"]), int(data["steps"]),
                   int(data["planned"]), bool(data["finished"]))


def history_of(attempts: list[Attempt]) -> History:
    return compact(a.entry for a in attempts)


@dataclass
class ReleasedCounts:
    """The noisy training-set size and labelled count of a data set, released once and reused."""

    examples: int
    labelled: int
    noise_std: float
    attempt: int


@dataclass
class LedgerContent:
    """What a ledger holds, parsed: data sets, attempts in order, released counts, record count."""

    descriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    counts: dict[str, ReleasedCounts] = field(default_factory=dict)
    records: int = 0

    def last_attempt(self, dataset: str) -> int:
        return max((a.number for a in self.attempts.get(dataset, [])), default=0)


class _Parser:
    """Folds ledger records into a ``LedgerContent``."""

    def __init__(self) -> None:
        self.content = LedgerContent()
        self.open: dict[tuple[str, int], dict[str, Any]] = {}
        self.order: list[tuple[str, int]] = []

    def add(self, record: Mapping[str, Any]) -> None:
        kind = record.get("type")
        self.content.records += 1
        if kind == "header":
            if record.get("format") != FORMAT:
                raise ValueError(f"format {record.get('format')!r}, expected {FORMAT!r}")
            return
        dataset = str(record["dataset"])
        if kind == "dataset":
            self.content.descriptions.setdefault(dataset, dict(record.get("description") or {}))
            return
        key = (dataset, int(record["attempt"]))
        if kind == "attempt":
            if key in self.open:
                raise ValueError(f"attempt {key[1]} of data set {dataset} begins twice")
            self.open[key] = {**record, "steps_seen": 0, "finished": False}
            self.order.append(key)
            return
        if key not in self.open:
            raise ValueError(f"a {kind!r} record for attempt {key[1]} of data set {dataset}, which never began")
        state = self.open[key]
        if kind == "step":
            state["steps_seen"] = max(state["steps_seen"], int(record["step"]))
        elif kind == "end":
            state["steps_end"], state["finished"] = int(record["steps"]), True
        elif kind == "counts":
            self.content.counts[dataset] = ReleasedCounts(int(record["examples"]), int(record["labelled"]),
                                                          float(state["noise_std"]), key[1])
            state["finished"] = True
        else:
            raise ValueError(f"unknown record type {kind!r}")

    def finish(self) -> LedgerContent:
        for dataset, number in self.order:
            state = self.open[(dataset, number)]
            kind = str(state["kind"])
            if kind == COUNTS:
                steps = 1  # counted from the moment the release began
            else:
                steps = int(state.get("steps_end", state["steps_seen"]))
            self.content.attempts.setdefault(dataset, []).append(Attempt(
                dataset, number, kind, str(state["run"]), int(state["round"]), float(state["noise_multiplier"]),
                float(state["sample_rate"]), steps, int(state.get("planned_steps", steps)), bool(state["finished"])))
        return self.content


class PrivacyLedger:
    """Read and append the ledger at ``path``; ``marker`` remembers that it exists."""

    def __init__(self, path: Path | str, marker: Path | str | None = None) -> None:
        self.path = Path(path)
        self.marker = Path(marker) if marker is not None else self.path.with_name(MARKER)

    @classmethod
    def in_folder(cls, folder: Path | str, marker_folder: Path | str | None = None) -> PrivacyLedger:
        """The ledger in ``folder``; its marker in ``marker_folder`` (default: the same folder)."""
        return cls(Path(folder) / FILENAME, Path(marker_folder or folder) / MARKER)

    @property
    def legacy_path(self) -> Path:
        return self.path.with_name(LEGACY_FILENAME)

    # ---------------------------------------------------------------- existence
    def _known(self) -> dict[str, str]:
        if not self.marker.is_file():
            return {}
        try:
            data = json.loads(self.marker.read_text())
            return {str(k): str(v) for k, v in data.get("ledgers", {}).items()}
        except (OSError, ValueError, AttributeError) as error:
            raise LedgerError(f"cannot read the privacy ledger marker {self.marker}: {error}; restore it from a "
                              f"backup (it records which ledgers this hospital has)") from error

    def check_present(self) -> None:
        """``LedgerError`` if the marker says this ledger was created and the file is gone."""
        created = self._known().get(str(self.path.resolve()))
        if created is not None and not self.path.is_file():
            raise LedgerError(
                f"the privacy ledger {self.path} existed (created {created}, recorded in {self.marker}) and is gone. "
                f"Training stops rather than restart the privacy accounting at zero: restore the ledger from a "
                f"backup. Only if this hospital's data set is also new may you delete {self.marker} to start afresh.")

    def _remember(self) -> None:
        known = self._known()
        key = str(self.path.resolve())
        if key not in known:
            known[key] = now()
            atomic_write_json(self.marker, {"ledgers": known})

    # ---------------------------------------------------------------- reading
    def _legacy(self, parser: _Parser) -> None:
        if not self.legacy_path.is_file():
            return
        try:
            data = json.loads(self.legacy_path.read_text())
        except (OSError, ValueError) as error:
            raise LedgerError(f"cannot read the privacy ledger {self.legacy_path}: {error}. Training stops rather than "
                              f"restart the privacy accounting; restore the file from a backup.") from error
        if not isinstance(data, dict) or data.get("format") != LEGACY_FORMAT or not isinstance(data.get("datasets"), dict):
            raise LedgerError(f"{self.legacy_path} is not a fedvitgan privacy ledger ({LEGACY_FORMAT}); restore it from a backup")
        for dataset, record in data["datasets"].items():
            parser.add({"type": "dataset", "dataset": dataset, "description": record.get("description", {})})
            for number, entry in enumerate(record.get("entries", []), start=1):
                parser.add({"type": "attempt", "dataset": dataset, "attempt": number, "kind": SGD, "run": entry["run"],
                            "round": entry["round"], "noise_multiplier": entry["noise_multiplier"],
                            "sample_rate": entry["sample_rate"], "planned_steps": entry["steps"]})
                parser.add({"type": "end", "dataset": dataset, "attempt": number, "steps": entry["steps"]})

    def _parse(self, text: str) -> LedgerContent:
        parser = _Parser()
        self._legacy(parser)
        lines = text.split("\n")
        torn = lines.pop()  # "" after a final newline; else a line its writer did not finish
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                parser.add(json.loads(line))
            except (ValueError, KeyError, TypeError) as error:
                raise LedgerError(f"{self.path}, line {number}: not a ledger record ({error}). Training stops rather "
                                  f"than under-count; restore the file from a backup.") from error
        if torn.strip():
            try:  # a complete record whose newline was lost still counts
                parser.add(json.loads(torn))
            except (ValueError, KeyError, TypeError):
                pass
        return parser.finish()

    def load(self) -> LedgerContent:
        """The ledger's content (empty if it never existed); ``LedgerError`` if it is gone or unreadable."""
        self.check_present()
        try:
            text = self.path.read_text() if self.path.is_file() else ""
        except OSError as error:
            raise LedgerError(f"cannot read the privacy ledger {self.path}: {error}") from error
        return self._parse(text)

    def exists(self) -> bool:
        return self.path.is_file() or self.legacy_path.is_file()

    def history(self, dataset: str, run: str | None = None, exclude_run: str | None = None) -> History:
        """Accountant history of the data set's releases (of one run, or all but one run)."""
        attempts = [a for a in self.load().attempts.get(dataset, [])
                    if (run is None or a.run == run) and (exclude_run is None or a.run != exclude_run)]
        return history_of(attempts)

    # ---------------------------------------------------------------- appending
    def _append(self, records: list[dict[str, Any]] | Callable[[LedgerContent], list[dict[str, Any]]]) -> None:
        """Append ``records`` under the lock; a callable gets the content read under the same lock."""
        self.check_present()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with locked(self.path) as fd:
            if callable(records):
                os.lseek(fd, 0, os.SEEK_SET)
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                records = records(self._parse(b"".join(chunks).decode()))
            if os.lseek(fd, 0, os.SEEK_END) == 0:
                append_line(fd, json.dumps({"type": "header", "format": FORMAT, "created": now()}))
            for record in records:
                append_line(fd, json.dumps(record))
        if new:
            fsync_folder(self.path.parent)
            self._remember()

    def begin(self, dataset: str, description: Mapping[str, Any], kind: str, run: str, server_round: int,
              noise_multiplier: float, sample_rate: float, planned_steps: int, **fields: Any) -> Attempt:
        """Record the start of a release (its cost counts from now) and return it with its number."""
        numbers: list[int] = []

        def records(content: LedgerContent) -> list[dict[str, Any]]:
            numbers.append(content.last_attempt(dataset) + 1)
            out: list[dict[str, Any]] = []
            if dataset not in content.descriptions:
                out.append({"type": "dataset", "dataset": dataset, "description": dict(description)})
            out.append({"type": "attempt", "dataset": dataset, "attempt": numbers[0], "kind": kind, "run": run,
                        "round": int(server_round), "noise_multiplier": float(noise_multiplier),
                        "sample_rate": float(sample_rate), "planned_steps": int(planned_steps),
                        "recorded": now(), **fields})
            return out

        self._append(records)
        return Attempt(dataset, numbers[0], kind, run, int(server_round), float(noise_multiplier), float(sample_rate),
                       1 if kind == COUNTS else 0, int(planned_steps), False)

    def step(self, attempt: Attempt, step: int) -> None:
        """Step ``step`` (1-based) of ``attempt`` is about to draw its noise."""
        self._append([{"type": "step", "dataset": attempt.dataset, "attempt": attempt.number, "step": int(step)}])

    def end(self, attempt: Attempt, steps: int) -> Attempt:
        """The attempt finished after ``steps`` steps; returns it as the ledger now counts it."""
        self._append([{"type": "end", "dataset": attempt.dataset, "attempt": attempt.number, "steps": int(steps),
                       "recorded": now()}])
        return Attempt(attempt.dataset, attempt.number, attempt.kind, attempt.run, attempt.round,
                       attempt.noise_multiplier, attempt.sample_rate, int(steps), attempt.planned, True)

    def record_counts(self, attempt: Attempt, examples: int, labelled: int) -> None:
        """The noisy counts drawn in count-release ``attempt``."""
        self._append([{"type": "counts", "dataset": attempt.dataset, "attempt": attempt.number,
                       "examples": int(examples), "labelled": int(labelled), "recorded": now()}])
