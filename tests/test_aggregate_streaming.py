"""Streaming FedAvg (a running weighted sum) against the stacked computation it replaced, and the
memory structure that makes it O(model): no stack, no reference kept to an update, replies read in
place from their payload."""

from __future__ import annotations

import gc
import io
import weakref

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import server.aggregate as aggregate
from common import protocol
from common.records import decode_array, to_arrayrecord, unpack, wire_array
from server.aggregate import AggregationError, GroupPolicy, WeightedSum, aggregate_group, capped_shares
from server.replies import ReplyLimits, all_finite, check_train_reply


def _stacked_reference(current: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], weights: list[float],
                       policy: GroupPolicy) -> dict[str, np.ndarray]:
    """The computation before streaming: clipped copies, every update stacked, one tensordot per key."""
    w = np.asarray(weights, dtype=np.float64)
    members = [i for i in range(len(updates)) if w[i] > 0]
    chosen = [updates[i] for i in members]
    if policy.clip_update_norm is not None:
        def norm(u: dict[str, np.ndarray]) -> float:
            return float(np.sqrt(sum(np.sum((u[k].astype(np.float64) - c.astype(np.float64)) ** 2)
                                     for k, c in current.items() if np.issubdtype(c.dtype, np.floating))))
        norms = [norm(u) for u in chosen]
        threshold = policy.clip_update_norm * float(np.median(norms))
        chosen = [{k: (current[k].astype(np.float64) + min(1.0, threshold / n) * (v.astype(np.float64) - current[k])
                       if np.issubdtype(v.dtype, np.floating) else v) for k, v in u.items()}
                  for u, n in zip(chosen, norms)]
    shares = capped_shares(w[members], policy.max_weight_share)
    out = {}
    for key, like in current.items():
        total = np.tensordot(shares, np.stack([np.asarray(u[key], dtype=np.float64) for u in chosen]), axes=1)
        out[key] = (np.rint(total) if np.issubdtype(like.dtype, np.integer) else total).astype(like.dtype)
    return out


def _random_group(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    shapes = {"w": (int(rng.integers(1, 6)), int(rng.integers(1, 6))), "b": (int(rng.integers(1, 9)),), "s": ()}
    current = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    current["count"] = np.array([int(rng.integers(0, 1000))], dtype=np.int64)
    spread = rng.lognormal(0.0, 1.5, size=n)  # some hospitals move far, so clipping bites
    updates = [{**{k: (v + spread[i] * rng.normal(size=v.shape)).astype(np.float32) for k, v in current.items()
                   if k != "count"},
                "count": np.array([int(rng.integers(0, 10_000))], dtype=np.int64)} for i in range(n)]
    return current, updates


def test_streaming_fedavg_equals_the_stacked_computation() -> None:
    rng = np.random.default_rng(13)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(1, 12))
        current, updates = _random_group(rng, n)
        weights = [float(x) for x in rng.integers(0, 50, size=n) * (rng.random(n) > 0.15)]
        if not any(weights):
            continue
        positive = sum(1 for x in weights if x > 0)
        cap = float(rng.choice([1.0, max(1.0 / positive, float(rng.uniform(0.2, 1.0)))]))
        clip = None if rng.random() < 0.3 else float(rng.uniform(0.5, 3.0))
        policy = GroupPolicy(max_weight_share=cap, clip_update_norm=clip)
        ours = aggregate_group(current, updates, weights, policy)
        try:
            expected = _stacked_reference(current, updates, weights, policy)
        except AggregationError:
            assert ours.kept is not None
            continue
        assert ours.kept is None
        for key, value in expected.items():
            assert ours.arrays[key].dtype == value.dtype and ours.arrays[key].shape == value.shape
            if np.issubdtype(value.dtype, np.integer):
                np.testing.assert_array_equal(ours.arrays[key], value, err_msg=key)
            else:
                np.testing.assert_allclose(ours.arrays[key], value, rtol=2e-6, atol=1e-6, err_msg=key)
        checked += 1
    assert checked > 200


def test_replies_summed_as_they_arrive_give_the_same_mean() -> None:
    rng = np.random.default_rng(5)
    for n in (1, 7, 8, 9, 30):  # around and beyond one float32 block
        current, updates = _random_group(rng, n)
        weights = [float(x) for x in rng.integers(1, 500, size=n)]
        running = WeightedSum(current)
        for update, weight in zip(updates, weights):
            running.add(update, weight)
        streamed = running.mean(current)
        stacked = _stacked_reference(current, updates, weights, GroupPolicy())
        in_memory = aggregate_group(current, updates, weights, GroupPolicy()).arrays
        for key, value in stacked.items():
            if np.issubdtype(value.dtype, np.integer):
                assert streamed[key].tolist() == value.tolist() == in_memory[key].tolist()
            else:
                np.testing.assert_allclose(streamed[key], value, rtol=2e-6, atol=1e-6, err_msg=key)
                np.testing.assert_allclose(in_memory[key], value, rtol=2e-6, atol=1e-6, err_msg=key)


