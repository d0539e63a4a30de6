"""The run's ``summary.json``: the resolved config and one entry per round, appended as rounds end.

A resumed run appends to the same file. NaN metrics are written as ``null`` (strict JSON). Every
write is durable and atomic (``common.durable.atomic_write``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from common.durable import atomic_write


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


CONFIG_COPY = "run_config.json"  # in checkpoints/: the run's config, for a resume whose summary.json is damaged


class RunSummary:
    """Reads, extends and atomically rewrites ``<run>/summary.json``.

    A summary.json that cannot be read (cut short, edited) does not block the run: it is moved aside
    as ``summary.json.damaged-<time>`` (``damaged`` names the copy) and a new one is started, which
    the run rebuilds from its checkpoints."""

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / "summary.json"
        self.damaged: Path | None = None
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self.data = data
            except (OSError, ValueError) as error:
                self.damaged = self.path.with_name(f"summary.json.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
                self.path.replace(self.damaged)
                self.damage = f"{self.path} could not be read ({error}); kept as {self.damaged.name}"

    def start(self, config: dict[str, Any], transport: dict[str, Any], resumed_from: int | None,
              warnings: list[str] | None = None) -> None:
        """A new session: (re)record the config; ``warnings`` (e.g. a checkpoint skipped on resume)
        go into this session's entry."""
        if not self.data:
            self.data = {"config": config, "transport": transport, "rounds": [], "sessions": []}
        session: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_after_round": resumed_from}
        if warnings:
            session["warnings"] = list(warnings)
        self.data.setdefault("sessions", []).append(session)
        # A resumed run may extend federation.rounds; keep the latest resolved config.
        self.data["config"] = config
        self.data["transport"] = transport
        self.write()

    def add_round(self, entry: dict[str, Any]) -> None:
        rounds = [r for r in self.data.setdefault("rounds", []) if r.get("round") != entry.get("round")]
        rounds.append(entry)
        self.data["rounds"] = sorted(rounds, key=lambda r: r["round"])
        self.write()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        atomic_write(self.path, json.dumps(_clean(self.data), indent=2, allow_nan=False))
