"""SecAgg+ (federation.secure_aggregation=secaggplus) with the real ServerApp loop and ClientApps in one process.

The hospitals run Flower's ``secaggplus_mod``; the coordinator drives the stages itself
(``server/secure_round.py``). Checked: the secure aggregate is plain FedAvg up to quantization; the
coordinator receives only masked vectors; a dropout after the keys were shared is survived, and
too many dropouts fail the round cleanly; every rule that needs individual updates is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from safetensors.numpy import load_file

import client.secure_aggregation as client_secure
from client.app import app as client_app
from client.policy import Refusal, SitePolicy, check_secure_policy
from common.config import ConfigError, compose_config, dataclass_from_mapping, plain_config
from common.model import GROUPS
from common.run_config import run_config
from common.secure_aggregation import SecAggPlusConfig, VectorLayout, clip_update
from server.federation import FederationFailed, run_federation
from tests.fakes import InProcessGrid

SMALL = ["train.local_steps=3", "train.batch_size=8", "data.train_per_site=40", "data.test_per_site=20",
         "train.selection.warmup_steps=2", "train.selection.min_history=2", "samples_per_class=2",
         "federation.rounds=1", "federation.evaluate_each_round=false"]
SECURE = ["federation=secaggplus"]
#: The plain run that secure aggregation must reproduce: FedAvg with the server-side bounds off.
PLAIN = ["federation.aggregation.clip_update_norm=null", "federation.aggregation.max_weight_share=1.0"]

Tamper = Callable[[int, Message], "Message | None"]


def _run(tmp: Path, overrides: list[str], tamper: Tamper | None = None) -> tuple[InProcessGrid, dict]:
    run = plain_config(compose_config([*SMALL, *overrides]))
    run["output_dir"] = str(tmp)
    run["resume"] = None
    grid = InProcessGrid(client_app, int(run["federation"]["num_sites"]), tamper)
    try:
        run_federation(grid, run, tmp)
    except FederationFailed:
        pass
    return grid, json.loads((tmp / "summary.json").read_text())


def _checkpoint(run_dir: Path, rnd: int = 1) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "checkpoints" / f"round-{rnd:04d}.safetensors"))


def _stage(msg: Message) -> str | None:
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else record.get(Key.STAGE)


def _is_vector(reply: Message) -> bool:
    """A hospital's masked training reply (stage collect_masked_vectors)."""
    record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    return record is not None and Key.MASKED_PARAMETERS in record


def _group_differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    out = {g: 0.0 for g in GROUPS}
    for key in a:
        group = key.split(".")[0]
        out[group] = max(out[group], float(np.abs(a[key].astype(np.float64) - b[key].astype(np.float64)).max()))
    return out


@pytest.fixture
def recorded_vectors(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[np.ndarray]]:
    """Each hospital's vector before Flower's mod masks it, by site name (the hospitals' side only)."""
    vectors: dict[str, list[np.ndarray]] = {}
    original = client_secure.secure_vector

    def spy(msg, run, trained, transport, metrics):  # noqa: ANN001, ANN202
        record, clipped = original(msg, run, trained, transport, metrics)
        site = msg.metadata.dst_node_id
        vectors[f"node-{site}"] = [record[str(i)].numpy().copy() for i in range(len(record))]
        return record, clipped

    monkeypatch.setattr(client_secure, "secure_vector", spy)
    import client.local_run

    monkeypatch.setattr(client.local_run, "secure_vector", spy)
    return vectors


@pytest.mark.parametrize("model", [[], ["model.classifier_whitening=true", "train.whitening.images=64"]],
                         ids=["plain-head", "whitened-head"])
