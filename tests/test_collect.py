"""The server's reply collection: it ends a phase soon after the last reply, and keeps its deadline."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid

from server.collect import poll_replies, send_and_collect
from tests.fakes import InProcessGrid


class DelayedGrid(InProcessGrid):
    """Each message's reply becomes visible ``delays[node]`` seconds after the push (``None``: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        super().__init__(None, len(delays))
        self.delays = delays
        self.due: list[tuple[float, Message]] = []
        self.pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids, now = [], time.monotonic()
        for msg in messages:
            self._counter += 1
            msg.metadata._message_id = f"m{self._counter}"
            ids.append(msg.metadata.message_id)
            delay = self.delays[msg.metadata.dst_node_id]
            if delay is not None:
                self.due.append((now + delay, Message(RecordDict(), reply_to=msg)))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted, now = set(message_ids), time.monotonic()
        ready = [m for t, m in self.due if t <= now and m.metadata.reply_to_message_id in wanted]
        self.due = [(t, m) for t, m in self.due if m not in ready]
        return ready


def _messages(grid: InProcessGrid) -> list[Message]:
    return [grid.create_message(RecordDict(), "train", node, "1") for node in grid.get_node_ids()]


def test_a_phase_ends_within_one_poll_of_its_last_reply() -> None:
    grid = DelayedGrid({1: 0.0, 2: 0.35, 3: 0.6})
    started = time.monotonic()
    replies = poll_replies(grid, _messages(grid), timeout_s=30, poll_s=0.05)
    took = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2", "m3"]
    assert 0.6 <= took < 0.6 + 0.3  # Flower's own loop would have looked again only at 3 s
    assert grid.pulls >= 5


def test_a_silent_hospital_costs_the_deadline_not_more_and_the_others_are_kept() -> None:
    grid = DelayedGrid({1: 0.0, 2: None})
    started = time.monotonic()
    replies = poll_replies(grid, _messages(grid), timeout_s=0.4, poll_s=0.1)
    took = time.monotonic() - started
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert 0.4 <= took < 0.4 + 0.2


def test_all_replies_at_once_need_a_single_pull_and_no_sleep() -> None:
    grid = DelayedGrid({1: 0.0, 2: 0.0})
    started = time.monotonic()
    assert len(poll_replies(grid, _messages(grid), timeout_s=30, poll_s=5)) == 2
    assert grid.pulls == 1 and time.monotonic() - started < 1


def test_a_poll_interval_that_is_not_positive_is_refused() -> None:
    grid = DelayedGrid({1: 0.0})
    with pytest.raises(ValueError, match="poll_s must be > 0"):
        poll_replies(grid, _messages(grid), timeout_s=1, poll_s=0)


def test_a_deployment_grid_is_polled_by_our_loop_and_any_other_by_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr("server.collect.poll_replies", lambda grid, messages, **kw: seen.append("ours") or [])

    class Deployed(HttpGrid):
        def __init__(self) -> None:  # no SuperLink to connect to
            pass

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
            seen.append("flower's")
            return []

    class Local(DelayedGrid):
        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
            seen.append("flower's")
            return []

    send_and_collect(Deployed(), [], timeout_s=1, poll_s=0.1)
    send_and_collect(Local({}), [], timeout_s=1, poll_s=0.1)
    assert seen == ["ours", "flower's"]
