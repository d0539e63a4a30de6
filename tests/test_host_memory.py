"""train.host_memory (common/train/host_memory.py): what it asks of the C library, and when."""

from __future__ import annotations

import platform

import pytest

from common.model import ModelConfig
from common.train import TrainConfig
from common.train.host_memory import (
    LARGEST_MMAP_THRESHOLD,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    NO_TRIM,
    apply_host_memory_policy,
)


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_retain_raises_the_mmap_threshold_to_its_largest_and_stops_trimming() -> None:
    libc = FakeLibc()
    assert apply_host_memory_policy("retain", libc) is True
    assert libc.calls == [(M_MMAP_THRESHOLD, 32 * 1024 * 1024), (M_TRIM_THRESHOLD, NO_TRIM)]
    assert LARGEST_MMAP_THRESHOLD == 32 * 1024 * 1024 and NO_TRIM == 2**31 - 1  # mallopt takes an int


def test_a_refusing_library_is_reported_and_release_asks_nothing() -> None:
    refusing = FakeLibc(answer=0)
    assert apply_host_memory_policy("retain", refusing) is False
    untouched = FakeLibc()
    apply_host_memory_policy("release", untouched)
    assert untouched.calls == []


def test_unknown_policies_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="host_memory"):
        apply_host_memory_policy("keep", FakeLibc())
    with pytest.raises(ValueError, match="host_memory"):
        TrainConfig(host_memory="keep")
    assert TrainConfig().host_memory == "retain"


def test_glibc_takes_the_settings() -> None:
    """On glibc (Linux, as in CI) the real call succeeds; elsewhere it reports that nothing was set."""
    expected = platform.libc_ver()[0] == "glibc"
    assert apply_host_memory_policy("retain") is expected


def test_every_trainer_applies_its_configured_policy(tiny_cfg: ModelConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import common.train.engine as engine
    from common.model import build_model

    asked: list[str] = []
    monkeypatch.setattr(engine, "apply_host_memory_policy", lambda policy: asked.append(policy) or True)
    engine.LocalTrainer(build_model(tiny_cfg, 5, seed=0), TrainConfig(host_memory="release"))
    engine.LocalTrainer(build_model(tiny_cfg, 5, seed=0), TrainConfig())
    assert asked == ["release", "retain"]