def test_fedavg_never_stacks_updates_even_with_clipping_and_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    current, updates = _random_group(np.random.default_rng(1), 6)
    expected = aggregate_group(current, updates, [1, 2, 3, 4, 5, 6], GroupPolicy(max_weight_share=0.3,
                                                                                   clip_update_norm=1.0))

    def no_stack(*args: object, **kwargs: object) -> None:
        raise AssertionError("fedavg stacked the updates")

    monkeypatch.setattr(aggregate.np, "stack", no_stack)
    streamed = aggregate_group(current, updates, [1, 2, 3, 4, 5, 6], GroupPolicy(max_weight_share=0.3,
                                                                                   clip_update_norm=1.0))
    for key, value in expected.arrays.items():
        np.testing.assert_array_equal(streamed.arrays[key], value)
    with pytest.raises(AssertionError, match="stacked"):  # the robust rules do need every value at once
        aggregate_group(current, updates, [1] * 6, GroupPolicy(rule="median"))


def test_the_running_sum_keeps_no_update_and_does_not_grow() -> None:
    like = {"w": np.zeros((64, 32), np.float32), "b": np.zeros(32, np.float32), "n": np.zeros(1, np.int64)}
    running = WeightedSum(like)
    owned = [id(a) for a in running.sums.values()]
    nbytes = sum(a.nbytes for a in running.sums.values())
    alive = []
    for i in range(50):
        update = {k: np.full_like(v, i + 1) for k, v in like.items()}
        alive += [weakref.ref(a) for a in update.values()]
        running.add(update, 0.5)
        del update
    gc.collect()
    assert not any(ref() is not None for ref in alive), "the running sum kept a reference to an update"
    assert [id(a) for a in running.sums.values()] == owned
    assert sum(a.nbytes for a in running.sums.values()) == nbytes == (64 * 32 + 32 + 1) * 8
    result = running.result(like)
    np.testing.assert_allclose(result["w"], 0.5 * sum(range(1, 51)))
    assert result["n"].dtype == np.int64 and result["n"].tolist() == [round(0.5 * sum(range(1, 51)))]
    np.testing.assert_allclose(running.mean(like)["b"], sum(range(1, 51)) / 50)  # the plain mean: weights 0.5 each
    with pytest.raises(ValueError, match="other keys"):
        running.add({"w": like["w"]}, 1.0)


def _reply(state: dict[str, torch.Tensor], transport: str) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = RecordDict({"classifier": to_arrayrecord(state, transport),
                          protocol.METRICS: MetricRecord({protocol.REAL_EXAMPLES: 10, protocol.LABELLED_EXAMPLES: 5,
                                                          protocol.GENERATOR_STEPS: 1}),
                          protocol.SITE: ConfigRecord({protocol.SITE_NAME: "site-0", protocol.STATUS: "ok"})})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))


LIMITS = ReplyLimits(class_names=("a", "b"), score_bins=10, max_site_examples=1000, max_generator_steps=5)


def _payload_of(array: np.ndarray) -> object:
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


def test_a_float32_reply_is_read_in_place_and_a_float16_reply_decoded_per_access() -> None:
    torch.manual_seed(0)
    reference = {"classifier.w": torch.randn(4, 3), "classifier.b": torch.randn(3)}
    msg = _reply(reference, "float32")
    reply = check_train_reply(msg, {"classifier": reference}, "float32", LIMITS)
    record: ArrayRecord = msg.content.array_records["classifier"]
    assert list(record.keys()) == ["packed:float32"]  # both tensors in one array
    for key, like in reference.items():
        value = reply.groups["classifier"][key]
        assert _payload_of(value) is record["packed:float32"].data, f"{key} was copied out of the reply"
        assert not value.flags.writeable and value.dtype == np.float32
        np.testing.assert_array_equal(value, like.numpy())
    half = _reply(reference, "float16")
    reply = check_train_reply(half, {"classifier": reference}, "float16", LIMITS)
    wires = unpack(half.content.array_records["classifier"], reference, "float16")
    for key, like in reference.items():
        value = reply.groups["classifier"][key]
        assert value.dtype == np.float32 and value.shape == tuple(like.shape)
        np.testing.assert_array_equal(value, decode_array(wires[key], like, "float16").numpy())
        np.testing.assert_allclose(value, like.numpy(), rtol=1e-3, atol=1e-3)


def test_the_finite_check_catches_nan_and_inf_and_accepts_huge_finite_values() -> None:
    values = np.ones((40, 25), np.float32)
    assert all_finite(values)
    for bad in (np.nan, np.inf, -np.inf):
        broken = values.copy()
        broken[17, 3] = bad
        assert not all_finite(broken), bad
    huge = values.copy()
    huge[0, 0] = 3e38  # its square overflows float32: the slow path must still accept it
    assert all_finite(huge)


def test_a_payload_in_another_npy_layout_is_parsed_not_misread() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    for version, order in (((2, 0), "C"), ((1, 0), "F")):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asarray(values, order=order), version=version)
        array = Array("float32", (3, 4), "numpy.ndarray", buffer.getvalue())
        read = wire_array(array, (np.dtype(np.float32), (3, 4)))
        np.testing.assert_array_equal(read, values)