def test_the_secure_aggregate_is_plain_fedavg_of_the_same_replies_up_to_quantization(tmp_path: Path,
                                                                                     model: list[str]) -> None:
    """With the whitened head too: its matrix changes by far more than update_norm in the first round
    (the same change at every hospital), and the secure aggregate must still hold it exactly."""
    _, plain = _run(tmp_path / "plain", [*PLAIN, *model])
    grid, secure = _run(tmp_path / "secure", [*SECURE, *model])
    entry = secure["rounds"][0]
    assert entry["aggregated"] is True, entry["failure"]
    assert entry["secure_aggregation"]["participants"] == ["site-0", "site-1", "site-2"]
    assert entry["secure_aggregation"]["dropouts"] == []
    assert all(entry["aggregation"][g]["secure_aggregation"] == "secaggplus" for g in GROUPS)
    differences = _group_differences(_checkpoint(tmp_path / "plain"), _checkpoint(tmp_path / "secure"))
    assert all(d <= 1e-3 for d in differences.values()), differences
    assert any(d > 0 for d in differences.values()), "bit-identical: the secure path did not run"
    assert plain["rounds"][0]["aggregated"] is True
    # The four stages ran, each with its bytes recorded; the first messages were the setup's (the
    # hospitals' mod pops the stage key of the in-process message, so the setup is told by its keys).
    assert set(entry["secure_aggregation"]["bytes"]) == set(Stage.all())
    assert all(Key.SAMPLE_NUMBER in m.content.config_records[RECORD_KEY_CONFIGS] for m in grid.sent[:3])


def test_the_coordinator_receives_masked_vectors_only(tmp_path: Path,
                                                      recorded_vectors: dict[str, list[np.ndarray]]) -> None:
    grid, summary = _run(tmp_path, SECURE)
    assert summary["rounds"][0]["aggregated"] is True
    cfg = SecAggPlusConfig(**summary["config"]["federation"]["secaggplus"])
    collected = [r for r in grid.replies if _is_vector(r)]
    assert len(collected) == 3 and len(recorded_vectors) == 3
    for reply in grid.replies:  # nothing of a model travels in the clear
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    for reply in collected:
        own = recorded_vectors[f"node-{reply.metadata.src_node_id}"]
        received = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        quantized = quantize(own, cfg.clipping_range, cfg.quantization_range)
        masked = np.concatenate([a.reshape(-1) for a in received[1:]]).astype(np.int64)
        plain = np.concatenate([q.reshape(-1) for q in quantized]).astype(np.int64)
        assert masked.size == plain.size > 10_000
        # Unmasked, the hospital's quantized entries sit near the middle of [0, 2**22); masked, they are
        # spread over [0, 2**32): almost none lands within 2**16 of the hospital's own value.
        close = np.mean(np.abs(masked - plain) < 2**16)
        assert close < 0.01, close


def test_a_hospital_that_drops_out_after_sharing_keys_does_not_stop_the_round(
        tmp_path: Path, recorded_vectors: dict[str, list[np.ndarray]]) -> None:
    dropped = 2

    def lose_its_vector(node: int, reply: Message) -> Message | None:
        return None if node == dropped and _is_vector(reply) else reply

    grid, summary = _run(tmp_path, SECURE, lose_its_vector)
    entry = summary["rounds"][0]
    log = entry["secure_aggregation"]
    assert entry["aggregated"] is True, entry["failure"]
    assert len(log["participants"]) == 2
    assert [(d["node_id"], d["stage"]) for d in log["dropouts"]] == [(dropped, Stage.COLLECT_MASKED_VECTORS)]
    # The dropped hospital's pairwise masks were removed: the result is FedAvg of the other two.
    run = summary["config"]
    layout = _layout(tmp_path)
    kept = [recorded_vectors[f"node-{n}"] for n in (1, 2, 3) if n != dropped]
    expected = layout.decode([sum(parts) for parts in zip(*kept)])
    initial = _initial_state(run)
    result = _checkpoint(tmp_path)
    for group, (summed, ratio_sum) in expected.items():
        worst = max(float(np.abs(result[k].astype(np.float64) - (initial[k] + summed[k] / ratio_sum)).max())
                    for k in summed)
        assert worst <= 1e-3, (group, worst)


def test_below_the_reconstruction_threshold_the_round_fails_cleanly(tmp_path: Path) -> None:
    def lose_two_vectors(node: int, reply: Message) -> Message | None:
        return None if node in (2, 3) and _is_vector(reply) else reply

    _, summary = _run(tmp_path, [*SECURE, "federation.max_failed_rounds=1"], lose_two_vectors)
    entry = summary["rounds"][0]
    assert entry["aggregated"] is False
    assert "reconstruction_threshold" in entry["failure"]
    assert summary["status"] == "failed"
    assert {d["node_id"] for d in entry["secure_aggregation"]["dropouts"]} == {2, 3}
    assert (tmp_path / "checkpoints" / "round-0001.safetensors").is_file()


