"""Per-group FedAvg math against a hand-written NumPy mean and against Flower's own FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from common.aggregate import aggregate_groups, weighted_mean


def _updates(rng: np.random.Generator, n: int) -> list[dict[str, dict[str, np.ndarray]]]:
    return [
        {
            "generator": {"generator.w": rng.normal(size=(3, 4)).astype(np.float32)},
            "discriminator": {"discriminator.w": rng.normal(size=(5,)).astype(np.float32),
                              "discriminator.count": np.array([i * 10], dtype=np.int64)},
            "classifier": {"classifier.b": rng.normal(size=(2,)).astype(np.float32)},
        }
        for i in range(n)
    ]


def test_each_group_gets_its_own_weighted_mean_and_local_groups_stay() -> None:
    rng = np.random.default_rng(0)
    updates = _updates(rng, 3)
    current = {g: {k: np.zeros_like(v) for k, v in arrays.items()} for g, arrays in updates[0].items()}
    current["classifier"]["classifier.b"] = np.array([7.0, -7.0], np.float32)
    weights = {"generator": [1.0, 2.0, 3.0], "discriminator": [10.0, 0.0, 30.0]}
    out = aggregate_groups(current, updates, weights, local_groups=["classifier"])

    g = sum(w * u["generator"]["generator.w"].astype(np.float64) for w, u in zip([1, 2, 3], updates)) / 6
    d = sum(w * u["discriminator"]["discriminator.w"].astype(np.float64) for w, u in zip([10, 0, 30], updates)) / 40
    np.testing.assert_allclose(out["generator"]["generator.w"], g, rtol=1e-6)
    np.testing.assert_allclose(out["discriminator"]["discriminator.w"], d, rtol=1e-6)
    assert out["discriminator"]["discriminator.count"].dtype == np.int64
    assert out["discriminator"]["discriminator.count"].tolist() == [round((0 * 10 + 20 * 0 + 30 * 20) / 40)]
    np.testing.assert_array_equal(out["classifier"]["classifier.b"], current["classifier"]["classifier.b"])
    assert out["generator"]["generator.w"].dtype == np.float32


def test_bad_weights_are_refused() -> None:
    update = {"a": np.ones(2)}
    with pytest.raises(ValueError, match="not all zero"):
        weighted_mean([update, update], [0.0, 0.0])
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        weighted_mean([update, update], [1.0])
    with pytest.raises(ValueError, match="finite"):
        weighted_mean([update], [float("nan")])


def test_one_group_matches_flowers_fedavg() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rng = np.random.default_rng(3)
    updates = [{"discriminator.w": rng.normal(size=(4, 2)).astype(np.float32),
                "discriminator.b": rng.normal(size=(2,)).astype(np.float32)} for _ in range(3)]
    examples = [100, 50, 25]
    replies = []
    for node, (update, n) in enumerate(zip(updates, examples), start=1):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
                              "metrics": MetricRecord({"num-examples": n})})
        replies.append(Message(content, reply_to=instruction))
    flower, _ = FedAvg().aggregate_train(1, replies)
    ours = weighted_mean(updates, examples)
    assert flower is not None
    for key in ours:
        np.testing.assert_allclose(ours[key], flower[key].numpy(), rtol=1e-5, atol=1e-6)
