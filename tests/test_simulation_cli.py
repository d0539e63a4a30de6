"""End to end: `fedvitgan simulate` on Flower's simulation engine (Ray), then a resumed third round."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

FAST = ["federation.num_sites=2", "train.local_steps=4", "train.batch_size=8", "data.train_per_site=48",
        "data.test_per_site=24", "samples_per_class=2"]


def _simulate(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])


def test_two_hospitals_two_rounds_write_the_run_folder_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = _simulate([*FAST, "federation.rounds=2", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"run folder: {run_dir}" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["federation"]["num_sites"] == 2
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
            assert math.isfinite(entry["global"][name]), (name, entry["global"])
        assert set(entry["sites"]) == {"site-0", "site-1"}
        for site in entry["sites"].values():
            assert all(math.isfinite(v) for v in site["train"].values())
            assert math.isfinite(site["evaluate"]["accuracy"])
        assert entry["bytes"]["train_to_sites"] == 2 * sum(summary["transport"]["group_bytes"].values())
        assert entry["seconds"] > 0
    for rnd in (1, 2):
        assert (run_dir / "checkpoints" / f"round-{rnd:04d}.safetensors").is_file()
        with Image.open(run_dir / "samples" / f"round-{rnd:03d}.png") as grid:
            assert grid.format == "PNG"
    assert (run_dir / "checkpoints" / "server_state.json").is_file()
    assert "site-1" in (run_dir / "partition.md").read_text()

    resumed = _simulate([f"resume={run_dir}", "federation.rounds=3"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert [s["resumed_after_round"] for s in summary["sessions"]] == [None, 2]
    assert (run_dir / "checkpoints" / "round-0003.safetensors").is_file()


def test_resume_refuses_to_change_the_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"config": {"model": {"name": "tiny"}}}))
    done = _simulate([f"resume={run_dir}", "model=small"])
    assert done.returncode == 2
    assert "cannot change when resuming" in done.stderr


def test_resume_takes_console_and_tracking_from_the_current_command(tmp_path: Path) -> None:
    from server.resume import resolve_resume

    saved = {"model": {"name": "tiny"}, "federation": {"rounds": 2}, "console": {"quiet": False},
             "tracking": {"backend": "none"}}
    (tmp_path / "summary.json").write_text(json.dumps({"config": saved}))
    current = {"resume": str(tmp_path), "model": {"name": "tiny"}, "federation": {"rounds": 3},
               "console": {"quiet": True}, "tracking": {"backend": "mlflow", "uri": None}}
    resumed = resolve_resume(tmp_path, [f"resume={tmp_path}", "federation.rounds=3", "console.quiet=true",
                                       "tracking=mlflow", "tracking.experiment=x"], current=current)
    assert resumed["console"] == {"quiet": True} and resumed["tracking"]["backend"] == "mlflow"
    assert resumed["federation"]["rounds"] == 3 and resumed["model"] == {"name": "tiny"}
    assert resumed["output_dir"] == str(tmp_path.resolve())
