"""The privacy statement of generated data and of the exported classifier follows the run's DP scope."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.app import app as client_app
from common.config import compose_config, plain_config
from common.privacy.reference_cost import ReferenceCost
from common.privacy.report import build_report, render_markdown
from server.federation import run_federation
from simulations.export import main as export_main
from simulations.generate import main as generate_main
from tests.fakes import InProcessGrid

SMALL = ["train.local_steps=2", "train.batch_size=8", "data.train_per_site=32", "data.test_per_site=10",
         "samples_per_class=1", "federation.evaluate_each_round=false", "federation.num_sites=2", "federation.rounds=1"]


def _run(folder: Path, overrides: list[str]) -> None:
    run = plain_config(compose_config([*SMALL, *overrides]))
    run["output_dir"] = str(folder)
    run_federation(InProcessGrid(client_app, 2), run, folder)


@pytest.mark.parametrize("scope", ["discriminator", "classifier"])
def test_generated_data_and_exported_classifier_say_what_privacy_covers(tmp_path: Path, scope: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _run(run, ["privacy.enabled=true", f"privacy.scope={scope}"])
    # The report quotes the reference cost of the same method and scope (here a stand-in reference, at
    # this run's own epsilon: the run's epsilon moves with the hospitals' noised example counts). A unified
    # run at the defaults trains its classifier on generated images: so was the row it is quoted.
    run_epsilon = max(site["epsilon"] for site in build_report(run)["sites"].values())
    monkeypatch.setattr("common.privacy.report.load_reference", lambda: {
        "source": "a stand-in reference",
        "rows": [ReferenceCost("unified", scope, run_epsilon, 0.6, 0.7, 3),  # not trained on them: another recipe
                 ReferenceCost("unified", scope, run_epsilon, 0.5, 0.7, 3, generated_images=True),
                 ReferenceCost("supervised", scope, run_epsilon, 0.1, 0.7, 3)]})
    report = build_report(run)
    assert "a stand-in reference" in report["accuracy_cost"] and "**20.0 points lost to DP**" in report["accuracy_cost"]
    assert report["accuracy_cost"] in render_markdown(report)
    epsilons = {name: site["epsilon"] for name, site in report["sites"].items()}
    assert set(epsilons) == {"site-0", "site-1"} and all(e > 0 for e in epsilons.values())
    assert generate_main([str(run), "--per-class", "2", "--out", str(tmp_path / "gen")]) == 0
    assert export_main([str(run), "--out", str(tmp_path / "deploy")]) == 0
    generated = json.loads((tmp_path / "gen" / "provenance.json").read_text())["privacy"]
    classifier = json.loads((tmp_path / "deploy" / "model.json").read_text())["privacy"]
    for privacy in (generated, classifier):
        assert privacy["differential_privacy"] is True and privacy["scope"] == scope
        assert {k: v["epsilon"] for k, v in privacy["epsilon_per_hospital"].items()} == epsilons
        assert privacy["epsilons_are_added_across_hospitals"] is False
    if scope == "discriminator":
        assert generated["guarantee"] is True and classifier["guarantee"] is True
        assert generated["statement"].startswith("differentially private by post-processing only")
        assert "no formal privacy guarantee" not in generated["statement"]
    else:
        assert generated["guarantee"] is False and classifier["guarantee"] is False
        assert generated["statement"].startswith("no formal privacy guarantee")
        assert classifier["statement"].startswith("no formal privacy guarantee")


def test_without_dp_there_is_no_formal_guarantee(tmp_path: Path) -> None:
    _run(tmp_path, [])
    assert generate_main([str(tmp_path), "--per-class", "1", "--out", str(tmp_path / "gen")]) == 0
    privacy = json.loads((tmp_path / "gen" / "provenance.json").read_text())["privacy"]
    assert privacy["guarantee"] is False and privacy["differential_privacy"] is False and privacy["scope"] is None
    assert privacy["statement"].startswith("no formal privacy guarantee") and privacy["epsilon_per_hospital"] == {}
