"""A hospital's SuperNode that looks for work more often: ``fedvitgan supernode``.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none it waits a fixed
3 s before asking again; while a ClientApp works it checks for the reply every 0.5 s. Neither wait
has a setting. In a round the server sends the next message a fraction of a second after the last
reply, just as the SuperNode has started its 3 s wait, so nearly every message of a deployed run
sat about 3 s at the SuperLink before the hospital saw it (measured: 2.6-3.3 s per message).

This is Flower's ``flower-supernode`` (same flags, TLS, node authentication, state) with those two
waits shortened: ``--idle-poll-s`` (default 1.0 s; one small authenticated request per interval to
the SuperLink while idle, three times Flower's rate) and ``--reply-poll-s`` (default 0.1 s, local).
Every other wait of Flower's is left as it is. ``deploy/supernode.sh --warm`` runs it beside
``fedvitgan superexec``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from types import ModuleType

#: The fixed waits in flwr 1.42's ``flwr.supernode.start_client_internal`` (``time.sleep(3)`` when no
#: message came, ``time.sleep(0.5)`` while waiting for a reply or its contents).
FLOWER_IDLE_WAIT_S = 3
FLOWER_REPLY_WAIT_S = 0.5
SUPERNODE_LOOP = "flwr.supernode.start_client_internal"


class ShorterWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its two fixed waits shortened."""

    def __init__(self, idle_s: float, reply_s: float) -> None:
        for name, value in (("idle", idle_s), ("reply", reply_s)):
            if not 0 < value <= 60:
                raise ValueError(f"--{name}-poll-s must be between 0 (excluded) and 60 seconds, got {value}")
        self.idle_s, self.reply_s = idle_s, reply_s

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_WAIT_S:
            seconds = self.idle_s
        elif seconds == FLOWER_REPLY_WAIT_S:
            seconds = self.reply_s
        time.sleep(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def flower_waits_found(loop: ModuleType) -> bool:
    """Whether Flower's SuperNode loop still has the two fixed waits this module shortens."""
    source = inspect.getsource(loop)
    return f"time.sleep({FLOWER_IDLE_WAIT_S})" in source and f"time.sleep({FLOWER_REPLY_WAIT_S})" in source


def shorten_waits(idle_s: float, reply_s: float) -> ShorterWaits:
    """Give Flower's SuperNode loop the shorter waits (``RuntimeError`` if Flower's loop changed)."""
    loop = importlib.import_module(SUPERNODE_LOOP)
    if not flower_waits_found(loop):
        raise RuntimeError(f"{SUPERNODE_LOOP} no longer waits with time.sleep({FLOWER_IDLE_WAIT_S}) and "
                           f"time.sleep({FLOWER_REPLY_WAIT_S}) (a newer Flower?): use flower-supernode instead")
    waits = ShorterWaits(idle_s, reply_s)
    loop.time = waits  # type: ignore[attr-defined]
    return waits


def _parse_ours(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--idle-poll-s", type=float, default=1.0)
    parser.add_argument("--reply-poll-s", type=float, default=0.1)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``fedvitgan supernode``: Flower's ``flower-supernode`` with shorter polls."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip() if __doc__ else "", end="\n\n")
        print("--idle-poll-s S     seconds between asking the SuperLink for a message while idle (default 1.0; "
              f"Flower: {FLOWER_IDLE_WAIT_S})\n--reply-poll-s S    seconds between checks for the ClientApp's reply "
              f"(default 0.1; Flower: {FLOWER_REPLY_WAIT_S})\n\nFlower's flags:")
    ours, flower_args = _parse_ours(args)
    try:
        waits = shorten_waits(ours.idle_poll_s, ours.reply_poll_s)
    except (ValueError, RuntimeError) as error:
        print(f"fedvitgan supernode: {error}", file=sys.stderr)
        return 2
    print(f"fedvitgan supernode: polling the SuperLink every {waits.idle_s:g} s when idle, the ClientApp every "
          f"{waits.reply_s:g} s", flush=True)
    flower_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    sys.argv = ["fedvitgan supernode", *flower_args]
    flower_cli.flower_supernode()
    return 0
