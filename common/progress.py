"""Progress of long work for the person waiting: a bar on a terminal, a periodic log line otherwise.

``Progress`` shows ``label [#####.....] done/total unit  rate  values`` on a terminal (redrawn at
most a few times a second, ended with a newline) and, when the output is not a terminal (a log
file, a Ray worker, a pipe), one log line every ``every_s`` seconds on the ``fedvitgan.progress``
logger. ``training_progress`` builds the callback ``LocalTrainer.train_round`` takes, from the
run's ``console`` config section.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from common.config import dataclass_from_mapping, defaults_from_conf

logger = logging.getLogger("fedvitgan.progress")

MODES: tuple[str, ...] = ("auto", "bar", "log", "off")
BAR_WIDTH = 20
REDRAW_S = 0.2


def _ensure_handler() -> None:
    """Make the progress logger's INFO lines visible where nothing would print them (a Ray worker, a
    bare process): a stderr handler. Configured logging that shows INFO (Hydra's) is used as it is,
    and a level someone set on this logger is respected."""
    if logger.hasHandlers() and logger.isEnabledFor(logging.INFO):
        return
    if logger.level != logging.NOTSET:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def format_values(values: Mapping[str, float], limit: int = 4) -> str:
    """``name 1.23  other 0.456`` for the first ``limit`` values."""
    return "  ".join(f"{k} {v:.3g}" for k, v in list(values.items())[:limit])


class Progress:
    """Progress of ``total`` units of work labelled ``label``; call ``update`` as units finish."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "steps",
        *,
        mode: str = "auto",
        every_s: float = 30.0,
        items: Callable[[], float] | None = None,
        item: str = "img",
        stream: TextIO | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {list(MODES)}")
        self.label, self.total, self.unit = label, int(total), unit
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.every_s = float(every_s)
        self.items = items  # items processed so far (e.g. images), for a rate in items per second
        self.item = item
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._last_log = self.started
        self._closed = False
        if self.mode == "log":
            _ensure_handler()

    def _rate(self, done: int) -> str:
        elapsed = time.perf_counter() - self.started
        if elapsed <= 0 or done <= 0:
            return ""
        if self.items is not None:
            return f"{self.items() / elapsed:.1f} {self.item}/s"
        return f"{done / elapsed:.2f} {self.unit}/s"

    def line(self, done: int, values: Mapping[str, float] | None = None) -> str:
        """The text of one progress report."""
        parts = [f"{self.label}: {done}/{self.total} {self.unit}", self._rate(done)]
        if values:
            parts.append(format_values(values))
        return "  ".join(p for p in parts if p)

    def update(self, done: int, values: Mapping[str, float] | None = None) -> None:
        """``done`` units of ``total`` finished; ``values`` are shown beside the count (e.g. losses)."""
        if self.mode == "off" or self._closed:
            return
        now = time.perf_counter()
        finished = done >= self.total
        if self.mode == "bar":
            if finished or now - self._last_draw >= REDRAW_S:
                self._draw(done, values)
                self._last_draw = now
        elif now - self._last_log >= self.every_s:
            logger.info("%s", self.line(done, values))
            self._last_log = now
        if finished:
            self.close()

    def _draw(self, done: int, values: Mapping[str, float] | None) -> None:
        filled = int(BAR_WIDTH * min(done, self.total) / max(self.total, 1))
        text = self.line(done, values).replace(": ", f" [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] ", 1)
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r" + text[:width].ljust(width))
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (a no-op for log lines and when already closed)."""
        if self.mode == "bar" and not self._closed:
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True


class TrainingProgress(Progress):
    """The ``progress`` callback of ``LocalTrainer.train_round``: ``(step, total, losses)``."""

    def __init__(self, label: str, total: int, **options: Any) -> None:
        self.images = 0
        super().__init__(label, total, "steps", items=lambda: self.images, **options)

    def count(self, batches: Iterable[Any]) -> Iterable[Any]:
        """``batches`` as they are, counting the images (the first tensor's first dimension) of each."""
        progress = self

        class Counted:
            def __iter__(self) -> Iterator[Any]:
                for batch in batches:
                    progress.images += int(batch[0].shape[0])
                    yield batch

        return Counted()

    def __call__(self, step: int, total: int, losses: dict[str, float]) -> None:
        self.total = int(total)
        self.update(step, {k: v for k, v in losses.items() if not k.startswith("adv_generator")})


@dataclass(frozen=True)
@defaults_from_conf("config.yaml", "console")
class ConsoleConfig:
    """The run config's ``console`` section (conf/config.yaml explains each key)."""

    quiet: bool
    progress: str  # auto | bar | log | off
    progress_every_s: float


def training_progress(console: Mapping[str, Any] | None, label: str, total: int) -> TrainingProgress | None:
    """The training progress callback the run's ``console`` section asks for (None when quiet or off);
    keys the section lacks take conf/config.yaml's values."""
    cfg = dataclass_from_mapping(ConsoleConfig, console or {}, "console")
    if cfg.quiet or cfg.progress == "off":
        return None
    return TrainingProgress(label, total, mode=cfg.progress, every_s=float(cfg.progress_every_s))
