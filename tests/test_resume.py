"""Resume in deployment: ``resume=RUN`` through the ServerApp's overrides reloads and freezes the stopped
run's config, with the one function the simulation CLI uses too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.app import app as client_app
from common.config import ConfigError
from server.app import run_from_overrides
from server.resume import resolve_resume
from tests.fakes import InProcessGrid

STOPPED = ["federation.num_sites=1", "train.local_steps=2", "train.batch_size=8", "data.train_per_site=24",
           "data.test_per_site=8", "samples_per_class=1", "federation.evaluate_each_round=false",
           "privacy.enabled=true", "privacy.noise_multiplier=1.7", "federation.aggregation.generator.weight=uniform"]


def test_resume_alone_continues_the_stopped_runs_frozen_config_through_the_serverapp(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_from_overrides(InProcessGrid(client_app, 1), " ".join([*STOPPED, "federation.rounds=1", f"output_dir={run_dir}"]))
    first = json.loads((run_dir / "summary.json").read_text())
    # A new ServerApp (new flwr run) with only resume= and more rounds: DP stays on, aggregation stays.
    run_from_overrides(InProcessGrid(client_app, 1), f"resume={run_dir} federation.rounds=2")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [s["resumed_after_round"] for s in summary["sessions"]] == [None, 1]
    config = summary["config"]
    assert config["privacy"]["enabled"] is True and config["privacy"]["noise_multiplier"] == 1.7
    assert config["federation"]["aggregation"]["generator"]["weight"] == "uniform"
    assert config["federation"]["rounds"] == 2 and config["resume"] == str(run_dir)
    unchanged = {k: v for k, v in config.items() if k not in ("federation", "resume")}
    assert unchanged == {k: v for k, v in first["config"].items() if k not in ("federation", "resume")}
    assert summary["rounds"][1]["sites"]["site-0"]["train"]["dp/steps_total"] == 4  # the DP history went on


def test_resume_refuses_every_change_but_rounds_timeouts_and_device(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = {"federation": {"rounds": 2, "round_timeout_s": 10}, "privacy": {"enabled": True}, "device": "cpu"}
    (run_dir / "summary.json").write_text(json.dumps({"config": saved}))
    resumed = resolve_resume(run_dir, [f"resume={run_dir}", "federation.rounds=5", "federation.round_timeout_s=60",
                                       "federation.wait_for_sites_s=30", "device=cuda", f"output_dir={run_dir}",
                                       "hydra.run.dir=x"])
    assert resumed["federation"] == {"rounds": 5, "round_timeout_s": 60, "wait_for_sites_s": 30}
    assert resumed["device"] == "cuda" and resumed["privacy"] == {"enabled": True}
    assert resumed["output_dir"] == str(run_dir.resolve())
    for override, key in [("privacy.enabled=false", "privacy.enabled"), ("model=small", "model"),
                          (f"output_dir={tmp_path / 'other'}", "output_dir"),
                          ("federation.aggregation.classifier.local=true", "federation.aggregation.classifier.local")]:
        with pytest.raises(ConfigError, match=f"'{key}'.*cannot change when resuming"):
            resolve_resume(run_dir, [f"resume={run_dir}", override])
    with pytest.raises(ConfigError, match="no summary.json"):
        resolve_resume(tmp_path / "missing", [])


def test_resume_takes_keys_added_to_conf_since_the_run_started_but_keeps_the_saved_values(tmp_path: Path) -> None:
    saved = {"federation": {"rounds": 2, "score_bins": 10}, "privacy": {"enabled": True}}
    (tmp_path / "summary.json").write_text(json.dumps({"config": saved}))
    newer = {"federation": {"rounds": 9, "score_bins": 1000, "evaluate_batch_size": 256}, "privacy": {"enabled": False},
             "samples_per_class": 8}
    resumed = resolve_resume(tmp_path, [f"resume={tmp_path}"], newer_keys_from=newer)
    assert resumed["federation"] == {"rounds": 2, "score_bins": 10, "evaluate_batch_size": 256}
    assert resumed["privacy"] == {"enabled": True} and resumed["samples_per_class"] == 8
    assert "evaluate_batch_size" not in resolve_resume(tmp_path, [f"resume={tmp_path}"])["federation"]


PLAIN = [o for o in STOPPED if not o.startswith("privacy.")]


def test_a_damaged_summary_is_rebuilt_from_the_checkpoints_instead_of_blocking_the_resume(tmp_path: Path) -> None:
    # F16: a summary.json cut short used to stop the resume with "cannot read the stopped run's config".
    run_dir = tmp_path / "run"
    run_from_overrides(InProcessGrid(client_app, 1), " ".join([*PLAIN, "federation.rounds=2", f"output_dir={run_dir}"]))
    text = (run_dir / "summary.json").read_text()
    (run_dir / "summary.json").write_text(text[: len(text) // 2])
    run_from_overrides(InProcessGrid(client_app, 1), f"resume={run_dir} federation.rounds=3")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["rounds"][0]["rebuilt"] is True and "rebuilt" not in summary["rounds"][2]
    (warning,) = [w for s in summary["sessions"] for w in s.get("warnings", []) if "rebuilt" in w]
    assert "summary.json.damaged-" in warning
    assert len(list(run_dir.glob("summary.json.damaged-*"))) == 1  # the damaged copy is kept


def test_a_fallback_to_an_older_checkpoint_keeps_the_site_bindings(tmp_path: Path) -> None:
    # F15: a newest checkpoint that cannot be read used to drop the bindings along with it.
    from server.checkpoint import CheckpointStore

    run_dir = tmp_path / "run"
    run_from_overrides(InProcessGrid(client_app, 1), " ".join([*PLAIN, "federation.rounds=2", f"output_dir={run_dir}"]))
    (run_dir / "checkpoints" / "round-0002.safetensors").write_bytes(b"damaged")
    latest = CheckpointStore(run_dir).latest()
    assert latest is not None and latest.state.round == 1
    assert latest.state.extra["site_bindings"] == {"site-0": 1}
    (run_dir / "checkpoints" / "server_state.json").write_text("{")  # the state file unreadable too
    latest = CheckpointStore(run_dir).latest()
    assert latest is not None and latest.state.extra["site_bindings"] == {"site-0": 1}  # from the file's metadata


def test_a_second_serverapp_on_one_run_folder_is_refused(tmp_path: Path) -> None:
    from server.run_lock import run_folder_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with run_folder_lock(run_dir):
        with pytest.raises(ConfigError, match="being run by another ServerApp"):
            run_from_overrides(InProcessGrid(client_app, 1),
                               " ".join([*PLAIN, "federation.rounds=1", f"output_dir={run_dir}"]))
    assert not (run_dir / "summary.json").exists()  # it wrote nothing


def test_the_deployment_guide_lists_exactly_the_keys_a_resume_may_change() -> None:
    import re

    from server.resume import RESUMABLE_KEYS

    text = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    table = text.split("| key | why it may change |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE)
    assert sorted(listed) == sorted(RESUMABLE_KEYS)
