"""Aggregation math against hand-written NumPy and against Flower's own FedAvg, FedMedian and
FedTrimmedAvg: weighted means per group, median, trimmed mean, weight caps and update clipping."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.supercore.task_identity import TaskIdentity

from server.aggregate import (
    AggregationError,
    GroupPolicy,
    aggregate_group,
    aggregate_groups,
    capped_shares,
    clip_updates,
    coordinate_median,
    trimmed_mean,
    weighted_mean,
)


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


def _flower_replies(updates: list[dict[str, np.ndarray]], examples: list[int]) -> list[Message]:
    """Flower train replies with one ArrayRecord each, as its stock strategies expect."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    replies = []
    for node, (update, n) in enumerate(zip(updates, examples), start=1):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
                              "metrics": MetricRecord({"num-examples": n})})
        replies.append(Message(content, reply_to=instruction))
    return replies


def test_one_group_matches_flowers_fedavg() -> None:
    rng = np.random.default_rng(3)
    updates = [{"discriminator.w": rng.normal(size=(4, 2)).astype(np.float32),
                "discriminator.b": rng.normal(size=(2,)).astype(np.float32)} for _ in range(3)]
    examples = [100, 50, 25]
    flower, _ = FedAvg().aggregate_train(1, _flower_replies(updates, examples))
    ours = weighted_mean(updates, examples)
    assert flower is not None
    for key in ours:
        np.testing.assert_allclose(ours[key], flower[key].numpy(), rtol=1e-5, atol=1e-6)