def _layout(run_dir: Path) -> VectorLayout:
    state = _initial_state(json.loads((run_dir / "summary.json").read_text())["config"])
    shapes = {g: {k: v.shape for k, v in state.items() if k.startswith(f"{g}.")} for g in GROUPS}
    return VectorLayout.of(list(GROUPS), shapes)


def _initial_state(run: dict) -> dict[str, np.ndarray]:
    from common.data.registry import configured_class_names
    from common.model import ModelConfig, build_model

    cfg = dataclass_from_mapping(ModelConfig, run["model"], "model")
    model = build_model(cfg, len(configured_class_names(run["data"])), seed=int(run["seed"]))
    state = model.state_dict()
    assert all(torch.is_floating_point(v) for v in state.values())
    return {k: v.detach().double().numpy() for k, v in state.items()}


def test_a_hospital_clips_its_learnt_update_to_the_bound_and_its_derived_buffers_only_to_the_quantization_range() -> None:
    """The whitening's change (the same at every hospital, often far above update_norm) must neither
    shrink the learnt update nor be shrunk itself; only an entry beyond clipping_range scales it."""
    update = {"classifier.w": np.array([3.0, 4.0]), "classifier.input_whitening": np.array([3.0, -4.0, 2.0] * 10)}
    clipped, was = clip_update(update, 5.0, 8.0)  # the whitening's change has norm 30.8, no entry beyond 8
    assert not was and list(clipped) == list(update)
    np.testing.assert_array_equal(clipped["classifier.w"], [3.0, 4.0])
    np.testing.assert_array_equal(clipped["classifier.input_whitening"], update["classifier.input_whitening"])
    beyond, was = clip_update({"classifier.w": np.array([0.3, 0.4]),
                               "classifier.input_centre": np.array([16.0, -4.0])}, 5.0, 8.0)
    assert was and beyond["classifier.w"].tolist() == [0.3, 0.4]
    assert beyond["classifier.input_centre"].tolist() == pytest.approx([8.0, -2.0])
    learnt, was = clip_update({"discriminator.w": np.array([6.0, 8.0]), "classifier.centre_ready": np.array([1.0])},
                              5.0, 8.0)
    assert was and learnt["discriminator.w"].tolist() == pytest.approx([3.0, 4.0])
    assert learnt["classifier.centre_ready"].tolist() == [1.0]


@pytest.mark.parametrize(("override", "named"), [
    ("federation.aggregation.discriminator.rule=median", "aggregation.discriminator.rule=median"),
    ("federation.aggregation.generator.rule=trimmed_mean", "aggregation.generator.rule=trimmed_mean"),
    ("federation.aggregation.clip_update_norm=3.0", "aggregation.clip_update_norm"),
    ("federation.aggregation.max_weight_share=auto", "aggregation.max_weight_share"),
    ("federation.aggregation.max_weight_share=0.6", "aggregation.max_weight_share"),
    ("federation.num_sites=1", "needs at least 2 hospitals"),
    ("federation.secaggplus.update_norm=9.0", "update_norm"),
    ("federation.secaggplus.reconstruction_threshold=3", "reconstruction_threshold"),
])
def test_what_needs_individual_updates_is_refused_at_start(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match="secure aggregation|update_norm|reconstruction_threshold") as caught:
        run_config(plain_config(compose_config([*SECURE, override])))
    assert named in str(caught.value)


def test_the_plain_default_federation_still_composes() -> None:
    typed = run_config(plain_config(compose_config([])))
    assert typed.federation.secure_aggregation == "none"
    assert run_config(plain_config(compose_config(SECURE))).federation.secure_aggregation == "secaggplus"


def test_a_hospital_that_requires_secure_aggregation_refuses_a_round_without_it() -> None:
    run = plain_config(compose_config([]))
    with pytest.raises(Refusal, match="federation.secure_aggregation"):
        check_secure_policy(run, SitePolicy.from_node_config({"secure-aggregation-required": "true"}), secure=False)
    check_secure_policy(run, SitePolicy(), secure=False)
    declared = plain_config(compose_config(SECURE))
    with pytest.raises(Refusal, match="not part of a secure-aggregation round"):
        check_secure_policy(declared, SitePolicy(), secure=False)
    check_secure_policy(declared, SitePolicy(secure_aggregation_required=True), secure=True)
    with pytest.raises(Refusal, match="max-update-norm"):
        check_secure_policy(declared, SitePolicy.from_node_config({"max-update-norm": "1.0"}), secure=True)


