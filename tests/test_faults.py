"""Fault injection: the config entries, what each kind does to a reply, its refusal outside a
simulation, and a run in which every hospital fails (it stops, then resumes once they are back)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from client.app import app as client_app
from client.faults import FaultsRefused, corrupt, faults_for, is_simulated_node
from common import protocol
from common.config import ConfigError, compose_config, plain_config
from common.faults import INFLATED_EXAMPLES, Fault, parse_faults
from common.records import encode_tensor
from server.app import run_from_overrides
from server.federation import FederationFailed, run_federation
from tests.fakes import InProcessGrid
from tests.test_federation import SMALL

SIMULATED = {"partition-id": 1, "num-partitions": 3}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Messages need one


def test_the_command_line_form_of_a_fault_list_parses() -> None:
    run = plain_config(compose_config(["faults=[{site:1,kind:scale,scale:1e4,rounds:all},{site:2,kind:nan,rounds:[2,3]}]"]))
    assert parse_faults(run["faults"], 3) == [Fault(1, "scale", None, 1e4), Fault(2, "nan", (2, 3))]
    assert parse_faults(plain_config(compose_config([]))["faults"], 3) == []


@pytest.mark.parametrize("entry,message", [
    ({"site": 3, "kind": "crash"}, r"faults\[0\].site: 3 is outside 0..2"),
    ({"site": 0, "kind": "explode"}, r"faults\[0\].kind: 'explode'"),
    ({"site": 0, "kind": "scale"}, r"faults\[0\].scale: kind scale needs a number"),
    ({"site": 0, "kind": "nan", "phase": "evaluate"}, r"changes train replies only"),
    ({"site": 0, "kind": "crash", "rounds": [0]}, r"rounds count from 1"),
    ({"site": 0, "kind": "impersonate", "target": 0}, r"must be another site"),
    ({"site": 0, "kind": "crash", "when": 1}, r"unknown key\(s\) \['when'\]"),
])
def test_a_bad_fault_entry_is_a_config_error_naming_it(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_faults([entry], 3)


def test_a_fault_applies_to_its_site_rounds_and_phase_only() -> None:
    (crash,) = parse_faults([{"site": 1, "kind": "crash", "rounds": [2], "phase": "both"}], 3)
    assert crash.applies(1, 2, "train") and crash.applies(1, 2, "evaluate")
    assert not crash.applies(0, 2, "train") and not crash.applies(1, 3, "train")
    (impersonate,) = parse_faults([{"site": 2, "kind": "impersonate"}], 3)
    assert impersonate.target == 0 and impersonate.applies(2, 7, "train") and not impersonate.applies(2, 7, "evaluate")


def _instruction(global_value: float) -> Message:
    content = RecordDict({"classifier": ArrayRecord({"classifier.w": Array(np.full(3, global_value, np.float32))})})
    return Message(content, dst_node_id=1, message_type="train")


def _reply(instruction: Message, value: float) -> RecordDict:
    return RecordDict({
        "classifier": ArrayRecord({"classifier.w": Array(np.array([value, value + 1, value + 2], np.float32))}),
        protocol.METRICS: MetricRecord({protocol.REAL_EXAMPLES: 40, protocol.LABELLED_EXAMPLES: 40}),
        protocol.SITE: ConfigRecord({protocol.SITE_NAME: "site-1", protocol.STATUS: "ok"}),
    })


def _faults(*entries: dict) -> list[Fault]:
    return parse_faults(list(entries), 3)


def test_content_faults_change_the_reply_as_documented() -> None:
    msg = _instruction(1.0)
    scaled = corrupt(_reply(msg, 2.0), _faults({"site": 1, "kind": "scale", "scale": 1e4}), msg, "float32")
    np.testing.assert_allclose(scaled.array_records["classifier"]["classifier.w"].numpy(),
                               1.0 + 1e4 * (np.array([2.0, 3.0, 4.0]) - 1.0))
    nan = corrupt(_reply(msg, 2.0), _faults({"site": 1, "kind": "nan"}), msg, "float32")
    assert np.isnan(nan.array_records["classifier"]["classifier.w"].numpy()).all()
    shape = corrupt(_reply(msg, 2.0), _faults({"site": 1, "kind": "shape"}), msg, "float32")
    assert shape.array_records["classifier"]["classifier.w"].shape == (4,)
    inflated = corrupt(_reply(msg, 2.0), _faults({"site": 1, "kind": "inflate_examples"}), msg, "float32")
    assert inflated.metric_records[protocol.METRICS][protocol.REAL_EXAMPLES] == INFLATED_EXAMPLES == 1e12
    named = corrupt(_reply(msg, 2.0), _faults({"site": 1, "kind": "impersonate", "target": 2}), msg, "float32")
    assert named.config_records[protocol.SITE][protocol.SITE_NAME] == "site-2"


def test_scale_works_in_the_bfloat16_wire_format() -> None:
    sent = torch.tensor([1.0, 1.0, 1.0])
    msg = Message(RecordDict({"classifier": ArrayRecord({"classifier.w": Array(encode_tensor(sent, "bfloat16"))})}),
                  dst_node_id=1, message_type="train")
    reply = RecordDict({"classifier": ArrayRecord({"classifier.w": Array(encode_tensor(torch.tensor([2.0, 3.0, 5.0]),
                                                                                       "bfloat16"))})})
    out = corrupt(reply, _faults({"site": 1, "kind": "scale", "scale": -2.0}), msg, "bfloat16")
    wire = out.array_records["classifier"]["classifier.w"].numpy()
    assert wire.dtype == np.int16
    assert torch.from_numpy(wire).view(torch.bfloat16).float().tolist() == [-1.0, -3.0, -7.0]


def test_faults_are_refused_outside_a_simulation() -> None:
    run = {"faults": [{"site": 0, "kind": "crash"}], "federation": {"num_sites": 3}}
    assert is_simulated_node(SIMULATED) and not is_simulated_node({"site-id": 1, "partition-id": 1})
    assert faults_for(run, SIMULATED, 1, 1, "train") == []  # simulated, but not this site
    with pytest.raises(FaultsRefused, match="faults: refused by this hospital: .* simulations only"):
        faults_for(run, {"site-id": 1, "num-sites": 3}, 1, 1, "train")
    with pytest.raises(ConfigError, match="faults: fault injection is for `fedvitgan simulate` only"):
        run_from_overrides(None, "faults=[{site:0,kind:crash}]")  # type: ignore[arg-type]


def test_a_deployed_hospital_refuses_a_run_config_with_faults_and_trains_nothing(tmp_path: Path) -> None:
    contexts = {node: Context(1, node, {"site-id": node - 1, "num-sites": 2, "state-dir": str(tmp_path / "state")},
                              RecordDict(), {}) for node in (1, 2)}
    run = plain_config(compose_config([*SMALL, "federation.num_sites=2", "federation.rounds=1",
                                       "federation.max_failed_rounds=1", "faults=[{site:1,kind:nan,rounds:[5]}]"]))
    run["output_dir"] = str(tmp_path / "run")
    with pytest.raises(FederationFailed):
        run_federation(InProcessGrid(client_app, 2, contexts=contexts), run, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    reasons = [e["reason"] for e in summary["rounds"][0]["excluded"]]
    assert len(reasons) == 2 and all(r.startswith("hospital reported refused: faults:") for r in reasons)
    assert not list((tmp_path / "state").rglob("*.safetensors"))  # no hospital trained


def test_a_run_where_every_hospital_fails_stops_and_resumes_once_they_are_back(tmp_path: Path) -> None:
    base = [*SMALL, "federation.num_sites=2", "federation.rounds=4"]
    run = plain_config(compose_config([*base, "federation.max_failed_rounds=2",
                                       "faults=[{site:0,kind:crash,rounds:all},{site:1,kind:crash,rounds:all}]"]))
    run["output_dir"] = str(tmp_path)
    with pytest.raises(FederationFailed, match="2 round\\(s\\) in a row with fewer than federation.min_sites=1"):
        run_federation(InProcessGrid(client_app, 2), run, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "resume=" in summary["failure"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        assert entry["aggregated"] is False and entry["global"]["accuracy"] is None
        assert [e["phase"] for e in entry["excluded"]] == ["train", "train"]
        assert all("injected fault: crash" in e["reason"] for e in entry["excluded"])
    first = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    second = load_file(str(tmp_path / "checkpoints" / "round-0002.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)

    resumed = plain_config(compose_config(base))  # the hospitals are back: no faults
    resumed["output_dir"], resumed["resume"] = str(tmp_path), str(tmp_path)
    run_federation(InProcessGrid(client_app, 2), resumed, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and "failure" not in summary
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    assert all(r["aggregated"] and not r["excluded"] for r in summary["rounds"][2:])
    assert math.isfinite(summary["rounds"][-1]["global"]["balanced_accuracy"])
    assert summary["site_bindings"] == {"site-0": 1, "site-1": 2}