def _group(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [{"discriminator.w": rng.normal(size=(4, 3)).astype(np.float32),
             "discriminator.b": rng.normal(size=(3,)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("n", [4, 5])
def test_median_matches_flowers_fedmedian_and_numpy(n: int) -> None:
    updates = _group(np.random.default_rng(n), n)
    flower, _ = FedMedian().aggregate_train(1, _flower_replies(copy.deepcopy(updates), [100, 1, 50, 7, 3][:n]))
    ours = coordinate_median(updates)
    assert flower is not None
    for key in ours:
        np.testing.assert_allclose(ours[key], flower[key].numpy(), rtol=1e-6, atol=1e-7)
        column = np.sort(np.stack([u[key] for u in updates]).astype(np.float64), axis=0)
        by_hand = column[n // 2] if n % 2 else (column[n // 2 - 1] + column[n // 2]) / 2
        np.testing.assert_allclose(ours[key], by_hand, rtol=1e-6)
    # One hospital sending huge values moves the median by at most one rank.
    poisoned = coordinate_median([*updates[:-1], {k: v * 1e6 for k, v in updates[-1].items()}])
    for key in ours:
        assert np.abs(poisoned[key]).max() <= np.abs(np.stack([u[key] for u in updates])).max()


@pytest.mark.parametrize("n,fraction", [(5, 0.2), (10, 0.25), (4, 0.1)])
def test_trimmed_mean_matches_flowers_fedtrimmedavg_and_numpy(n: int, fraction: float) -> None:
    updates = _group(np.random.default_rng(n), n)
    flower, _ = FedTrimmedAvg(beta=fraction).aggregate_train(1, _flower_replies(copy.deepcopy(updates), [1] * n))
    ours = trimmed_mean(updates, fraction)
    assert flower is not None
    cut = int(fraction * n)
    for key in ours:
        np.testing.assert_allclose(ours[key], flower[key].numpy(), rtol=1e-5, atol=1e-6)
        column = np.sort(np.stack([u[key] for u in updates]).astype(np.float64), axis=0)
        np.testing.assert_allclose(ours[key], column[cut : n - cut].mean(axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(updates, 0.5)


def test_capped_shares_never_exceed_the_cap_and_keep_proportions_below_it() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        weights = rng.lognormal(0, 3, size=n) * (rng.random(n) > 0.2)
        if (weights > 0).sum() == 0:
            continue
        cap = float(rng.uniform(1.0 / max(1, (weights > 0).sum()), 1.0))
        shares = capped_shares(weights, cap)
        assert shares.max() <= cap + 1e-12 and shares.sum() == pytest.approx(1.0)
        assert np.all(shares[weights == 0] == 0)
        free = (shares < cap - 1e-12) & (weights > 0)
        if free.sum() > 1:  # hospitals below the cap keep their weights' proportions
            ratio = shares[free] / weights[free]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
    np.testing.assert_allclose(capped_shares([10, 30, 1e6], 0.4), [0.2, 0.4, 0.4])
    np.testing.assert_allclose(capped_shares([1, 3], 1.0), [0.25, 0.75])
    with pytest.raises(AggregationError, match="needs at least 3"):
        capped_shares([1, 1e6, 0], 0.4)


def test_the_weight_cap_keeps_a_group_when_too_few_hospitals_can_share_it() -> None:
    current = {"w": np.zeros(2, np.float32)}
    updates = [{"w": np.ones(2, np.float32)}, {"w": np.full(2, 3.0, np.float32)}]
    outcome = aggregate_group(current, updates, [1.0, 1.0], GroupPolicy(max_weight_share=0.4))
    assert outcome.kept and "max_weight_share=0.4" in outcome.kept
    np.testing.assert_array_equal(outcome.arrays["w"], current["w"])
    shared = aggregate_group(current, updates, [1.0, 3.0], GroupPolicy(max_weight_share=0.5))
    np.testing.assert_allclose(shared.arrays["w"], [2.0, 2.0])
    assert shared.shares == [0.5, 0.5]


def test_update_clipping_against_a_hand_computation() -> None:
    current = {"w": np.zeros(2, np.float32), "count": np.array([5], np.int64)}
    updates = [{"w": np.array([3.0, 4.0], np.float32), "count": np.array([7], np.int64)},   # norm 5
               {"w": np.array([0.0, 1.0], np.float32), "count": np.array([7], np.int64)},   # norm 1
               {"w": np.array([0.0, -2.0], np.float32), "count": np.array([7], np.int64)},  # norm 2
               {"w": np.array([600.0, 800.0], np.float32), "count": np.array([9], np.int64)}]  # norm 1000
    clipped, norms, threshold = clip_updates(current, updates, 2.0)
    assert norms == pytest.approx([5.0, 1.0, 2.0, 1000.0])
    assert threshold == pytest.approx(2.0 * 3.5)  # 2 x the median norm (2 and 5 -> 3.5)
    np.testing.assert_allclose(clipped[0]["w"], [3.0, 4.0])
    np.testing.assert_allclose(clipped[3]["w"], [0.6 * 7.0, 0.8 * 7.0], rtol=1e-6)
    assert clipped[3]["count"].tolist() == [9]  # counters are not clipped
    outcome = aggregate_group(current, updates, [1.0] * 4, GroupPolicy(clip_update_norm=2.0))
    assert outcome.clipped == [3]
    np.testing.assert_allclose(outcome.arrays["w"], [(3.0 + 0 + 0 + 4.2) / 4, (4.0 + 1 - 2 + 5.6) / 4], rtol=1e-6)


@pytest.mark.parametrize("rule", ["fedavg", "median"])
def test_derived_buffers_are_clipped_apart_from_the_learnt_weights(rule: str) -> None:
    """The head's whitening changes alike at every hospital. Counted with the weights, its large
    change would set the threshold and hide a hospital whose learnt weights are 3.5 x the others';
    apart, that hospital is clipped and the whitening, the same everywhere, is left as it was sent."""
    current = {"classifier.w": np.zeros(2, np.float32), "classifier.input_whitening": np.eye(2, dtype=np.float32)}
    whitening = np.array([[30.0, 0.0], [0.0, 40.0]], np.float32)  # a change of norm ~50 at every hospital
    learnt = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, -1.0]), np.array([0.0, 3.5])]
    updates = [{"classifier.w": w.astype(np.float32), "classifier.input_whitening": whitening} for w in learnt]
    outcome = aggregate_group(current, updates, [1.0] * 4, GroupPolicy(rule=rule, clip_update_norm=3.0))
    assert outcome.clipped == [3]  # 3.5 > 3 x the median learnt norm (1)
    np.testing.assert_allclose(outcome.arrays["classifier.input_whitening"], whitening)
    clipped, _, _ = clip_updates(current, updates, 3.0)
    np.testing.assert_allclose(clipped[3]["classifier.w"], [0.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[3]["classifier.input_whitening"], whitening)
    # An outlying whitening is clipped against the others' whitening, its learnt weights untouched.
    odd = [*updates[:3], {"classifier.w": learnt[1].astype(np.float32),
                          "classifier.input_whitening": np.eye(2, dtype=np.float32) + 10 * (whitening - np.eye(2))}]
    clipped, _, _ = clip_updates(current, odd, 3.0)
    np.testing.assert_allclose(clipped[3]["classifier.w"], learnt[1])
    change = clipped[3]["classifier.input_whitening"] - np.eye(2)
    assert np.linalg.norm(change) == pytest.approx(3.0 * np.linalg.norm(whitening - np.eye(2)), rel=1e-5)
    assert aggregate_group(current, odd, [1.0] * 4, GroupPolicy(rule=rule, clip_update_norm=3.0)).clipped == [3]


def test_median_and_trimmed_mean_leave_out_hospitals_with_zero_weight() -> None:
    current = {"w": np.zeros(1, np.float32)}
    updates = [{"w": np.array([v], np.float32)} for v in (1.0, 2.0, 100.0)]
    assert aggregate_group(current, updates, [1, 1, 0], GroupPolicy(rule="median")).arrays["w"].tolist() == [1.5]
    assert aggregate_group(current, updates, [1, 1, 1], GroupPolicy(rule="median")).arrays["w"].tolist() == [2.0]
    with pytest.raises(ValueError, match="aggregation rule"):
        GroupPolicy(rule="krum")


def test_auto_weight_share_is_two_over_n_but_never_below_a_half_and_off_for_two() -> None:
    from server.aggregate import auto_weight_share

    assert [auto_weight_share(n) for n in (1, 2, 3, 4, 10)] == pytest.approx([1.0, 1.0, 2 / 3, 0.5, 0.5])
    policy = GroupPolicy(max_weight_share="auto")
    current = {"w": np.zeros(2, np.float32)}
    updates = [{"w": np.full(2, float(i), np.float32)} for i in range(4)]
    outcome = aggregate_group(current, updates, [1.0, 1.0, 1.0, 1e7], policy)
    assert outcome.shares == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.5])
    with pytest.raises(ValueError, match="'auto' or a number"):
        GroupPolicy(max_weight_share="half")


def _aggregation_section(**changes: object) -> dict:
    """conf/'s federation.aggregation with ``group.key`` (or a federation-wide key) changed."""
    from common.config import compose_config, plain_config

    section = plain_config(compose_config())["federation"]["aggregation"]
    for key, value in changes.items():
        group, _, name = key.partition(".")
        if name:
            section[group][name] = value
        else:
            section[group] = value
    return section


def test_each_group_policy_carries_its_own_keys_and_the_federation_wide_bounds() -> None:
    from common.config import ConfigError
    from server.strategy import AggregationConfig

    config = AggregationConfig.from_config(_aggregation_section(**{"discriminator.rule": "median",
                                                                   "max_weight_share": 0.6}))
    assert config.policy("discriminator").rule == "median"
    assert config.policy("generator").rule == "fedavg"
    assert {config.policy(g).max_weight_share for g in ("generator", "discriminator", "classifier")} == {0.6}
    with pytest.raises(ConfigError, match=r"federation\.aggregation\.classifier.*apply to every group"):
        AggregationConfig.from_config(_aggregation_section(**{"classifier.max_weight_share": 0.5}))
    with pytest.raises(ConfigError, match=r"federation\.aggregation\.generator.*aggregation rule 'krum'"):
        AggregationConfig.from_config(_aggregation_section(**{"generator.rule": "krum"}))
    with pytest.raises(ConfigError, match=r"federation\.aggregation\.generator.*aggregation weight"):
        AggregationConfig.from_config(_aggregation_section(**{"generator.weight": "votes"}))


def test_a_registered_rule_is_one_function_and_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.aggregate import RULES, GroupOutcome, RuleInputs, register_rule

    monkeypatch.setattr(RULES, "_entries", dict(RULES._entries))  # the registration stays in this test

    @register_rule("first_hospital")
    def first(inputs: RuleInputs) -> GroupOutcome:
        return GroupOutcome({k: np.asarray(v) for k, v in inputs.updates[0].items()}, inputs.members[:1], [1.0])

    current = {"w": np.zeros(2, dtype=np.float32)}
    updates = [{"w": np.full(2, 5.0, dtype=np.float32)}, {"w": np.full(2, 7.0, dtype=np.float32)}]
    outcome = aggregate_group(current, updates, [0.0, 1.0], GroupPolicy(rule="first_hospital"))
    assert outcome.arrays["w"].tolist() == [7.0, 7.0] and outcome.members == [1]  # weight 0 takes no part
    with pytest.raises(ValueError, match="registered twice"):
        register_rule("first_hospital")(first)