def test_a_plain_round_is_refused_in_the_federation_by_a_hospital_that_requires_it(tmp_path: Path) -> None:
    _, summary = _run(tmp_path, ["federation.num_sites=2", "+sites.site-1.policy.secure_aggregation_required=true"])
    entry = summary["rounds"][0]
    assert [e["site"] for e in entry["excluded"]] == ["site-1"]
    assert "secure aggregation" in entry["excluded"][0]["reason"]


def test_an_aggregate_beyond_max_abs_value_keeps_its_group(tmp_path: Path) -> None:
    # The generator and discriminator hold layer-norm weights near 1; the classifier head stays far below 0.5.
    _, summary = _run(tmp_path, [*SECURE, "federation.max_abs_value=0.5"])
    entry = summary["rounds"][0]
    assert entry["aggregated"] is True
    initial = _initial_state(summary["config"])
    result = _checkpoint(tmp_path)
    for group in GROUPS:
        keys = [k for k in initial if k.startswith(f"{group}.")]
        kept = "max_abs_value" in entry["aggregation"][group].get("kept", "")
        assert kept == (group != "classifier"), (group, entry["aggregation"][group])
        assert kept or max(float(np.abs(result[k]).max()) for k in keys) <= 0.5
        assert all(np.array_equal(result[k].astype(np.float64), initial[k]) for k in keys) == kept


def test_dp_and_secure_aggregation_together_keep_the_accounting(tmp_path: Path) -> None:
    dp = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null"]
    _, summary = _run(tmp_path, [*SECURE, *dp])
    entry = summary["rounds"][0]
    assert entry["aggregated"] is True, entry["failure"]
    assert len(entry["secure_aggregation"]["participants"]) == 3
    for site in entry["sites"].values():
        assert site["train"]["dp/epsilon"] > 0 and site["train"]["dp/steps_round"] == 3
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())
    assert sorted(report["sites"]) == ["site-0", "site-1", "site-2"]


def test_fedvitgan_simulate_survives_a_crashed_hospital_with_secure_aggregation(tmp_path: Path) -> None:
    """On Flower's simulation engine (Ray): each hospital's secrets live in its node context between
    the stages, and a hospital that crashes while training drops out after it shared its keys."""
    run_dir = tmp_path / "run"
    args = ["federation=secaggplus", "federation.rounds=1", "train.local_steps=3", "train.batch_size=8",
            "data.train_per_site=40", "data.test_per_site=20", "samples_per_class=2",
            "faults=[{site:1,kind:crash,rounds:[1]}]", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", *args], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    entry = json.loads((run_dir / "summary.json").read_text())["rounds"][0]
    log = entry["secure_aggregation"]
    assert entry["aggregated"] is True, entry["failure"]
    assert sorted(log["participants"]) == ["site-0", "site-2"]
    # A hospital that never answered well is named by its node (as in excluded), not by the name it claims.
    assert [d["stage"] for d in log["dropouts"]] == [Stage.COLLECT_MASKED_VECTORS]
    assert "injected fault: crash" in log["dropouts"][0]["reason"]


def test_garbage_key_shares_fail_the_round_cleanly_without_stopping_the_run(tmp_path: Path) -> None:
    def corrupt_shares(node: int, reply: Message) -> Message:
        record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if node == 3 and record is not None and Key.SHARE_LIST in record:
            record[Key.SHARE_LIST] = [bytes(len(s)) for s in record[Key.SHARE_LIST]]
        return reply

    _, summary = _run(tmp_path, [*SECURE, "federation.rounds=2"], corrupt_shares)
    assert [r["aggregated"] for r in summary["rounds"]] == [False, False]
    assert all("secure aggregation" in r["failure"] for r in summary["rounds"])
    assert summary["status"] == "completed"  # two failed rounds, fewer than max_failed_rounds=3
