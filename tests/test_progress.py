"""Progress of local training: a bar on a terminal, periodic log lines otherwise, nothing when quiet."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from common.data.synthetic import SyntheticHistology
from common.model import ModelConfig, build_model
from common.progress import Progress, TrainingProgress, training_progress
from common.train import LocalTrainer, TrainConfig


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_train_round_reports_every_step_with_its_losses(tiny_cfg: ModelConfig) -> None:
    data = SyntheticHistology(16, 32, seed=3)
    trainer = LocalTrainer(build_model(tiny_cfg, data.num_classes, seed=0), TrainConfig(batch_size=8), seed=0)
    calls: list[tuple[int, int, dict[str, float]]] = []
    metrics = trainer.train_round(DataLoader(data, batch_size=8, drop_last=True), 3,
                                  progress=lambda step, total, losses: calls.append((step, total, losses)))
    assert [(step, total) for step, total, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    for _, _, losses in calls:
        assert {"adv_discriminator", "adv_generator", "cls_real"} <= set(losses) and "selected" not in losses
    mean = sum(losses["cls_real"] for _, _, losses in calls) / 3
    assert metrics.losses["cls_real"] == pytest.approx(mean)


def test_bar_on_a_terminal_shows_steps_rate_and_losses_and_ends_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    terminal = Terminal()
    progress = TrainingProgress("site-0 round 2", 4, stream=terminal)
    assert progress.mode == "bar"
    batches = progress.count([(torch.zeros(8, 3, 2, 2), torch.zeros(8))] * 4)
    for step, _ in enumerate(batches, start=1):
        progress(step, 4, {"cls_real": 1.25, "adv_discriminator": 0.5})
    text = terminal.getvalue()
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("site-0 round 2 [####################] 4/4 steps")
    assert "img/s" in last and "cls_real 1.25" in last and "adv_discriminator 0.5" in last
    assert text.endswith("\n") and text.count("\n") == 1
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal: the line is cut, never wrapped
    narrow = Terminal()
    TrainingProgress("site-0 round 2", 1, stream=narrow)(1, 1, {"cls_real": 1.25})
    assert [len(line) for line in narrow.getvalue().strip("\n").split("\r") if line] == [39]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_log_lines_when_not_a_terminal() -> None:
    pipe, lines = io.StringIO(), Lines()
    logger = logging.getLogger("fedvitgan.progress")
    logger.addHandler(lines)
    try:
        progress = Progress("predict", 10, "images", stream=pipe, every_s=0.0)
        assert progress.mode == "log" and logger.isEnabledFor(logging.INFO)
        progress.update(5, {"loss": 0.5})
        progress.update(10)
        slow = Progress("predict", 10, "images", stream=pipe, every_s=3600.0)
        slow.update(5)  # at most one line per every_s
    finally:
        logger.removeHandler(lines)
    assert [line.split("  ")[0] for line in lines.lines] == ["predict: 5/10 images", "predict: 10/10 images"]
    assert "loss 0.5" in lines.lines[0]
    assert pipe.getvalue() == ""  # no bar characters in a log file


def test_console_config_quiet_or_off_gives_no_progress() -> None:
    assert training_progress({"quiet": True}, "x", 10) is None
    assert training_progress({"progress": "off"}, "x", 10) is None
    made = training_progress({"progress": "log", "progress_every_s": 7}, "x", 10)
    assert isinstance(made, TrainingProgress) and made.mode == "log" and made.every_s == 7
    with pytest.raises(ValueError, match="progress mode 'loud'"):
        training_progress({"progress": "loud"}, "x", 10)


def test_training_progress_counts_the_real_images_it_is_fed(tiny_cfg: ModelConfig) -> None:
    data = SyntheticHistology(12, 32, seed=4)
    trainer = LocalTrainer(build_model(tiny_cfg, data.num_classes, seed=0), TrainConfig(batch_size=4), seed=0)
    terminal = Terminal()
    progress = TrainingProgress("site-1 round 1", 2, stream=terminal)
    loader = DataLoader(data, batch_size=4, drop_last=True, generator=torch.Generator().manual_seed(0))
    metrics = trainer.train_round(progress.count(loader), 2, progress=progress)
    assert progress.images == metrics.real_images == 8  # the rate is real images per second
    assert "2/2 steps" in terminal.getvalue() and "img/s" in terminal.getvalue()


def test_log_lines_reach_stderr_in_a_process_without_logging_set_up() -> None:
    """The Ray worker case: nothing configures logging there, yet the progress lines must show."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging; logging.getLogger().addHandler(logging.StreamHandler()); "  # a WARNING-level root, as in Ray
            "from common.progress import Progress; p = Progress('site-0 round 1', 2, every_s=0); p.update(1); p.update(2)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert [line.split("  ")[0] for line in done.stderr.splitlines()] == ["site-0 round 1: 1/2 steps",
                                                                        "site-0 round 1: 2/2 steps"]
