"""A train reply's privacy-accountant history: accepted only in a run with DP on, and bounded."""

from __future__ import annotations

import pytest
import torch

from common import protocol
from server.replies import ReplyError, ReplyLimits, check_train_reply, max_history_entries
from tests.test_aggregate_streaming import _reply

REFERENCE = {"classifier.w": torch.zeros(2, 2)}
DP_ON = ReplyLimits(("a", "b"), 10, 1000, 5, max_abs_value=1e4, privacy_enabled=True)
DP_OFF = ReplyLimits(("a", "b"), 10, 1000, 5, max_abs_value=1e4, privacy_enabled=False)


def _with_history(noise: list[float], rate: list[float], steps: list[float]):
    msg = _reply(REFERENCE, "float32")
    metrics = msg.content.metric_records[protocol.METRICS]
    metrics[protocol.DP_HISTORY_NOISE], metrics[protocol.DP_HISTORY_RATE] = noise, rate
    metrics[protocol.DP_HISTORY_STEPS] = steps
    return msg


def test_a_short_history_is_accepted_with_dp_on() -> None:
    # the count release (1 step at rate 1), then round 1's 5 DP steps
    reply = check_train_reply(_with_history([7.07, 1.0], [1.0, 0.1], [1.0, 5.0]), {"classifier": REFERENCE},
                              "float32", DP_ON, server_round=1)
    assert reply.metrics[protocol.DP_HISTORY_STEPS] == [1.0, 5.0]


def test_a_history_is_refused_in_a_run_without_dp() -> None:
    with pytest.raises(ReplyError, match="trains without DP"):
        check_train_reply(_with_history([1.0], [0.1], [5.0]), {"classifier": REFERENCE}, "float32", DP_OFF)


@pytest.mark.parametrize("server_round", [1, 4])
def test_a_history_longer_than_the_rounds_allow_is_refused(server_round: int) -> None:
    bound = max_history_entries(server_round)
    ok = _with_history([1.0] * bound, [0.1] * bound, [1.0] * bound)
    check_train_reply(ok, {"classifier": REFERENCE}, "float32", DP_ON, server_round=server_round)
    n = bound + 1
    with pytest.raises(ReplyError, match=f"{n} entries in round {server_round}"):
        check_train_reply(_with_history([1.0] * n, [0.1] * n, [1.0] * n), {"classifier": REFERENCE}, "float32",
                          DP_ON, server_round=server_round)


@pytest.mark.parametrize("noise, rate, steps, message", [
    ([1.0, 1.0], [0.1], [1.0, 1.0], "different lengths"),
    ([0.0], [0.1], [1.0], "not a valid mechanism"),
    ([1.0], [1.5], [1.0], "not a valid mechanism"),
    ([1.0], [0.1], [2.5], "integer count"),
])
def test_a_malformed_history_is_refused(noise: list[float], rate: list[float], steps: list[float],
                                        message: str) -> None:
    with pytest.raises(ReplyError, match=message):
        check_train_reply(_with_history(noise, rate, steps), {"classifier": REFERENCE}, "float32", DP_ON)


def test_an_incomplete_history_is_refused() -> None:
    msg = _reply(REFERENCE, "float32")
    msg.content.metric_records[protocol.METRICS][protocol.DP_HISTORY_STEPS] = [1.0]
    with pytest.raises(ReplyError, match="incomplete"):
        check_train_reply(msg, {"classifier": REFERENCE}, "float32", DP_ON)


def test_a_history_with_more_steps_than_the_rounds_ran_is_refused() -> None:
    from server.replies import max_history_steps

    most = max_history_steps(2, DP_ON.max_generator_steps)  # 1 + 2 x 2 x 5 = 21
    ok = _with_history([1.0, 2.0], [0.1, 0.1], [1.0, float(most - 1)])
    check_train_reply(ok, {"classifier": REFERENCE}, "float32", DP_ON, server_round=2)
    with pytest.raises(ReplyError, match="22 steps in round 2"):
        check_train_reply(_with_history([1.0, 2.0], [0.1, 0.1], [1.0, float(most)]), {"classifier": REFERENCE},
                          "float32", DP_ON, server_round=2)
