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

**Tamper-evident.** Every record carries ``chain``, the SHA-256 of the previous record's chain
value and its own content, so the records form a hash chain; the marker file
(``privacy-ledger.marker.json`` in the hospital's state folder) keeps, beside the ledger, its record
count and head hash after every append. A ledger that existed and is gone, was emptied, cut short,
rolled back to an older copy or edited in the middle no longer extends what the marker saw, and
stops training in every later run, rather than restart or lower the accounting. (Records written
before the chain existed carry no ``chain`` and are still read; the marker covers them too.)

**One budget per data folder.** A data set is keyed by its resolved folder (the synthetic set, which
has none, by seed and hospital), never by ``data.name``: the same files under another name share
one budget. Entries keyed the older way (name and folder) count towards the folder's budget.

The format of the first version (``privacy-ledger.json``) is still read.
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
CENTRE = "centre"  # the Gaussian release of the head centre (common/privacy/centre.py)
#: Releases of one Gaussian step at sample rate 1, counted in full from the moment they begin.
ONE_STEP = (COUNTS, CENTRE)


class LedgerError(RuntimeError):
    """The ledger cannot be used (unreadable, gone, or older than the local state); names the file."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


GENESIS = "0" * 64  # the chain value before a ledger's first record


def chain_value(previous: str, record: Mapping[str, Any]) -> str:
    """The hash-chain value of ``record`` (its ``chain`` entry left out) after ``previous``."""
    body = json.dumps({k: v for k, v in record.items() if k != "chain"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((previous + body).encode()).hexdigest()


def _data_key(description: Mapping[str, Any]) -> str:
    """The ledger key of a data set: its resolved folder, or, with none, the synthetic set's seed and hospital."""
    root = description.get("root")
    identity = {"root": root} if root else {"synthetic": True, "seed": description.get("seed"),
                                            "site_id": description.get("site_id")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def dataset_fingerprint(data: Mapping[str, Any], site_id: int, seed: int) -> tuple[str, dict[str, Any]]:
    """(key, description) of a hospital's training data for the ledger.

    Coarse on purpose, so that it errs towards composing more: a data set is its resolved folder,
    whatever ``data.name`` calls it; re-partitioned, resized, relabelled or renamed uses of the same
    folder share one key. The synthetic set has no folder: its patches are defined by the seed and
    the hospital's index. The name stays in the description, for people.
    """
    root = data.get("root")
    description: dict[str, Any] = {"dataset": str(data.get("name")),
                                   "root": str(Path(str(root)).expanduser().resolve()) if root else None}
    if not root:
        description.update({"seed": int(seed), "site_id": int(site_id)})
    return _data_key(description), description


@dataclass(frozen=True)
class Attempt:
    """One DP release of a data set: a training attempt (``sgd``), the count release (``counts``) or a
    head-centre release (``centre``)."""

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
        """DP-SGD steps (0 for the count and centre releases)."""
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

    def same_data(self, dataset: str, description: Mapping[str, Any] | None = None) -> list[str]:
        """The keys whose releases were made on the same data as ``dataset``: itself and any key of
        the older kind (name and folder) whose description has the same folder."""
        described = description if description is not None else self.descriptions.get(dataset, {})
        wanted = _data_key(described) if described else dataset
        keys = [k for k, d in self.descriptions.items() if k == dataset or (d and _data_key(d) == wanted)]
        return sorted(set(keys) | ({dataset} if dataset in self.attempts else set()))

    def attempts_on(self, dataset: str, description: Mapping[str, Any] | None = None) -> list[Attempt]:
        """Every release on the same data as ``dataset`` (``same_data``)."""
        return [a for key in self.same_data(dataset, description) for a in self.attempts.get(key, [])]


class _Parser:
    """Folds ledger records into a ``LedgerContent``."""

    def __init__(self, expected: tuple[int, str] | None = None) -> None:
        self.content = LedgerContent()
        self.open: dict[tuple[str, int], dict[str, Any]] = {}
        self.order: list[tuple[str, int]] = []
        self.head = GENESIS
        self.chained = False
        #: (records, head) the marker saw; the head this ledger had after that many records.
        self.expected = expected
        self.head_at_expected: str | None = GENESIS if expected is not None and expected[0] == 0 else None

    def add(self, record: Mapping[str, Any]) -> None:
        if not isinstance(record, Mapping):
            raise ValueError("not a JSON object")
        self.head = chain_value(self.head, record)
        if "chain" in record:
            if record["chain"] != self.head:
                raise ValueError("the hash chain breaks here: this record or one before it was changed")
            self.chained = True
        elif self.chained:
            raise ValueError("a record without its chain value after chained records")
        kind = record.get("type")
        self.content.records += 1
        if self.expected is not None and self.content.records == self.expected[0]:
            self.head_at_expected = self.head
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
        """The content so far (the parser can go on reading afterwards)."""
        content = LedgerContent(dict(self.content.descriptions), {}, dict(self.content.counts), self.content.records)
        for dataset, number in self.order:
            state = self.open[(dataset, number)]
            kind = str(state["kind"])
            if kind in ONE_STEP:
                steps = 1  # counted from the moment the release began
            else:
                steps = int(state.get("steps_end", state["steps_seen"]))
            content.attempts.setdefault(dataset, []).append(Attempt(
                dataset, number, kind, str(state["run"]), int(state["round"]), float(state["noise_multiplier"]),
                float(state["sample_rate"]), steps, int(state.get("planned_steps", steps)), bool(state["finished"])))
        return content


class PrivacyLedger:
    """Read and append the ledger at ``path``; ``marker`` remembers that it exists, and its record
    count and head hash."""

    def __init__(self, path: Path | str, marker: Path | str | None = None) -> None:
        self.path = Path(path)
        self.marker = Path(marker) if marker is not None else self.path.with_name(MARKER)
        #: (file size, parser) after this object's last append: the next append reads nothing when
        #: the file and the marker are as it left them (one DP step is one append).
        self._after_append: tuple[int, _Parser] | None = None

    @classmethod
    def in_folder(cls, folder: Path | str, marker_folder: Path | str | None = None) -> PrivacyLedger:
        """The ledger in ``folder``; its marker in ``marker_folder`` (default: the same folder)."""
        return cls(Path(folder) / FILENAME, Path(marker_folder or folder) / MARKER)

    @property
    def legacy_path(self) -> Path:
        return self.path.with_name(LEGACY_FILENAME)

    # ---------------------------------------------------------------- the marker
    def _marker_data(self) -> dict[str, Any]:
        if not self.marker.is_file():
            return {}
        try:
            data = json.loads(self.marker.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except (OSError, ValueError) as error:
            raise LedgerError(f"cannot read the privacy ledger marker {self.marker}: {error}; restore it from a "
                              f"backup (it records which ledgers this hospital has)") from error

    def _known(self) -> dict[str, str]:
        try:
            return {str(k): str(v) for k, v in (self._marker_data().get("ledgers") or {}).items()}
        except AttributeError as error:
            raise LedgerError(f"the privacy ledger marker {self.marker} is malformed ({error}); restore it from a "
                              f"backup") from error

    def _key(self) -> str:
        return str(self.path.resolve())

    def _expected(self) -> tuple[int, str] | None:
        """(records, head) the marker saw at this ledger's last append, if it saw one."""
        head = (self._marker_data().get("heads") or {}).get(self._key())
        if head is None:
            return None
        try:
            return int(head["records"]), str(head["head"])
        except (KeyError, TypeError, ValueError) as error:
            raise LedgerError(f"the privacy ledger marker {self.marker} is malformed ({error}); restore it from a "
                              f"backup") from error

    def check_present(self) -> None:
        """``LedgerError`` if the marker says this ledger was created and the file is gone."""
        created = self._known().get(self._key())
        if created is not None and not self.path.is_file():
            raise LedgerError(
                f"the privacy ledger {self.path} existed (created {created}, recorded in {self.marker}) and is gone. "
                f"Training stops rather than restart the privacy accounting at zero: restore the ledger from a "
                f"backup. Only if this hospital's data set is also new may you delete {self.marker} to start afresh.")

    def _remember(self, records: int, head: str) -> None:
        """The marker now knows this ledger, its record count and head (under the marker's own lock:
        several ledgers may share one marker)."""
        with locked(self.marker.with_name(self.marker.name + ".lock")):
            data = self._marker_data()
            known = {str(k): str(v) for k, v in (data.get("ledgers") or {}).items()}
            key = self._key()
            known.setdefault(key, now())
            heads = dict(data.get("heads") or {})
            heads[key] = {"records": int(records), "head": head, "updated": now()}
            atomic_write_json(self.marker, {**data, "ledgers": known, "heads": heads})

    def _verify(self, parser: _Parser) -> None:
        """The ledger still extends what the marker saw: at least as many records, the same head there."""
        expected = parser.expected
        if expected is None:
            return
        records, head = expected
        if parser.content.records < records or parser.head_at_expected != head:
            found = f"{parser.content.records} records" + ("" if parser.content.records < records else
                                                            f", a different record {records}")
            raise LedgerError(
                f"the privacy ledger {self.path} no longer extends what this hospital last wrote ({records} records, "
                f"recorded in {self.marker}; found {found}): it was emptied, cut short, rolled back to an older copy "
                f"or edited. Training stops rather than under-count; restore the newest ledger from a backup.")

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

    def _parser(self, text: str, torn_counts: bool) -> _Parser:
        """The records of ``text`` read into a parser (legacy file first); ``torn_counts``: a last line
        without its newline that is a complete record counts too (reading for accounting), else it is
        left out (appending: the next append cuts it off)."""
        parser = _Parser(self._expected())
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
        self._verify(parser)
        if torn.strip() and torn_counts:
            try:  # a complete record whose newline was lost still counts
                parser.add(json.loads(torn))
            except (ValueError, KeyError, TypeError):
                pass
        return parser

    def _parse(self, text: str) -> LedgerContent:
        return self._parser(text, torn_counts=True).finish()

    def load(self) -> LedgerContent:
        """The ledger's content (empty if it never existed); ``LedgerError`` if it is gone, unreadable,
        or no longer extends what the marker saw."""
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
        """Append ``records`` under the lock, each with its chain value, then record the new count and
        head in the marker. A callable gets the content read under the same lock (and may raise to
        append nothing: a check and the record it guards happen under one lock)."""
        self.check_present()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with locked(self.path) as fd:
            parser = self._unchanged_since_last_append(fd)
            if parser is None:
                os.lseek(fd, 0, os.SEEK_SET)
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                parser = self._parser(b"".join(chunks).decode(), torn_counts=False)
            if callable(records):
                records = records(parser.finish())
            if os.lseek(fd, 0, os.SEEK_END) == 0:
                records = [{"type": "header", "format": FORMAT, "created": now()}, *records]
            self._after_append = None
            for record in records:
                chained = {**record, "chain": chain_value(parser.head, record)}
                append_line(fd, json.dumps(chained))
                parser.add(chained)
            if new:
                fsync_folder(self.path.parent)
            self._remember(parser.content.records, parser.head)
            self._after_append = (os.fstat(fd).st_size, parser)

    def _unchanged_since_last_append(self, fd: int) -> _Parser | None:
        """This object's parser from its last append, if the file has its size and the marker its
        count and head still (nobody appended since, nothing was cut); else None (read it all)."""
        if self._after_append is None:
            return None
        size, parser = self._after_append
        if os.fstat(fd).st_size != size or self._expected() != (parser.content.records, parser.head):
            return None
        return parser

    def begin(self, dataset: str, description: Mapping[str, Any], kind: str, run: str, server_round: int,
              noise_multiplier: float, sample_rate: float, planned_steps: int,
              guard: Callable[[LedgerContent], None] | None = None, **fields: Any) -> Attempt:
        """Record the start of a release (its cost counts from now) and return it with its number.

        ``guard(content)``, called with the ledger as it stands under the append's lock, may raise to
        stop the release before it is recorded (the budget check): no other process can record a
        release between the check and this one."""
        numbers: list[int] = []

        def records(content: LedgerContent) -> list[dict[str, Any]]:
            if guard is not None:
                guard(content)
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
                       1 if kind in ONE_STEP else 0, int(planned_steps), False)

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
