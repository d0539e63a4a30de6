"""Send a phase's messages and collect the replies; in a deployment, look for them every ``reply_poll_s`` s.

Flower's ``Grid.send_and_receive`` pushes the messages and pulls the replies until all arrived or
the deadline passed. Its deployment grid (flwr 1.42's ``HttpGrid``, the ServerApp's link to the
SuperLink) looks for replies only every 3 s: a hospital's reply that lands 0.1 s after a look waits
2.9 s for the next, and every phase of a deployed run ended on that 3 s grid. Looking is one cheap
request to the SuperLink beside the ServerApp (``pull_messages`` of the ids still open), so there
``poll_replies`` looks every ``federation.reply_poll_s`` (default 0.2 s) and a phase ends within that
much of its last reply. Other grids keep their own loop (the simulation engine's looks every 0.1 s;
the tests' in-process grids answer at once).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid


def send_and_collect(grid: Grid, messages: Iterable[Message], *, timeout_s: float, poll_s: float) -> list[Message]:
    """The replies to ``messages`` that arrive within ``timeout_s`` (``poll_replies`` on a deployment grid)."""
    if isinstance(grid, HttpGrid):
        return poll_replies(grid, messages, timeout_s=timeout_s, poll_s=poll_s)
    return list(grid.send_and_receive(messages, timeout=timeout_s))


def poll_replies(grid: Grid, messages: Iterable[Message], *, timeout_s: float, poll_s: float) -> list[Message]:
    """Push ``messages``, then pull their replies every ``poll_s`` s until all arrived or ``timeout_s`` passed.

    Returns the replies that arrived (a hospital that missed the deadline has none: the strategy
    names it a straggler). Every reply a pull returns is kept, duplicates included, for the reply
    checks to judge.
    """
    if poll_s <= 0:
        raise ValueError(f"poll_s must be > 0 seconds, got {poll_s!r}")
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(poll_s, left))
    return replies
