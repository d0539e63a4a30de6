"""What a run gives a hospital, end to end on a plain ``ROOT/<class>/<image>`` folder: a quiet
multirun (one folder per job) tracked in MLflow, then predict, export, generate and report on it."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simulations.console import ROUND_LINE
from simulations.run_model import image_tensor, load_run_model
from tests.data_fixtures import write_class_folders

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"tumour": 14, "benign": 10, "stroma": 6}  # held out at 0.2: 3, 2, 1
NAMES = sorted(CLASSES)
ROUNDS = 2


@dataclass
class Multirun:
    base: Path
    images: Path
    jobs: list[Path]
    done: subprocess.CompletedProcess[str]


def cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def multirun(tmp_path_factory: pytest.TempPathFactory) -> Multirun:
    base = tmp_path_factory.mktemp("products")
    images = base / "images"
    write_class_folders(images, CLASSES, size=40, suffix=".png", nct_names=False)
    done = cli(["simulate", "-m", "--quiet", "seed=0,1", "data=imagefolder", f"data.root={images}",
                "federation.num_sites=2", f"federation.rounds={ROUNDS}", "train.local_steps=2", "train.batch_size=8",
                "samples_per_class=2", "tracking=mlflow", f"hydra.sweep.dir={base / 'multi'}"], cwd=base)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Multirun(base, images, [base / "multi" / "0", base / "multi" / "1"], done)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ---------------------------------------------------------------- training on ROOT/<class>
def test_class_folders_train_end_to_end_without_class_names_one_folder_per_job(multirun: Multirun) -> None:
    for seed, job in enumerate(multirun.jobs):
        data = summary(job)
        assert data["config"]["seed"] == seed and data["config"]["data"]["class_names"] == NAMES
        assert [r["round"] for r in data["rounds"]] == list(range(1, ROUNDS + 1))
        for entry in data["rounds"]:
            assert all(math.isfinite(entry["global"][k]) for k in ("accuracy", "balanced_accuracy", "auroc"))
        partition = json.loads((job / "partition.json").read_text())
        for split, expected in (("train", {"benign": 8, "stroma": 5, "tumour": 11}),
                                ("test", {"benign": 2, "stroma": 1, "tumour": 3})):
            totals = {c: sum(site[split].get(c, 0) for site in partition.values()) for c in NAMES}
            assert totals == expected, (split, totals)  # a stratified 0.2 hold-out, the same for both run seeds


def test_quiet_console_shows_only_the_per_round_lines_and_no_warnings(multirun: Multirun) -> None:
    lines = [line for line in multirun.done.stdout.splitlines() if line.strip()]
    rounds = [line for line in lines if ROUND_LINE.match(line)]
    assert len(rounds) == ROUNDS * len(multirun.jobs)
    others = [line for line in lines if not ROUND_LINE.match(line)]
    assert all(re.match(r"^(run folder: |run report: |MLflow run )", line) for line in others), others
    assert len(others) == 3 * len(multirun.jobs)
    assert multirun.done.stderr.strip() == ""  # no Ray warning, no deprecation notice, no INFO log


# ---------------------------------------------------------------- tracking
def test_mlflow_local_store_holds_every_round_of_every_job(multirun: Multirun) -> None:
    import mlflow

    store = multirun.base / "mlruns" / "mlflow.db"
    assert store.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("fedvitgan")
    runs = {r.data.tags["fedvitgan.run_folder"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {str(job) for job in multirun.jobs}
    for job in multirun.jobs:
        run, data = runs[str(job)], summary(job)
        assert run.info.status == "FINISHED" and run.data.params["seed"] == str(data["config"]["seed"])
        for key, metrics in (("global/balanced_accuracy", [r["global"] for r in data["rounds"]]),
                             ("site-1/evaluate/accuracy", [r["sites"]["site-1"]["evaluate"] for r in data["rounds"]])):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            name = key.rsplit("/", 1)[1]
            assert history == [(r, pytest.approx(m[name])) for r, m in zip(range(1, ROUNDS + 1), metrics)], key
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "site-0/train/loss/cls_real")]
        assert sorted(steps) == list(range(1, ROUNDS + 1))
        artifacts = {a.path for folder in ("classifier", "samples", "report")
                     for a in client.list_artifacts(run.info.run_id, folder)}
        assert {"classifier/classifier.pt2", "classifier/model.json", "report/report.md", "report/curves.png",
                f"samples/round-{ROUNDS:03d}.png"} <= artifacts


# ---------------------------------------------------------------- report
def _rows(markdown: str, heading: str) -> list[list[str]]:
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]


def test_report_numbers_match_the_summary(multirun: Multirun) -> None:
    job = multirun.jobs[0]
    (job / "report.md").unlink()
    (job / "curves.png").unlink()
    done = cli(["report", str(job)], cwd=multirun.base)
    assert done.returncode == 0, done.stderr
    with Image.open(job / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 800
    text, data = (job / "report.md").read_text(), summary(job)
    rounds = data["rounds"]
    glob = _rows(text, "Global metrics per round")
    assert [row[0] for row in glob] == [str(r["round"]) for r in rounds]
    for row, entry in zip(glob, rounds):
        g = entry["global"]
        assert [float(v) for v in row[1:5]] == [round(g[k], 4) for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")]
        assert int(row[5]) == int(g["examples"])
    sites = _rows(text, "Each hospital per round")
    expected = [(str(e["round"]), name, round(s["evaluate"]["balanced_accuracy"], 4), round(s["train"]["loss/cls_real"], 4))
                for e in rounds for name, s in sorted(e["sites"].items())]
    assert [(r[0], r[1], float(r[3]), float(r[6])) for r in sites] == expected
    weights = _rows(text, "Loss weights per round")
    assert [float(r[2]) for r in weights] == [round(s["train"]["weight/cls_real"], 4) for e in rounds
                                              for _, s in sorted(e["sites"].items())]
    accept = _rows(text, "Sample selection per class per round")
    assert [[float(v) for v in r[2:2 + len(NAMES)]] for r in accept] == [
        [round(s["train"][f"acceptance/{c}"], 4) for c in NAMES] for e in rounds for _, s in sorted(e["sites"].items())]
    traffic = _rows(text, "Bytes and time per round")
    assert [(int(r[1]), int(r[2]), float(r[5])) for r in traffic] == [
        (e["bytes"]["train_to_sites"] + e["bytes"]["evaluate_to_sites"], e["bytes"]["train_from_sites"],
         round(e["seconds"], 4)) for e in rounds]
    assert f"![global generator samples](samples/round-{ROUNDS:03d}.png)" in text
    assert "Differential privacy was off" in text


def test_report_of_a_folder_without_summary_exits_2(tmp_path: Path) -> None:
    from simulations.report import main

    assert main([str(tmp_path)]) == 2


# ---------------------------------------------------------------- predict
def test_predict_on_a_folder_writes_one_row_per_image_with_probabilities_summing_to_one(multirun: Multirun) -> None:
    job, out = multirun.jobs[0], multirun.base / "predictions.csv"
    broken = multirun.base / "broken.png"
    broken.write_bytes((multirun.images / "tumour" / "img_0.png").read_bytes()[:60])
    done = cli(["predict", str(job), str(multirun.images), str(broken), "--out", str(out), "--batch-size", "7"],
               cwd=multirun.base)
    assert done.returncode == 2 and f"{broken}:" in done.stderr  # named, left out, the rest written
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    files = sorted(str(p) for p in multirun.images.rglob("*.png"))
    assert sorted(r["path"] for r in rows) == files
    assert list(rows[0]) == ["path", "predicted_class", *(f"p_{c}" for c in NAMES)]
    run = load_run_model(job)
    images = torch.stack([image_tensor(Path(r["path"]), run.image_size) for r in rows])
    with torch.no_grad():
        expected = torch.softmax(run.model.classify(images), dim=1).numpy()
    probs = np.array([[float(r[f"p_{c}"]) for c in NAMES] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(probs, expected, atol=2e-6)
    assert [r["predicted_class"] for r in rows] == [NAMES[k] for k in expected.argmax(axis=1)]


# ---------------------------------------------------------------- export
FRESH_PROCESS = """
import json, sys, torch
program = torch.export.load(sys.argv[1]).module()
images = torch.load(sys.argv[2])
torch.save(program(images), sys.argv[3])
project = sorted(m for m in sys.modules if m.split(".")[0] in ("common", "client", "server", "simulations", "conf"))
print(json.dumps(project))
"""


def test_exported_classifier_loads_without_the_project_and_gives_the_same_logits(multirun: Multirun) -> None:
    job, out = multirun.jobs[1], multirun.base / "deploy"
    done = cli(["export", str(job), "--out", str(out)], cwd=multirun.base)
    assert done.returncode == 0, done.stderr
    card = json.loads((out / "model.json").read_text())
    assert card["class_names"] == NAMES and card["image_size"] == 32 and card["round"] == ROUNDS
    assert card["run"] == str(job) and card["input"]["range"] == [0.0, 1.0]
    assert card["privacy"]["statement"].startswith("no formal privacy guarantee")
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, multirun.base / "pixels.pt")
    elsewhere = multirun.base / "elsewhere"
    elsewhere.mkdir()
    fresh = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS, str(out / "classifier.pt2"),
                            str(multirun.base / "pixels.pt"), str(multirun.base / "logits.pt")],
                           capture_output=True, text=True, timeout=300, cwd=elsewhere,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads(fresh.stdout.strip().splitlines()[-1]) == []  # nothing of this project was imported
    run = load_run_model(job)
    with torch.no_grad():
        expected = run.model.classify(pixels * 2 - 1)
    assert torch.allclose(torch.load(multirun.base / "logits.pt"), expected, atol=1e-5)


# ---------------------------------------------------------------- generate
def test_generate_writes_readable_images_per_class_and_provenance(multirun: Multirun) -> None:
    job, out = multirun.jobs[0], multirun.base / "synthetic"
    done = cli(["generate", str(job), "--per-class", "8", "--out", str(out)], cwd=multirun.base)
    assert done.returncode == 0, done.stderr
    for name in NAMES:
        files = sorted((out / name).iterdir())
        assert len(files) == 8
        for path in files:
            with Image.open(path) as image:
                image.load()
                assert image.size == (32, 32) and image.mode == "RGB"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["run"] == str(job) and provenance["round"] == ROUNDS and provenance["seed"] == 0
    assert provenance["counts"] == {c: {"drawn": 8, "accepted": 8, "written": 8} for c in NAMES}
    assert provenance["privacy"]["statement"].startswith("no formal privacy guarantee")
    assert provenance["privacy"]["guarantee"] is False
    check = cli(["data", "check", str(out), "--dataset", "imagefolder", "--set", "test_fraction=0"], cwd=multirun.base)
    assert check.returncode == 0, check.stderr
    assert [line.split() for line in check.stdout.splitlines() if line.startswith("total")] == [["total", "24"]]


def test_generate_selected_only_applies_the_confidence_rule_and_names_short_classes(multirun: Multirun) -> None:
    job = multirun.jobs[0]
    everything = cli(["generate", str(job), "--per-class", "3", "--selected-only", "--threshold", "0",
                      "--out", str(multirun.base / "all")], cwd=multirun.base)
    assert everything.returncode == 0, everything.stderr
    counts = json.loads((multirun.base / "all" / "provenance.json").read_text())["counts"]
    assert all(c["written"] == 3 for c in counts.values())
    nothing = cli(["generate", str(job), "--per-class", "3", "--selected-only", "--threshold", "1",
                   "--max-draws", "20", "--out", str(multirun.base / "none")], cwd=multirun.base)
    assert nothing.returncode == 1
    provenance = json.loads((multirun.base / "none" / "provenance.json").read_text())
    assert provenance["selection"]["confidence_threshold"] == 1.0
    assert all(c["drawn"] == 20 and c["written"] == c["accepted"] < 3 for c in provenance["counts"].values())
    assert all(f"class {c!r}: only" in nothing.stderr for c, n in provenance["counts"].items() if n["written"] < 3)


def test_real_vs_generated_puts_real_rows_beside_the_generators(multirun: Multirun) -> None:
    from simulations.experiments.real_vs_generated import real_rows

    rows = real_rows(multirun.images, tuple(NAMES), 3, 32)
    assert rows.shape == (3, 3, 32, 32, 3) and rows.dtype == np.uint8
    out = multirun.base / "figure.png"
    done = subprocess.run([sys.executable, "-m", "simulations.experiments.real_vs_generated", str(multirun.jobs[0]),
                           str(multirun.images), "--out", str(out), "--per-class", "3"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=multirun.base, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]  # 6 columns per class row
    short = subprocess.run([sys.executable, "-m", "simulations.experiments.real_vs_generated", str(multirun.jobs[0]),
                            str(multirun.images), "--out", str(out), "--per-class", "50"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=multirun.base, timeout=300)
    assert short.returncode != 0 and "need 50" in short.stderr
