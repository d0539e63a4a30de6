"""Privacy accounting through the real server loop and ClientApps (in-process grid): cumulative
epsilon per hospital, resume, lifetime ledger, budget stop, and the privacy report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from safetensors.torch import load_file

from client.app import app as client_app
from client.local_run import LOCAL_STATE
from common import protocol
from common.config import compose_config, plain_config
from common.model import GROUPS, build_model, model_preset
from common.privacy.budget import REAL_DATA_METRICS
from common.privacy.ledger import PrivacyLedger
from server.federation import run_federation
from simulations.cli import main as cli_main
from tests.fakes import InProcessGrid

K = 2  # DP steps per round (train.local_steps)
SMALL = [f"train.local_steps={K}", "train.batch_size=8", "data.train_per_site=32", "data.test_per_site=10",
         "train.selection.warmup_steps=2", "train.selection.min_history=2", "samples_per_class=1",
         "federation.evaluate_each_round=false", "privacy.enabled=true"]


def _run(folder: Path, overrides: list[str], resume: bool = False) -> tuple[InProcessGrid, dict]:
    run = plain_config(compose_config([*SMALL, *overrides]))
    run["output_dir"] = str(folder)
    run["resume"] = str(folder) if resume else None
    grid = InProcessGrid(client_app, int(run["federation"]["num_sites"]))  # fresh hospital processes
    run_federation(grid, run, folder)
    return grid, json.loads((folder / "summary.json").read_text())


def _opacus_epsilon(kind: str, sigma: float, q: float, steps: int, delta: float) -> float:
    """The same schedule through a fresh Opacus accountant, one step at a time."""
    accountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def _train(summary: dict, site: str) -> list[dict]:
    return [r["sites"][site]["train"] for r in summary["rounds"] if "train" in r["sites"].get(site, {})]


def test_epsilon_is_cumulative_matches_opacus_and_the_report_says_what_is_not_covered(tmp_path: Path) -> None:
    grid, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=3", "privacy.noise_multiplier=1.3",
                                    "privacy.max_grad_norm=0.8"])
    q, delta = 8 / 32, 1e-5
    for site in ("site-0", "site-1"):
        rounds = _train(summary, site)
        assert len(rounds) == 3
        eps = [m[protocol.DP_EPSILON] for m in rounds]
        for k, metrics in enumerate(rounds, start=1):
            assert metrics[protocol.DP_STEPS_ROUND] == K and metrics[protocol.DP_STEPS_TOTAL] == k * K
            assert metrics[protocol.DP_SAMPLE_RATE] == q and metrics[protocol.DP_NOISE_MULTIPLIER] == 1.3
            assert metrics[protocol.DP_DELTA] == delta < 1 / 32
            assert metrics[protocol.DP_EPSILON] == pytest.approx(_opacus_epsilon("rdp", 1.3, q, k * K, delta), rel=1e-9)
            assert metrics[protocol.DP_EPSILON_LIFETIME] == metrics[protocol.DP_EPSILON]
        assert all(a < b for a, b in itertools.pairwise(eps)), eps
    # The accountant history lives in context.state, the checkpoints and the ledger.
    for context in grid.contexts.values():
        history = context.state.array_records[LOCAL_STATE]["privacy.history"].numpy()
        np.testing.assert_array_equal(history, [[1.3, q, 3 * K]])
    saved = load_file(str(tmp_path / "sites" / "site-0" / "round-0003.safetensors"))
    assert saved["trainer/privacy.history"].tolist() == [[1.3, q, 3 * K]]
    ledger = PrivacyLedger.in_folder(tmp_path / "sites" / "site-1")
    (key,) = ledger.load()["datasets"]
    assert [(e["round"], e["steps"]) for e in ledger.entries(key)] == [(1, K), (2, K), (3, K)]

    # The report was written at the end of the run; regenerate it through the CLI too.
    for name in ("report.md", "report.json", "epsilon.png"):
        (tmp_path / "privacy" / name).unlink()
    assert cli_main(["privacy-report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())
    text = (tmp_path / "privacy" / "report.md").read_text()
    assert (tmp_path / "privacy" / "epsilon.png").stat().st_size > 1000
    assert set(report["sites"]) == {"site-0", "site-1"}
    for site in report["sites"].values():
        assert site["noise_multiplier"] == 1.3 and site["max_grad_norm"] == 0.8 and site["sample_rate"] == q
        assert site["delta"] == delta and site["accountant"] == "rdp" and site["steps_total"] == 3 * K
        assert site["epsilon"] == pytest.approx(_opacus_epsilon("rdp", 1.3, q, 3 * K, delta))
        assert site["epsilon_rdp"] == site["epsilon"]
        assert site["epsilon_prv"] == pytest.approx(_opacus_epsilon("prv", 1.3, q, 3 * K, delta))
        assert [r["round"] for r in site["rounds"]] == [1, 2, 3] and all(r["steps"] == K for r in site["rounds"])
        assert site["lifetime"]["steps_total"] == 3 * K and site["lifetime"]["epsilon"] == pytest.approx(site["epsilon"])
        assert site["covered_groups"] == ["classifier"]
        assert sorted(site["not_covered_groups"]) == ["discriminator", "generator"]
        assert site["end_to_end_guarantee"] is False and site["budget_exhausted"] is False
        assert "Poisson" in site["sampling"] and "add/remove" in site["neighbouring_relation"]
    assert "no end-to-end guarantee" in text.lower() and "privacy.scope=discriminator" in text
    assert "never added up across hospitals" in text
    assert "**discriminator**: trained on this hospital's real patches with ordinary, non-private gradients" in text


def test_a_resumed_run_continues_the_epsilon_curve(tmp_path: Path) -> None:
    overrides = ["federation.num_sites=1", "privacy.accountant=prv"]
    _, first = _run(tmp_path, [*overrides, "federation.rounds=2"])
    _, summary = _run(tmp_path, [*overrides, "federation.rounds=3"], resume=True)  # new processes, empty context
    eps = [m[protocol.DP_EPSILON] for m in _train(summary, "site-0")]
    assert eps[:2] == [m[protocol.DP_EPSILON] for m in _train(first, "site-0")]
    last = _train(summary, "site-0")[-1]
    assert last[protocol.DP_STEPS_TOTAL] == 3 * K
    assert eps[2] == pytest.approx(_opacus_epsilon("prv", 1.0, 8 / 32, 3 * K, 1e-5), rel=1e-6)
    assert eps[0] < eps[1] < eps[2]
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())["sites"]["site-0"]
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3] and report["steps_total"] == 3 * K


def test_epsilon_composes_across_runs_on_the_same_data_through_the_ledger(tmp_path: Path) -> None:
    shared = [f"privacy.ledger_dir={tmp_path / 'ledgers'}", "federation.num_sites=1", "federation.rounds=1"]
    _run(tmp_path / "a", shared)
    _, second = _run(tmp_path / "b", shared)
    metrics = _train(second, "site-0")[0]
    q = 8 / 32
    assert metrics[protocol.DP_EPSILON] == pytest.approx(_opacus_epsilon("rdp", 1.0, q, K, 1e-5))
    assert metrics[protocol.DP_STEPS_LIFETIME] == 2 * K
    assert metrics[protocol.DP_EPSILON_LIFETIME] == pytest.approx(_opacus_epsilon("rdp", 1.0, q, 2 * K, 1e-5))
    report = json.loads((tmp_path / "b" / "privacy" / "report.json").read_text())["sites"]["site-0"]
    assert report["steps_total"] == K and report["lifetime"]["steps_total"] == 2 * K
    assert report["lifetime"]["epsilon"] == pytest.approx(metrics[protocol.DP_EPSILON_LIFETIME])
    # By default each simulation keeps its ledgers inside its own run folder: nothing is shared.
    _, alone = _run(tmp_path / "c", ["federation.num_sites=1", "federation.rounds=1"])
    assert _train(alone, "site-0")[0][protocol.DP_STEPS_LIFETIME] == K


def test_the_budget_stop_keeps_every_hospital_within_max_epsilon(tmp_path: Path) -> None:
    # Quantity skew: site-0 has 52 patches (q = 8/52), site-1 28 (q = 8/28), so site-1 spends faster.
    limit = 4.5
    assert _opacus_epsilon("rdp", 1.0, 8 / 52, 3 * K, 1e-5) <= limit
    assert _opacus_epsilon("rdp", 1.0, 8 / 28, K, 1e-5) <= limit < _opacus_epsilon("rdp", 1.0, 8 / 28, 2 * K, 1e-5)
    _, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=3", "partition=quantity",
                                 "partition.alpha=2.0", "partition.min_size=8", "data.train_per_site=40",
                                 f"privacy.max_epsilon={limit}"])
    assert summary["completed_rounds"] == 3
    rounds = summary["rounds"]
    assert rounds[0]["sites"]["site-0"]["train"][protocol.DP_SAMPLE_RATE] == 8 / 52
    assert rounds[0]["sites"]["site-1"]["train"][protocol.DP_SAMPLE_RATE] == 8 / 28
    assert [len(_train({"rounds": [r]}, "site-0")) for r in rounds] == [1, 1, 1]
    assert [len(_train({"rounds": [r]}, "site-1")) for r in rounds] == [1, 0, 0]
    for entry in rounds[1:]:
        assert entry["aggregated"] is True
        assert [s["site"] for s in entry["budget_exhausted"]] == ["site-1"]
        stop = entry["budget_exhausted"][0]
        assert "budget exhausted" in stop["message"] and stop[protocol.DP_WOULD_BE_EPSILON] > limit
        assert any(e["site"] == "site-1" and "budget_exhausted" in e["reason"] for e in entry["excluded"])
    spent = [m[protocol.DP_EPSILON_LIFETIME] for r in rounds for m in
             [*(s.get("train", {}) for s in r["sites"].values()), *r["budget_exhausted"]] if protocol.DP_EPSILON_LIFETIME in m]
    assert len(spent) == 6 and max(spent) <= limit
    ledger = PrivacyLedger.in_folder(tmp_path / "sites" / "site-1")
    (key,) = ledger.load()["datasets"]
    assert [(e["round"], e["steps"]) for e in ledger.entries(key)] == [(1, K)]
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())["sites"]
    assert report["site-1"]["budget_exhausted"] is True and report["site-1"]["budget_exhausted_rounds"] == [2, 3]
    assert report["site-0"]["budget_exhausted"] is False
    assert all(site["lifetime"]["epsilon"] <= limit for site in report.values())
    assert "budget stop triggered | yes, rounds 2, 3" in (tmp_path / "privacy" / "report.md").read_text()


def test_discriminator_scope_covers_every_shared_group_and_closes_side_channels(tmp_path: Path) -> None:
    grid, summary = _run(tmp_path, ["federation.num_sites=1", "federation.rounds=1", "privacy.scope=discriminator"])
    metrics = _train(summary, "site-0")[0]
    assert not set(REAL_DATA_METRICS) & set(metrics)
    assert metrics["weight/cls_real"] == 1.0  # fixed loss weights
    reply = grid.replies[0]
    assert protocol.CLASS_COUNTS_JSON not in reply.content.config_records[protocol.SITE]
    reference = build_model(model_preset("tiny"), 5, seed=0).group_keys()
    for group in GROUPS:
        assert list(reply.content.array_records[group].keys()) == reference[group]
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())
    site = report["sites"]["site-0"]
    assert sorted(site["covered_groups"]) == sorted(GROUPS) and site["not_covered_groups"] == []
    assert site["end_to_end_guarantee"] is True
    assert site["side_channels"]["loss weights"].startswith("disabled")
    assert site["side_channels"]["class centroids"].startswith("disabled")
    assert "post-processing" in site["covered"]["generator"]
    assert torch.isfinite(torch.tensor(site["epsilon"]))
