"""Reading a run folder for the post-run commands: checkpoints, clear errors, the report's tables and
the tracking names, on small hand-written run folders (no training)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.model import build_model, model_preset
from simulations.predict import find_images
from simulations.report import render_markdown, write_run_report
from simulations.run_folder import RunFolderError, resolve_checkpoint
from simulations.run_model import load_run_model
from simulations.tracking import flatten, metric_key, round_metrics

CONFIG = {"seed": 3, "model": dataclasses.asdict(model_preset("tiny")),  # as a run records it: every size
          "federation": {"rounds": 3, "num_sites": 2},
          "data": {"name": "synthetic"}, "partition": {"name": "iid"}, "privacy": {"enabled": False}}


def _entry(rnd: int, excluded: list | None = None) -> dict:
    site = {"train": {"loss/cls_real": 1.0 / rnd, "weight/cls_real": 0.5 + rnd / 10, "weight/cls_synthetic": 1.0,
                      "acceptance/a b": 0.25 * rnd, "acceptance/c": 0.0, "selected_images": 4.0 * rnd,
                      "images_per_second": 100.0},
            "evaluate": {"accuracy": 0.5, "balanced_accuracy": 0.4 + rnd / 100, "macro_f1": 0.3, "auroc": None}}
    return {"round": rnd, "seconds": 1.5 * rnd, "sites": {"site-0": site},
            "global": {"accuracy": 0.5, "balanced_accuracy": 0.4 + rnd / 100, "macro_f1": 0.3, "auroc": None,
                       "examples": 20.0},
            "excluded": excluded or [], "bytes": {"train_to_sites": 1000, "train_from_sites": 900, "evaluate_to_sites": 1000},
            "samples": f"samples/round-{rnd:03d}.png"}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    rounds = [_entry(1), _entry(2, [{"site": "site-1", "reason": "data_error: file x|y unreadable", "phase": "train"}])]
    (tmp_path / "summary.json").write_text(json.dumps({"config": CONFIG, "rounds": rounds}))
    model = build_model(model_preset("tiny"), 5, seed=0)
    (tmp_path / "checkpoints").mkdir()
    for rnd in (1, 2):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp_path / "checkpoints" / f"round-{rnd:04d}.safetensors"))
    return tmp_path


def test_latest_checkpoint_or_a_chosen_round_or_a_file(run_dir: Path) -> None:
    assert resolve_checkpoint(run_dir).round == 2
    assert resolve_checkpoint(run_dir, 1).path.name == "round-0001.safetensors"
    by_file = resolve_checkpoint(run_dir / "checkpoints" / "round-0001.safetensors")
    assert by_file.round == 1 and by_file.run_dir == run_dir.resolve() and by_file.config["seed"] == 3
    (run_dir / "checkpoints" / "server_state.json").write_text(json.dumps({"round": 1}))
    assert resolve_checkpoint(run_dir).round == 1  # the last *complete* round the server recorded


def test_bad_run_folders_are_named(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(RunFolderError, match=r"has no checkpoint of round 7; it has rounds \[1, 2\]"):
        resolve_checkpoint(run_dir, 7)
    with pytest.raises(RunFolderError, match=r"--round 2 contradicts the checkpoint file round-0001"):
        resolve_checkpoint(run_dir / "checkpoints" / "round-0001.safetensors", 2)
    with pytest.raises(RunFolderError, match=r"summary\.json not found: is .* a fedvitgan run folder"):
        resolve_checkpoint(tmp_path_factory.mktemp("empty"))
    with pytest.raises(RunFolderError, match=r"is not a run checkpoint"):
        resolve_checkpoint(run_dir / "summary.json")
    (run_dir / "checkpoints" / "round-0002.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunFolderError, match=r"cannot read checkpoint .*round-0002\.safetensors"):
        load_run_model(run_dir)
    with pytest.raises(RunFolderError, match=r"round-0001\.safetensors does not fit the model .* \(2 classes\)"):
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["config"]["data"] = {"name": "imagefolder", "class_names": ["a", "b"]}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        load_run_model(run_dir, 1)


def test_loaded_model_is_the_checkpoint_in_eval_mode(run_dir: Path) -> None:
    run = load_run_model(run_dir, 1)
    assert not run.model.training and run.image_size == 32 and len(run.class_names) == 5
    expected = build_model(model_preset("tiny"), 5, seed=0).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in run.model.state_dict().items())


def test_report_tables_escape_and_mark_missing_values(run_dir: Path) -> None:
    text = render_markdown(json.loads((run_dir / "summary.json").read_text()), run_dir)
    assert "| 1 | 0.5000 | 0.4100 | 0.3000 | n/a | 20 | 1 | 0 |" in text  # AUROC null -> n/a
    assert "| 2 | site-1 | train | data_error: file x\\|y unreadable |" in text
    assert "| 2 | site-0 | 0.5000 | 0.0000 | 8 |" in text  # acceptance of classes 'a b' and 'c', selected images
    assert "| 2 | 2000 | 900 | 0.00 | 0.00 | 3.0000 |" in text
    assert "No sample grid in the run folder yet." in text
    paths = write_run_report(run_dir)
    assert paths["png"].stat().st_size > 10_000 and paths["md"].read_text() == text


def test_tracking_names_and_values() -> None:
    assert metric_key("site-0", "train", "acceptance/tumour+stroma") == "site-0/train/acceptance/tumour_stroma"
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    metrics = dict(round_metrics(_entry(2)))
    assert metrics["global/balanced_accuracy"] == pytest.approx(0.42) and "global/auroc" not in metrics
    assert metrics["site-0/train/acceptance/a b"] == 0.5 and metrics["round/bytes_to_sites"] == 2000.0


def test_find_images_recurses_skips_hidden_and_other_files(tmp_path: Path) -> None:
    for name in ("b/2.png", "b/1.TIF", "a/x.jpg", ".hidden/y.png", "a/.z.png", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    single = tmp_path / "a" / "x.jpg"
    found = find_images([tmp_path, single])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/x.jpg", "b/1.TIF", "b/2.png"]
    with pytest.raises(Exception, match=r"missing does not exist; expected an image file or a folder"):
        find_images([tmp_path / "missing"])


def test_mlflow_is_imported_only_when_tracking_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from common.config import ConfigError
    from simulations.tracking import open_tracker

    code = "import sys, simulations.simulate, simulations.tracking; print('mlflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "False", done.stderr[-2000:]
    assert open_tracker({"tracking": {"backend": "none"}}) is None
    with pytest.raises(ConfigError, match=r"tracking\.backend 'wandb' is not known"):
        open_tracker({"tracking": {"backend": "wandb"}})
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"tracking=mlflow needs MLflow, an optional extra: pip install -e '\.\[tracking\]'"):
        open_tracker({"tracking": {"backend": "mlflow"}, "output_dir": "/tmp/x"})
