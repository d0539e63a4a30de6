"""Broken and hostile replies against the real ServerApp loop: each is left out by name, the round
completes with the others, and the new global model is exactly the aggregate of the good replies.

Replies are recorded once from a real round of three hospitals and replayed (``ReplayGrid``), one
of them tampered with in round 2, so each case costs no training.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from safetensors.torch import load_file

from client.app import app as client_app
from common import protocol
from common.config import compose_config, plain_config
from common.evaluation import METRIC_NAMES, EvaluationSummary, pooled_metrics
from common.model import GROUPS, split_groups
from common.records import unpack
from server.aggregate import weighted_mean
from server.federation import run_federation
from server.strategy import GroupedStrategy
from tests.fakes import InProcessGrid, ReplayGrid
from tests.test_federation import SMALL

SITES = ("site-0", "site-1", "site-2")
CLASSIFIER_BIAS = "classifier.head.bias"


def _config(tmp: Path, overrides: list[str], resume: bool = False) -> dict:
    run = plain_config(compose_config([*SMALL, "federation.num_sites=3", *overrides]))
    run["output_dir"] = str(tmp)
    run["resume"] = str(tmp) if resume else None
    return run


def _record(tmp: Path, overrides: list[str]) -> dict[tuple[int, str], RecordDict]:
    grid = InProcessGrid(client_app, 3)
    run_federation(grid, _config(tmp, ["federation.rounds=1", *overrides]), tmp)
    return ReplayGrid.record(grid)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], RecordDict]:
    return _record(tmp_path_factory.mktemp("record"), [])


@pytest.fixture(scope="module")
def recorded_bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], RecordDict]:
    return _record(tmp_path_factory.mktemp("record-bf16"), ["federation.transport_dtype=bfloat16"])


Tamper = Callable[[Message], "Message | list[Message] | None"]


def _replay(tmp: Path, recorded: dict, tamper: Tamper | None = None, node: int = 2, phase: str = "train",
            rounds: int = 2, at_round: int = 2, overrides: list[str] = ()) -> tuple[ReplayGrid, dict]:
    """Run ``rounds`` rounds on replayed replies; ``tamper`` changes ``node``'s ``phase`` reply in ``at_round``."""
    def on_reply(dst: int, reply: Message) -> Message | list[Message] | None:
        hit = dst == node and reply.metadata.message_type == phase and reply.metadata.group_id == str(at_round)
        return tamper(reply) if hit and tamper is not None else reply

    grid = ReplayGrid(recorded, 3, on_reply)
    run_federation(grid, _config(tmp, [f"federation.rounds={rounds}", *overrides]), tmp)
    return grid, json.loads((tmp / "summary.json").read_text())


