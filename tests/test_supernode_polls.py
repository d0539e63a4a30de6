"""``fedvitgan supernode``: Flower's SuperNode loop with its two fixed waits shortened, nothing else."""

from __future__ import annotations

import importlib

import pytest

from client import supernode
from client.supernode import FLOWER_IDLE_WAIT_S, FLOWER_REPLY_WAIT_S, SUPERNODE_LOOP, ShorterWaits


def test_the_installed_flower_still_has_the_waits_we_shorten() -> None:
    # A Flower upgrade that renames or retunes them must fail here, not silently keep 3 s.
    assert supernode.flower_waits_found(importlib.import_module(SUPERNODE_LOOP))


def test_only_the_idle_and_reply_waits_change(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    waits = ShorterWaits(idle_s=0.7, reply_s=0.05)
    for seconds in (FLOWER_IDLE_WAIT_S, FLOWER_REPLY_WAIT_S, 0.1, 10):
        waits.sleep(seconds)
    assert slept == [0.7, 0.05, 0.1, 10]
    assert waits.time() > 0 and waits.monotonic() > 0  # the rest of the time module, unchanged


def test_shorten_waits_installs_them_in_flowers_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = importlib.import_module(SUPERNODE_LOOP)
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    waits = supernode.shorten_waits(idle_s=1.0, reply_s=0.1)
    assert loop.time is waits


def test_a_changed_flower_loop_is_refused_rather_than_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = importlib.import_module(SUPERNODE_LOOP)
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(supernode, "flower_waits_found", lambda module: False)
    with pytest.raises(RuntimeError, match="newer Flower"):
        supernode.shorten_waits(idle_s=1.0, reply_s=0.1)
    assert not isinstance(loop.time, ShorterWaits)


@pytest.mark.parametrize("idle_s, reply_s", [(0, 0.1), (1.0, -1), (61, 0.1)])
def test_waits_out_of_range_are_refused(idle_s: float, reply_s: float) -> None:
    with pytest.raises(ValueError, match="poll-s must be between"):
        ShorterWaits(idle_s, reply_s)
