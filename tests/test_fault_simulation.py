"""End to end on Flower's simulation engine (Ray): every fault kind through `fedvitgan simulate`
leaves the run alive and is named in summary.json; a run whose hospitals all fail exits non-zero
with status failed, and resumes once they are back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_simulation_cli import FAST, _simulate

pytestmark = pytest.mark.slow

EVERY_KIND = ("faults=[{site:1,kind:crash,rounds:[2]},{site:2,kind:nan,rounds:[2]},{site:3,kind:shape,rounds:[2]},"
              "{site:1,kind:hang,rounds:[3]},{site:2,kind:inflate_examples,rounds:[3]},"
              "{site:3,kind:impersonate,rounds:[3]},{site:1,kind:scale,scale:1e4,rounds:[4]}]")


def _excluded(entry: dict) -> dict[str, str]:
    return {e["site"]: e["reason"] for e in entry["excluded"] if e["phase"] == "train"}


def test_every_fault_kind_leaves_the_run_alive_and_is_named(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = _simulate([*FAST, "federation.num_sites=4", "federation.rounds=4", "federation.round_timeout_s=90",
                      "federation.aggregation.clip_update_norm=3", EVERY_KIND, f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    first, crash_nan_shape, hang_inflate_impersonate, scale = summary["rounds"]
    assert first["aggregated"] and not first["excluded"]
    reasons = _excluded(crash_nan_shape)
    assert sorted(reasons) == ["site-1", "site-2", "site-3"]
    assert "Flower error" in reasons["site-1"] and "injected fault: crash" in reasons["site-1"]
    assert "non-finite values" in reasons["site-2"]
    assert "declared shape" in reasons["site-3"]
    reasons = _excluded(hang_inflate_impersonate)
    assert sorted(reasons) == ["site-1", "site-2", "site-3"]
    assert "straggler" in reasons["site-1"] and hang_inflate_impersonate["seconds"] >= 90
    assert "num-examples is 1000000000000.0" in reasons["site-2"]
    assert "bound to site 'site-3' but reported 'site-0'" in reasons["site-3"]
    assert "train" in hang_inflate_impersonate["sites"]["site-0"]  # the real site-0 is kept
    assert not scale["excluded"]
    for group in ("generator", "discriminator", "classifier"):
        assert scale["aggregation"][group]["clipped"] == ["site-1"]
    for entry in summary["rounds"]:
        assert entry["aggregated"] and entry["global"]["examples"] == 4 * 24


def test_a_run_whose_hospitals_all_fail_exits_non_zero_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    crashes = "faults=[{site:0,kind:crash,rounds:all},{site:1,kind:crash,rounds:all}]"
    failed = _simulate([*FAST, "federation.rounds=3", "federation.max_failed_rounds=2", crashes,
                        f"hydra.run.dir={run_dir}"])
    assert failed.returncode == 3, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "stopped after round 2" in failed.stderr and f"resume={run_dir}" in failed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert (run_dir / "checkpoints" / "round-0002.safetensors").is_file()

    resumed = _simulate([f"resume={run_dir}", "faults=[]"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["rounds"][2]["aggregated"] and summary["config"]["faults"] == []