def _arrays(content: RecordDict, group: str, saved: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A reply's group unpacked, its layout taken from a checkpoint of the same model."""
    return unpack(content.array_records[group], split_groups(saved)[group], "float32")


def _assert_global_is_mean_of(tmp: Path, recorded: dict, nodes: list[int], at_round: int = 2) -> None:
    """The checkpoint equals FedAvg of the recorded replies of ``nodes`` under the default weights."""
    saved = load_file(str(tmp / "checkpoints" / f"round-{at_round:04d}.safetensors"))
    keys = {"generator": protocol.GENERATOR_STEPS, "discriminator": protocol.REAL_EXAMPLES,
            "classifier": protocol.REAL_EXAMPLES}
    for group in GROUPS:
        contents = [recorded[(n, "train")] for n in nodes]
        weights = [float(c.metric_records[protocol.METRICS][keys[group]]) for c in contents]
        expected = weighted_mean([_arrays(c, group, saved) for c in contents], weights)
        for key, value in expected.items():
            np.testing.assert_array_equal(saved[key].numpy(), value, err_msg=key)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _set_array(reply: Message, group: str, key: str, array: Array) -> Message:
    record = reply.content.array_records[group]
    items = {k: record[k] for k in record.keys()}
    items[key] = array
    reply.content[group] = ArrayRecord(items)
    return reply


def _first_key(reply: Message, group: str) -> str:
    return next(iter(reply.content.array_records[group].keys()))


def _set_packed(reply: Message, group: str, make: Callable[[Array], Array]) -> Message:
    """Replace ``group``'s (one) packed array by ``make(the array)``."""
    key = _first_key(reply, group)
    return _set_array(reply, group, key, make(reply.content.array_records[group][key]))


def _set_metric(key: str, value: object) -> Tamper:
    def tamper(reply: Message) -> Message:
        reply.content.metric_records[protocol.METRICS][key] = value  # type: ignore[assignment]
        return reply
    return tamper


def _set_counts(text: str) -> Tamper:
    def tamper(reply: Message) -> Message:
        reply.content.config_records[protocol.SITE][protocol.CLASS_COUNTS_JSON] = text
        return reply
    return tamper


def _lying_shape(reply: Message) -> Message:
    # The right number of bytes, but a column: broadcasting it would turn the average into a matrix.
    return _set_packed(reply, "classifier", lambda a: Array("float32", tuple(a.shape), "numpy.ndarray",
                                                           _npy(np.full((a.shape[0], 1), 0.5, np.float32))))


def _wrong_count(reply: Message) -> Message:  # one value more than the declared shape
    return _set_packed(reply, "classifier", lambda a: Array("float32", tuple(a.shape), "numpy.ndarray",
                                                           _npy(np.zeros(a.shape[0] + 1, np.float32))))


def _unreadable(reply: Message) -> Message:  # the right size, but not a .npy file: np.load raises
    return _set_packed(reply, "classifier", lambda a: Array("float32", tuple(a.shape), "numpy.ndarray",
                                                           bytes(len(a.data))))


def _oversized(reply: Message) -> Message:
    key = _first_key(reply, "generator")
    array = reply.content.array_records["generator"][key]
    return _set_array(reply, "generator", key, Array(array.dtype, tuple(array.shape), array.stype,
                                                     array.data + bytes(8_000_000)))


def _float64(reply: Message) -> Message:  # the same bytes, declared as float64
    return _set_packed(reply, "discriminator", lambda a: Array("float64", tuple(a.shape), a.stype, a.data))


def _extra_key(reply: Message) -> Message:
    return _set_array(reply, "generator", "generator.evil", Array(np.zeros(3, np.float32)))


def _extra_record(reply: Message) -> Message:
    reply.content["evil"] = ConfigRecord({"x": 1})
    return reply


def _nan(reply: Message) -> Message:
    key = _first_key(reply, "classifier")
    return _set_array(reply, "classifier", key,
                      Array(np.full_like(reply.content.array_records["classifier"][key].numpy(), np.inf)))


def _huge(reply: Message) -> Message:
    """Finite float32 values that pass a finiteness check; averaged, they overflow the next forward pass."""
    key = _first_key(reply, "classifier")
    return _set_array(reply, "classifier", key,
                      Array(np.full_like(reply.content.array_records["classifier"][key].numpy(), 1e38)))


CASES: dict[str, tuple[Tamper, str]] = {
    "lying shape": (_lying_shape, "classifier packed:float32: decoded shape (325, 1)"),
    "wrong element count": (_wrong_count, "elements), expected ("),
    "oversized payload": (_oversized, "payload of"),
    "unreadable payload": (_unreadable, "ValueError: "),
    "wrong dtype": (_float64, "declared dtype float64"),
    "unexpected key": (_extra_key, "unexpected ['generator.evil']"),
    "unexpected record": (_extra_record, "unexpected records ['evil']"),
    "infinite values": (_nan, f"{CLASSIFIER_BIAS}: non-finite"),
    "nested class-count JSON": (_set_counts("[" * 20_000 + "]" * 20_000), "RecursionError"),
    "fractional class counts": (_set_counts(json.dumps({"train": {"tumour": 2.5}})), "expected an integer count"),
    "unknown class": (_set_counts(json.dumps({"train": {"cats": 3}})), "unknown classes"),
    "negative class count": (_set_counts(json.dumps({"test": {"tumour": -1}})), "count in [0"),
    "list metric": (_set_metric("loss/d", [1.0, 2.0]), "is a list"),
    "negative weight": (_set_metric(protocol.REAL_EXAMPLES, -5), "count in [1"),
    "huge weight": (_set_metric(protocol.REAL_EXAMPLES, 1e12), "count in [1, 1000000]"),
    "overflowing weight": (_set_metric(protocol.REAL_EXAMPLES, 1e308), "count in [1, 1000000]"),
    "finite values of 1e38": (_huge, f"{CLASSIFIER_BIAS}: values beyond federation.max_abs_value=10000"),
    "accountant history without DP": (_set_metric(protocol.DP_HISTORY_STEPS, [1.0] * 100_000),
                                      "an accountant history, but this run trains without DP"),
    "NaN weight": (_set_metric(protocol.REAL_EXAMPLES, float("nan")), "expected a finite number"),
    "infinite weight": (_set_metric(protocol.REAL_EXAMPLES, float("inf")), "expected a finite number"),
    "fractional weight": (_set_metric(protocol.REAL_EXAMPLES, 39.5), "expected an integer count"),
    "too many generator steps": (_set_metric(protocol.GENERATOR_STEPS, 1e9), "count in [0, 3]"),
    "more labelled than real": (_set_metric(protocol.LABELLED_EXAMPLES, 41), "count in [0, 40]"),
    "missing weight": (lambda r: (r.content.metric_records[protocol.METRICS].pop(protocol.LABELLED_EXAMPLES), r)[1],
                       "'labelled-examples' missing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_train_reply_is_left_out_by_name_and_the_others_are_averaged_exactly(
        tmp_path: Path, recorded: dict, case: str) -> None:
    tamper, reason = CASES[case]
    _, summary = _replay(tmp_path, recorded, tamper)
    entry = summary["rounds"][1]
    assert entry["aggregated"] is True and summary["status"] == "completed"
    assert [(e["site"], e["phase"]) for e in entry["excluded"]] == [("site-1", "train")]
    assert reason in entry["excluded"][0]["reason"], entry["excluded"][0]["reason"]
    assert sorted(s for s, v in entry["sites"].items() if "train" in v) == ["site-0", "site-2"]
    assert sorted(entry["aggregation"]["discriminator"]["shares"]) == ["site-0", "site-2"]
    _assert_global_is_mean_of(tmp_path, recorded, [1, 3])


def test_an_odd_length_bfloat16_payload_is_left_out(tmp_path: Path, recorded_bf16: dict) -> None:
    def odd(reply: Message) -> Message:  # declares int16 (bfloat16's wire type) but holds an odd number of bytes
        return _set_packed(reply, "classifier", lambda a: Array("int16", tuple(a.shape), "numpy.ndarray",
                                                               _npy(np.arange(2 * a.shape[0] + 1, dtype=np.uint8))))

    _, summary = _replay(tmp_path, recorded_bf16, odd, overrides=["federation.transport_dtype=bfloat16"])
    entry = summary["rounds"][1]
    assert entry["aggregated"] is True
    assert [e["site"] for e in entry["excluded"]] == ["site-1"]
    assert "decoded dtype uint8" in entry["excluded"][0]["reason"]


def test_impersonation_is_refused_and_the_real_site_is_kept(tmp_path: Path, recorded: dict) -> None:
    _, summary = _replay(tmp_path, recorded, _set_site_name("site-0"))
    entry = summary["rounds"][1]
    (refused,) = entry["excluded"]
    assert refused["site"] == "site-1" and refused["claimed"] == "site-0" and refused["node_id"] == 2
    assert "bound to site 'site-1' but reported 'site-0'" in refused["reason"]
    assert "train" in entry["sites"]["site-0"]  # the real site-0's reply is not dropped
    _assert_global_is_mean_of(tmp_path, recorded, [1, 3])
    assert summary["site_bindings"] == {"site-0": 1, "site-1": 2, "site-2": 3}


def _set_site_name(name: str) -> Tamper:
    def tamper(reply: Message) -> Message:
        reply.content.config_records[protocol.SITE][protocol.SITE_NAME] = name
        return reply
    return tamper


def test_impersonation_in_evaluation_is_not_counted_twice(tmp_path: Path, recorded: dict) -> None:
    _, summary = _replay(tmp_path, recorded, _set_site_name("site-0"), phase="evaluate")
    entry = summary["rounds"][1]
    assert [(e["site"], e["phase"]) for e in entry["excluded"]] == [("site-1", "evaluate")]
    assert sorted(s for s, v in entry["sites"].items() if "evaluate" in v) == ["site-0", "site-2"]
    per_site = int(recorded[(1, "evaluate")].metric_records[protocol.METRICS][protocol.REAL_EXAMPLES])
    assert entry["global"]["examples"] == 2 * per_site
    assert entry["sites"]["site-0"]["evaluate"]["examples"] == per_site
    pooled = pooled_metrics(_summary(recorded[(n, "evaluate")]) for n in (1, 3))
    assert {k: entry["global"][k] for k in METRIC_NAMES} == pytest.approx({k: pooled[k] for k in METRIC_NAMES})


def test_an_evaluation_counting_more_patches_than_were_released_is_left_out(tmp_path: Path, recorded: dict) -> None:
    # F12: inflated but self-consistent counts (every count x 10) would dominate the pooled metrics.
    def inflate(reply: Message) -> Message:
        metrics = reply.content.metric_records[protocol.METRICS]
        for key in (protocol.EVAL_CONFUSION, protocol.EVAL_POSITIVE_SCORES, protocol.EVAL_NEGATIVE_SCORES):
            metrics[key] = [10 * int(v) for v in metrics[key]]
        metrics[protocol.REAL_EXAMPLES] = 10 * int(metrics[protocol.REAL_EXAMPLES])
        return reply

    _, summary = _replay(tmp_path, recorded, inflate, phase="evaluate")
    entry = summary["rounds"][1]
    assert [(e["site"], e["phase"]) for e in entry["excluded"]] == [("site-1", "evaluate")]
    assert "more than the" in entry["excluded"][0]["reason"] and "train-time class counts" in entry["excluded"][0]["reason"]
    per_site = int(recorded[(1, "evaluate")].metric_records[protocol.METRICS][protocol.REAL_EXAMPLES])
    assert entry["global"]["examples"] == 2 * per_site


def _summary(content: RecordDict) -> EvaluationSummary:
    """The evaluation summary an evaluate reply carries (5 classes, federation.score_bins=1000)."""
    metrics = content.metric_records[protocol.METRICS]
    return EvaluationSummary(np.reshape(metrics[protocol.EVAL_CONFUSION], (5, 5)),
                             np.reshape(metrics[protocol.EVAL_POSITIVE_SCORES], (5, 1000)),
                             np.reshape(metrics[protocol.EVAL_NEGATIVE_SCORES], (5, 1000)))


def test_a_name_contested_at_first_contact_binds_nobody(tmp_path: Path, recorded: dict) -> None:
    _, summary = _replay(tmp_path, recorded, _set_site_name("site-0"), node=3, at_round=1)
    first, second = summary["rounds"]
    assert sorted((e["site"], e["claimed"]) for e in first["excluded"] if e["phase"] == "train") == [
        ("node-1", "site-0"), ("node-3", "site-0")]
    assert [s for s, v in first["sites"].items() if "train" in v] == ["site-1"]
    assert not second["excluded"] and summary["site_bindings"] == {"site-0": 1, "site-1": 2, "site-2": 3}


def test_a_second_reply_and_a_reply_from_a_node_not_asked_are_refused(tmp_path: Path, recorded: dict) -> None:
    def duplicate(reply: Message) -> list[Message]:
        stranger = Message(copy.deepcopy(reply.content), dst_node_id=99, message_type="train", group_id="2")
        return [reply, copy.deepcopy(reply), Message(copy.deepcopy(reply.content), reply_to=stranger)]

    _, summary = _replay(tmp_path, recorded, duplicate)
    entry = summary["rounds"][1]
    reasons = {(e["site"], e["node_id"]): e["reason"] for e in entry["excluded"]}
    assert reasons == {("site-1", 2): "a second reply from node 2 in this phase",
                       ("node-99", 99): "node 99 was not asked in this phase"}
    _assert_global_is_mean_of(tmp_path, recorded, [1, 2, 3])  # the first reply of node 2 counts, once


def test_a_missing_reply_is_named_as_a_straggler(tmp_path: Path, recorded: dict) -> None:
    _, summary = _replay(tmp_path, recorded, lambda reply: None)
    (late,) = summary["rounds"][1]["excluded"]
    assert late["site"] == "site-1" and "straggler" in late["reason"] and "round_timeout_s=3600" in late["reason"]
    _assert_global_is_mean_of(tmp_path, recorded, [1, 3])


def test_min_sites_is_honoured(tmp_path: Path, recorded: dict) -> None:
    _, summary = _replay(tmp_path, recorded, _set_metric(protocol.REAL_EXAMPLES, -1),
                         overrides=["federation.min_sites=3"])
    first, second = summary["rounds"]
    assert first["aggregated"] is True and second["aggregated"] is False
    assert "2 valid train replies, fewer than federation.min_sites=3" in second["failure"]
    assert "evaluate" not in json.dumps(second["excluded"])  # no evaluation of an unchanged model
    before = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    after = load_file(str(tmp_path / "checkpoints" / "round-0002.safetensors"))
    for key in before:
        np.testing.assert_array_equal(after[key].numpy(), before[key].numpy())
    assert summary["status"] == "completed"  # one failed round < federation.max_failed_rounds=3


WEIGHTS = {1: (10, 4, 3), 2: (30, 1, 1), 3: (60, 5, 2)}  # node: (real, labelled, generator steps)


def _claim(reply: Message) -> Message:
    real, labelled, steps = WEIGHTS[int(reply.metadata.src_node_id)]
    metrics = reply.content.metric_records[protocol.METRICS]
    metrics[protocol.REAL_EXAMPLES], metrics[protocol.LABELLED_EXAMPLES] = real, labelled
    metrics[protocol.GENERATOR_STEPS] = steps
    return reply


@pytest.mark.parametrize("rule,column", [("real_examples", 0), ("labelled_examples", 1), ("generator_steps", 2),
                                         ("uniform", None)])
def test_each_weighting_rule_matches_a_hand_computation(tmp_path: Path, recorded: dict, rule: str,
                                                        column: int | None) -> None:
    grid = ReplayGrid(recorded, 3, lambda node, reply: _claim(reply) if reply.metadata.message_type == "train" else reply)
    overrides = [f"federation.aggregation.{g}.weight={rule}" for g in GROUPS]
    run_federation(grid, _config(tmp_path, ["federation.rounds=1", *overrides]), tmp_path)
    saved = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    w = np.array([1.0, 1.0, 1.0] if column is None else [WEIGHTS[n][column] for n in (1, 2, 3)])
    for group in GROUPS:
        replies = [_arrays(recorded[(n, "train")], group, saved) for n in (1, 2, 3)]
        for key in replies[0]:
            hand = (w[0] * replies[0][key].astype(np.float64) + w[1] * replies[1][key] + w[2] * replies[2][key]) / w.sum()
            np.testing.assert_allclose(saved[key].numpy(), hand, rtol=1e-6, atol=1e-7, err_msg=key)


def _claiming(claims: dict[int, int]) -> Callable[[int, Message], Message]:
    """A replay hook: each node's train reply claims ``claims[node]`` real (and no labelled) examples."""
    def inflate(node: int, reply: Message) -> Message:
        if reply.metadata.message_type == "train":
            reply.content.metric_records[protocol.METRICS][protocol.REAL_EXAMPLES] = claims[node]
            reply.content.metric_records[protocol.METRICS][protocol.LABELLED_EXAMPLES] = 0
        return reply
    return inflate


def test_no_site_takes_more_than_max_weight_share(tmp_path: Path, recorded: dict) -> None:
    inflate = _claiming({1: 10, 2: 30, 3: 1_000_000})
    grid = ReplayGrid(recorded, 3, inflate)
    run_federation(grid, _config(tmp_path, ["federation.rounds=1", "federation.aggregation.max_weight_share=0.4"]),
                   tmp_path)
    entry = json.loads((tmp_path / "summary.json").read_text())["rounds"][0]
    shares = entry["aggregation"]["discriminator"]["shares"]
    assert shares == pytest.approx({"site-0": 0.2, "site-1": 0.4, "site-2": 0.4})
    saved = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    replies = [_arrays(recorded[(n, "train")], "discriminator", saved) for n in (1, 2, 3)]
    for key in replies[0]:
        hand = 0.2 * replies[0][key].astype(np.float64) + 0.4 * replies[1][key] + 0.4 * replies[2][key]
        np.testing.assert_allclose(saved[key].numpy(), hand, rtol=1e-6, atol=1e-7, err_msg=key)


def test_by_default_a_hospital_claiming_a_million_patches_takes_at_most_two_thirds(tmp_path: Path,
                                                                                   recorded: dict) -> None:
    inflate = _claiming({1: 10, 2: 30, 3: 1_000_000})
    run_federation(ReplayGrid(recorded, 3, inflate), _config(tmp_path, ["federation.rounds=1"]), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    entry = summary["rounds"][0]
    shares = entry["aggregation"]["discriminator"]["shares"]
    # auto: max(2/3, 0.5) = 2/3 for the claimant, the other third split 10:30
    assert shares == pytest.approx({"site-0": 1 / 12, "site-1": 1 / 4, "site-2": 2 / 3})
    assert entry["aggregation"]["discriminator"]["clipped"] == []  # honest updates stay under 3 x the median
    assert "warnings" not in summary["sessions"][0]  # 3 hospitals: nothing to warn about


def test_with_two_hospitals_the_run_warns_that_the_bounds_protect_nothing(tmp_path: Path) -> None:
    run = _config(tmp_path, ["federation.num_sites=2", "federation.rounds=1",
                             "federation.aggregation.discriminator.rule=median"])
    run_federation(InProcessGrid(client_app, 2), run, tmp_path)
    warnings = json.loads((tmp_path / "summary.json").read_text())["sessions"][0]["warnings"]
    assert any("discriminator rule(s) cannot outvote" in w for w in warnings), warnings
    assert any("clip_update_norm" in w and "bounds nothing" in w for w in warnings), warnings
    assert any("max_weight_share cannot stop" in w for w in warnings), warnings


def test_site_bindings_survive_a_resume(tmp_path: Path, recorded: dict) -> None:
    _replay(tmp_path, recorded, rounds=1)
    grid = ReplayGrid(recorded, 3, lambda node, reply: _set_site_name("site-0")(reply)
                      if node == 2 and reply.metadata.message_type == "train" else reply)
    run_federation(grid, _config(tmp_path, ["federation.rounds=2"], resume=True), tmp_path)
    entry = json.loads((tmp_path / "summary.json").read_text())["rounds"][1]
    # Without the saved binding, nodes 1 and 2 would both claim site-0 at first contact and both be refused.
    assert [(e["site"], e["claimed"]) for e in entry["excluded"]] == [("site-1", "site-0")]
    assert "train" in entry["sites"]["site-0"]


def test_bindings_start_afresh_when_every_node_id_is_new(tmp_path: Path, recorded: dict) -> None:
    _replay(tmp_path, recorded, rounds=1)
    renumbered = {(node + 10, kind): content for (node, kind), content in recorded.items()}
    grid = ReplayGrid(renumbered, 3)
    grid.contexts = {node + 10: context for node, context in grid.contexts.items()}  # a new simulation session
    run_federation(grid, _config(tmp_path, ["federation.rounds=2"], resume=True), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    entry = summary["rounds"][1]
    assert entry["aggregated"] and not entry["excluded"]
    assert "site bindings start afresh" in entry["notes"][0]
    assert summary["site_bindings"] == {"site-0": 11, "site-1": 12, "site-2": 13}


def test_a_validation_split_and_class_names_with_spaces_are_accepted(tmp_path: Path, recorded: dict) -> None:
    # test: as many held-out patches as the replayed evaluation counts (an evaluation may not count more)
    counts = {"site": "site-1", "train": {"tumour": 30, "unlabelled": 10}, "val": {"tumour": 5}, "test": {"stroma": 20}}

    def legitimate(reply: Message) -> Message:
        reply.content.config_records[protocol.SITE][protocol.CLASS_COUNTS_JSON] = json.dumps(counts)
        reply.content.metric_records[protocol.METRICS]["acceptance/ductal carcinoma"] = 0.5
        return reply

    _, summary = _replay(tmp_path, recorded, legitimate)
    assert not summary["rounds"][1]["excluded"]
    assert json.loads((tmp_path / "partition.json").read_text())["site-1"]["val"] == {"tumour": 5}


def test_a_round_waits_for_missing_hospitals_once_not_once_per_phase(tmp_path: Path, recorded: dict,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[int] = []
    original = GroupedStrategy._wait_for_nodes

    def counted(self: GroupedStrategy, grid: object) -> list[int]:
        waits.append(self._round)
        return original(self, grid)  # type: ignore[arg-type]

    monkeypatch.setattr(GroupedStrategy, "_wait_for_nodes", counted)
    grid = ReplayGrid(recorded, 3)
    del grid.contexts[3]  # one hospital never connects
    run_federation(grid, _config(tmp_path, ["federation.rounds=2", "federation.wait_for_sites_s=1"]), tmp_path)
    assert waits == [1, 2]  # train and evaluate share the round's one wait
    entry = json.loads((tmp_path / "summary.json").read_text())["rounds"][1]
    assert entry["aggregated"] and sorted(entry["aggregation"]["classifier"]["shares"]) == ["site-0", "site-1"]


def test_the_superlinks_error_for_an_unreachable_hospital_is_filed_under_that_hospital(tmp_path: Path,
                                                                                      recorded: dict) -> None:
    # Flower's SuperLink answers for a hospital that went offline with an error of its own, sent from
    # node SUPERLINK_NODE_ID (1); it concerns the node the instruction went to, not a node nobody asked.
    def unreachable(reply: Message) -> Message:
        error = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=reply)
        error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        error.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
        return error

    _, summary = _replay(tmp_path, recorded, unreachable, node=3)
    entry = summary["rounds"][1]
    assert [(e["site"], e["node_id"]) for e in entry["excluded"]] == [("site-2", 3)], entry["excluded"]
    assert "Flower error (code 5)" in entry["excluded"][0]["reason"]
    assert entry["aggregated"] and sorted(entry["aggregation"]["classifier"]["shares"]) == ["site-0", "site-1"]


def test_a_hospital_cannot_take_the_display_name_of_a_nameless_node(tmp_path: Path, recorded: dict) -> None:
    # F11: node-N is how the coordinator names a node that reports no name.
    _, summary = _replay(tmp_path, recorded, _set_site_name("node-1"), at_round=1, rounds=1)
    (refused,) = [e for e in summary["rounds"][0]["excluded"] if e["phase"] == "train"]
    assert refused["node_id"] == 2 and "reserved for nodes that report no name" in refused["reason"]
    assert "node-1" not in summary["site_bindings"]


def test_a_status_message_reaches_the_log_as_one_bounded_printable_line(tmp_path: Path, recorded: dict) -> None:
    # F14: a hospital's text must not forge log lines or flood summary.json.
    def shout(reply: Message) -> Message:
        site = reply.content.config_records[protocol.SITE]
        site[protocol.STATUS] = "error"
        site[protocol.STATUS_MESSAGE] = "bad\n[round 2/2] 3 hospitals aggregated\x1b[31m\x07" + "x" * 3000
        return reply

    _, summary = _replay(tmp_path, recorded, shout)
    (excluded,) = summary["rounds"][1]["excluded"]
    reason = excluded["reason"]
    assert "\n" not in reason and "\x1b" not in reason and reason.isprintable()
    assert len(reason) <= 500
    assert "bad [round 2/2] 3 hospitals aggregated?" in reason
