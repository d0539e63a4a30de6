"""The federated loop with the real ServerApp logic and real ClientApps, in one process.

Checks reply validation, hospital-local state, per-group locality, resume and transport dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from safetensors.torch import load_file

from client.app import app as client_app
from client.local_run import LOCAL_GROUPS, LOCAL_STATE
from client.site_state import SiteStateStore
from common.config import ConfigError, compose_config, plain_config
from common.model import GROUPS, split_groups
from common.records import unpack
from server.federation import run_federation
from tests.fakes import InProcessGrid

SMALL = ["train.local_steps=3", "train.batch_size=8", "data.train_per_site=40", "data.test_per_site=20",
         "train.selection.warmup_steps=2", "train.selection.min_history=2", "samples_per_class=2"]


def _run(tmp: Path, overrides: list[str], tamper: Callable[[int, Message], Message] | None = None,
         grid: InProcessGrid | None = None, resume: bool = False) -> tuple[InProcessGrid, dict]:
    run = plain_config(compose_config([*SMALL, *overrides]))
    run["output_dir"] = str(tmp)
    run["resume"] = str(tmp) if resume else None
    grid = grid or InProcessGrid(client_app, int(run["federation"]["num_sites"]), tamper)
    run_federation(grid, run, tmp)
    return grid, json.loads((tmp / "summary.json").read_text())


def _replace_array(reply: Message, group: str, make: Callable[[np.ndarray], np.ndarray]) -> Message:
    record = reply.content.array_records[group]
    key = next(iter(record.keys()))
    items = {k: Array(make(record[k].numpy()) if k == key else record[k].numpy()) for k in record.keys()}
    reply.content[group] = ArrayRecord(items)
    return reply


def _drop_group(reply: Message) -> Message:
    del reply.content["discriminator"]
    return reply


MALFORMED = {
    "missing group": lambda r: _drop_group(r),
    "wrong shape": lambda r: _replace_array(r, "generator", lambda a: np.zeros((a.size + 1,), a.dtype)),
    "NaN": lambda r: _replace_array(r, "classifier", lambda a: np.full_like(a, np.nan)),
}
REASONS = {"missing group": "group 'discriminator' missing", "wrong shape": "shape", "NaN": "non-finite"}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_is_left_out_and_the_round_completes(tmp_path: Path, case: str) -> None:
    def tamper(node: int, reply: Message) -> Message:
        is_train = reply.metadata.message_type == "train"
        return MALFORMED[case](reply) if node == 2 and is_train else reply

    _, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=1"], tamper)
    entry = summary["rounds"][0]
    assert entry["aggregated"] is True
    assert list(entry["sites"]) and "train" not in entry["sites"].get("site-1", {})
    assert "train" in entry["sites"]["site-0"]
    assert [e["site"] for e in entry["excluded"]] == ["site-1"]
    assert REASONS[case] in entry["excluded"][0]["reason"]
    assert (tmp_path / "checkpoints" / "round-0001.safetensors").is_file()
    assert np.isfinite(entry["global"]["accuracy"])


def test_local_state_persists_across_rounds_and_is_never_sent(tmp_path: Path) -> None:
    grid, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=2"])
    for context in grid.contexts.values():
        state = context.state.array_records[LOCAL_STATE]
        assert int(state["global_step"].numpy()) == 2 * 3  # two rounds of 3 local steps, carried over
        assert "weighting.log_vars" in state and "selection.centroids" in state
        assert any(k.startswith("opt_discriminator.") for k in state.keys())
    local_keys = set(next(iter(grid.contexts.values())).state.array_records[LOCAL_STATE].keys())
    reference = split_groups(load_file(str(tmp_path / "checkpoints" / "round-0002.safetensors")))
    for msg in grid.replies + grid.sent:
        for name, record in msg.content.array_records.items():
            assert name in GROUPS and list(record.keys()) == ["packed:float32"]
            # exactly the group's tensors, no more (unpack checks the packed array's size)
            sent = unpack(record, reference[name], "float32")
            assert all(k.startswith(name + ".") for k in sent) and not local_keys & set(sent)
        metric_names = set().union(*(set(r.keys()) for r in msg.content.metric_records.values()))
        assert not any(k.startswith(("opt_", "selection.", "rng")) for k in metric_names)
    # Round 2's train metrics show the log-variances continuing from round 1, not restarting.
    assert summary["rounds"][1]["sites"]["site-0"]["train"]["global_step"] == 6
    run_folder = SiteStateStore.for_run(tmp_path / "sites" / "site-0", str(tmp_path), keep_last=2).folder
    site_files = sorted(run_folder.glob("round-*.safetensors"))
    assert [f.name for f in site_files] == ["round-0001.safetensors", "round-0002.safetensors"]
    assert json.loads((run_folder / "run.json").read_text())["run"] == str(tmp_path)


def test_a_group_set_local_is_never_sent_nor_aggregated(tmp_path: Path) -> None:
    grid, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=2",
                                    "federation.aggregation.classifier.local=true"])
    assert summary["transport"]["sent_groups"] == ["generator", "discriminator"]
    assert all("classifier" not in m.content.array_records for m in grid.sent + grid.replies)
    first = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    last = load_file(str(tmp_path / "checkpoints" / "round-0002.safetensors"))
    for key in (k for k in last if k.startswith("classifier.")):
        torch.testing.assert_close(first[key], last[key], rtol=0, atol=0)
    local = [c.state.array_records[LOCAL_GROUPS] for c in grid.contexts.values()]
    key = next(k for k in local[0].keys() if k.startswith("classifier."))
    assert not np.array_equal(local[0][key].numpy(), local[1][key].numpy())  # each hospital its own
    assert not np.array_equal(local[0][key].numpy(), last[key].numpy())


def test_three_rounds_equal_two_rounds_resumed_for_a_third(tmp_path: Path) -> None:
    straight, _ = _run(tmp_path / "straight", ["federation.num_sites=2", "federation.rounds=3"])
    _run(tmp_path / "stopped", ["federation.num_sites=2", "federation.rounds=2"])
    # A fresh grid: new hospital processes with empty Flower state; they read their state folders.
    with pytest.raises(ConfigError, match="already holds a run"):
        _run(tmp_path / "stopped", ["federation.num_sites=2", "federation.rounds=3"])
    _, summary = _run(tmp_path / "stopped", ["federation.num_sites=2", "federation.rounds=3"], resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "round-0003.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "checkpoints" / "round-0003.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert [s["resumed_after_round"] for s in summary["sessions"]] == [None, 2]


def test_half_precision_transport_halves_the_bytes(tmp_path: Path) -> None:
    grid32, s32 = _run(tmp_path / "f32", ["federation.num_sites=2", "federation.rounds=1"])
    grid16, s16 = _run(tmp_path / "f16", ["federation.num_sites=2", "federation.rounds=1",
                                          "federation.transport_dtype=float16"])
    _, sbf = _run(tmp_path / "bf16", ["federation.num_sites=2", "federation.rounds=1",
                                      "federation.transport_dtype=bfloat16"])
    b32, b16, bbf = (s["rounds"][0]["bytes"] for s in (s32, s16, sbf))
    group_total = sum(s32["transport"]["group_bytes"].values())
    assert b32["train_to_sites"] == 2 * group_total == b32["train_from_sites"]
    for b in (b16, bbf):
        assert b["train_to_sites"] * 2 == b32["train_to_sites"]
        assert b["train_from_sites"] * 2 == b32["train_from_sites"]
    assert s16["transport"]["group_bytes_float32"] == s32["transport"]["group_bytes"]
    wire = grid16.replies[0].content.array_records["generator"]
    assert {str(wire[k].dtype) for k in wire.keys()} == {"float16"}
    assert np.isfinite(s16["rounds"][0]["global"]["accuracy"])


def test_a_hospital_whose_data_fails_validation_is_reported_and_the_run_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import Context, RecordDict

    contexts = {
        1: Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {}),
        2: Context(1, 2, {"partition-id": 1, "num-partitions": 2, "site-name": "hospital-b",
                          "dataset": "pcam", "data-root": str(tmp_path / "missing")}, RecordDict(), {}),
    }
    grid = InProcessGrid(client_app, 2, contexts=contexts)
    _, summary = _run(tmp_path / "run", ["federation.num_sites=2", "federation.rounds=2"], grid=grid)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        assert entry["aggregated"] is True and list(entry["sites"]) == ["site-0"]
        reasons = {(e["site"], e.get("phase", "train")): e["reason"] for e in entry["excluded"]}
        assert set(reasons) == {("hospital-b", "train"), ("hospital-b", "evaluate")}
        assert "data_error" in reasons[("hospital-b", "train")]
        # The coordinator learns the error's type, never the hospital's paths; its log has them.
        assert "DataError" in reasons[("hospital-b", "train")]
        assert str(tmp_path) not in json.dumps(entry["excluded"])
        reference = reasons[("hospital-b", "train")].rsplit("reference ", 1)[1].rstrip(")")
        logged = [r.getMessage() for r in caplog.records if reference in r.getMessage()]
        assert logged and str(tmp_path / "missing") in logged[0]
