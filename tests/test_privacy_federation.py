"""Privacy accounting through the real server loop and ClientApps (in-process grid): the count
release, cumulative epsilon per hospital, resume, lifetime ledger, budget stop, and the report."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from safetensors.torch import load_file

from client.app import app as client_app
from client.local_run import LOCAL_META
from client.site_state import SiteStateStore
from common import protocol
from common.config import compose_config, plain_config
from common.model import GROUPS, build_model, model_preset, split_groups
from common.privacy.accounting import noisy_counts
from common.privacy.budget import REAL_DATA_METRICS
from common.privacy.ledger import PrivacyLedger, dataset_fingerprint
from common.privacy.wiring import attempt_seed
from common.records import unpack
from server.federation import run_federation
from simulations.cli import main as cli_main
from tests.fakes import InProcessGrid

K = 2  # DP steps per round (train.local_steps)
COUNT_SIGMA = 10.0 / math.sqrt(2)  # the count release: noise std 10 (default), L2 sensitivity sqrt(2)
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


def _opacus_epsilon(kind: str, schedule: list[tuple[float, float, int]], delta: float) -> float:
    """The same schedule through a fresh Opacus accountant, one step at a time."""
    accountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for sigma, q, steps in schedule:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def _train(summary: dict, site: str) -> list[dict]:
    return [r["sites"][site]["train"] for r in summary["rounds"] if "train" in r["sites"].get(site, {})]


def _released(site_id: int, privacy_seed: int, n: int, labelled: int, std: float = 10.0) -> tuple[int, int]:
    """The counts a synthetic hospital releases in the seeded mode (its first ledger attempt)."""
    key, _ = dataset_fingerprint({"name": "synthetic", "root": None}, site_id, 0)
    seed = attempt_seed(privacy_seed, key, 1, f"site-{site_id}")
    return noisy_counts(n, labelled, std, torch.Generator().manual_seed(seed))


def test_epsilon_is_cumulative_matches_opacus_and_the_report_says_what_is_not_covered(tmp_path: Path) -> None:
    grid, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=3", "privacy.noise_multiplier=1.3",
                                    "privacy.max_grad_norm=0.8"])
    for site in ("site-0", "site-1"):
        rounds = _train(summary, site)
        assert len(rounds) == 3
        released = rounds[0][protocol.REAL_EXAMPLES]  # the noisy count, never the exact 32 by construction
        q, delta = min(1.0, 8 / released), min(1e-5, 0.1 / released)
        eps = [m[protocol.DP_EPSILON] for m in rounds]
        for k, metrics in enumerate(rounds, start=1):
            assert metrics[protocol.REAL_EXAMPLES] == released and metrics[protocol.LABELLED_EXAMPLES] <= released
            assert metrics[protocol.DP_STEPS_ROUND] == K and metrics[protocol.DP_STEPS_TOTAL] == k * K
            assert metrics[protocol.DP_SAMPLE_RATE] == q and metrics[protocol.DP_NOISE_MULTIPLIER] == 1.3
            assert metrics[protocol.DP_DELTA] == delta
            assert metrics[protocol.DP_COUNT_NOISE_STD] == 10.0
            schedule = [(COUNT_SIGMA, 1.0, 1), (1.3, q, k * K)]
            assert metrics[protocol.DP_EPSILON] == pytest.approx(_opacus_epsilon("rdp", schedule, delta), rel=1e-9)
            assert metrics[protocol.DP_EPSILON_LIFETIME] == metrics[protocol.DP_EPSILON]
        assert all(a < b for a, b in itertools.pairwise(eps)), eps
    # This run's releases live in the ledger and, as a second record, in the local state.
    for context in grid.contexts.values():
        meta = json.loads(str(context.state.config_records[LOCAL_META]["meta-json"]))
        assert [(a["kind"], a["steps"]) for a in meta["dp_attempts"]] == [("counts", 1), ("sgd", K), ("sgd", K), ("sgd", K)]
    store = SiteStateStore.for_run(tmp_path / "sites" / "site-0", str(tmp_path), keep_last=2)
    assert not any(k.startswith("trainer/privacy.") for k in load_file(str(store.path(3))))  # no RNG state kept
    ledger = PrivacyLedger.in_folder(tmp_path / "sites" / "site-1")
    content = ledger.load()
    (key,) = content.attempts
    assert [(a.kind, a.round, a.steps, a.finished) for a in content.attempts[key]] == [
        ("counts", 1, 1, True), ("sgd", 1, K, True), ("sgd", 2, K, True), ("sgd", 3, K, True)]

    # The report was written at the end of the run; regenerate it through the CLI too.
    for name in ("report.md", "report.json", "epsilon.png"):
        (tmp_path / "privacy" / name).unlink()
    assert cli_main(["privacy-report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())
    text = (tmp_path / "privacy" / "report.md").read_text()
    assert (tmp_path / "privacy" / "epsilon.png").stat().st_size > 1000
    assert set(report["sites"]) == {"site-0", "site-1"}
    for name, site in report["sites"].items():
        released = _train(summary, name)[0][protocol.REAL_EXAMPLES]
        q, delta = min(1.0, 8 / released), min(1e-5, 0.1 / released)
        schedule = [(COUNT_SIGMA, 1.0, 1), (1.3, q, 3 * K)]
        assert site["noise_multiplier"] == 1.3 and site["max_grad_norm"] == 0.8 and site["sample_rate"] == q
        assert site["delta"] == delta and site["accountant"] == "rdp" and site["steps_total"] == 3 * K
        assert site["epsilon"] == pytest.approx(_opacus_epsilon("rdp", schedule, delta))
        assert site["epsilon_rdp"] == site["epsilon"]
        assert site["epsilon_prv"] == pytest.approx(_opacus_epsilon("prv", schedule, delta))
        assert [r["round"] for r in site["rounds"]] == [1, 2, 3] and all(r["steps"] == K for r in site["rounds"])
        assert site["lifetime"]["steps_total"] == 3 * K and site["lifetime"]["epsilon"] == pytest.approx(site["epsilon"])
        assert site["lifetime"]["this_run"] == {"steps_total": 3 * K, "attempts": 3, "interrupted_attempts": 0}
        assert site["count_release"]["noise_std"] == 10.0 and site["count_release"]["released_examples"] == released
        assert site["covered_groups"] == ["classifier"]
        assert sorted(site["not_covered_groups"]) == ["discriminator", "generator"]
        assert site["end_to_end_guarantee"] is False and site["budget_exhausted"] is False
        assert "Poisson" in site["sampling"] and "add/remove" in site["neighbouring_relation"]
        assert "Gaussian noise" in site["neighbouring_relation"]
    assert "no end-to-end guarantee" in text.lower() and "privacy.scope=discriminator" in text
    assert "never added up across hospitals" in text and "| count release | Gaussian mechanism" in text
    assert "**discriminator**: trained on this hospital's real patches with ordinary, non-private gradients" in text


def test_a_resumed_run_continues_the_epsilon_curve(tmp_path: Path) -> None:
    overrides = ["federation.num_sites=1", "privacy.accountant=prv"]
    _, first = _run(tmp_path, [*overrides, "federation.rounds=2"])
    _, summary = _run(tmp_path, [*overrides, "federation.rounds=3"], resume=True)  # new processes, empty context
    eps = [m[protocol.DP_EPSILON] for m in _train(summary, "site-0")]
    assert eps[:2] == [m[protocol.DP_EPSILON] for m in _train(first, "site-0")]
    last = _train(summary, "site-0")[-1]
    assert last[protocol.DP_STEPS_TOTAL] == 3 * K
    released = last[protocol.REAL_EXAMPLES]  # released once, in round 1, and reused after the resume
    assert released == _train(first, "site-0")[0][protocol.REAL_EXAMPLES]
    q, delta = min(1.0, 8 / released), min(1e-5, 0.1 / released)
    assert eps[2] == pytest.approx(_opacus_epsilon("prv", [(COUNT_SIGMA, 1.0, 1), (1.0, q, 3 * K)], delta), rel=1e-6)
    assert eps[0] < eps[1] < eps[2]
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())["sites"]["site-0"]
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3] and report["steps_total"] == 3 * K


def test_epsilon_composes_across_runs_on_the_same_data_through_the_ledger(tmp_path: Path) -> None:
    shared = [f"privacy.ledger_dir={tmp_path / 'ledgers'}", "federation.num_sites=1", "federation.rounds=1"]
    _, first = _run(tmp_path / "a", shared)
    _, second = _run(tmp_path / "b", shared)
    metrics = _train(second, "site-0")[0]
    released = metrics[protocol.REAL_EXAMPLES]
    assert released == _train(first, "site-0")[0][protocol.REAL_EXAMPLES]  # run b reuses run a's count release
    q, delta = min(1.0, 8 / released), min(1e-5, 0.1 / released)
    assert protocol.DP_COUNT_NOISE_STD not in metrics  # no new count release in run b
    assert metrics[protocol.DP_EPSILON] == pytest.approx(_opacus_epsilon("rdp", [(1.0, q, K)], delta))
    assert metrics[protocol.DP_STEPS_LIFETIME] == 2 * K
    lifetime = [(COUNT_SIGMA, 1.0, 1), (1.0, q, 2 * K)]
    assert metrics[protocol.DP_EPSILON_LIFETIME] == pytest.approx(_opacus_epsilon("rdp", lifetime, delta))
    report = json.loads((tmp_path / "b" / "privacy" / "report.json").read_text())["sites"]["site-0"]
    assert report["steps_total"] == K and report["lifetime"]["steps_total"] == 2 * K
    assert report["lifetime"]["epsilon"] == pytest.approx(metrics[protocol.DP_EPSILON_LIFETIME])
    assert report["count_release"] is None and "made in an earlier run" in (tmp_path / "b" / "privacy" / "report.md").read_text()
    # By default each simulation keeps its ledgers inside its own run folder: nothing is shared.
    _, alone = _run(tmp_path / "c", ["federation.num_sites=1", "federation.rounds=1"])
    assert _train(alone, "site-0")[0][protocol.DP_STEPS_LIFETIME] == K


def test_the_budget_stop_keeps_each_hospital_within_its_own_stricter_max_epsilon(tmp_path: Path) -> None:
    # The run sets no budget (privacy.max_epsilon=null); site-1's own policy sets one that allows one
    # round and not two. Seeded mode, so the released counts (and so q) are known in advance.
    released, _ = _released(1, privacy_seed=11, n=32, labelled=32)
    q, delta = min(1.0, 8 / released), min(1e-5, 0.1 / released)
    one = _opacus_epsilon("rdp", [(COUNT_SIGMA, 1.0, 1), (1.0, q, K)], delta)
    two = _opacus_epsilon("rdp", [(COUNT_SIGMA, 1.0, 1), (1.0, q, 2 * K)], delta)
    limit = (one + two) / 2
    _, summary = _run(tmp_path, ["federation.num_sites=2", "federation.rounds=3", "privacy.seed=11",
                                 f"+sites.site-1.policy.max_epsilon={limit}", "+sites.site-1.policy.privacy_scope=classifier"])
    assert summary["completed_rounds"] == 3
    rounds = summary["rounds"]
    assert rounds[0]["sites"]["site-1"]["train"][protocol.REAL_EXAMPLES] == released
    assert [len(_train({"rounds": [r]}, "site-0")) for r in rounds] == [1, 1, 1]  # no budget of its own
    assert [len(_train({"rounds": [r]}, "site-1")) for r in rounds] == [1, 0, 0]
    for entry in rounds[1:]:
        assert entry["aggregated"] is True
        assert [s["site"] for s in entry["budget_exhausted"]] == ["site-1"]
        stop = entry["budget_exhausted"][0]
        assert "budget exhausted" in stop["message"] and stop[protocol.DP_WOULD_BE_EPSILON] > limit
        assert "max-epsilon" in stop["message"] and "privacy.max_epsilon is null" in stop["message"]
        assert any(e["site"] == "site-1" and "budget_exhausted" in e["reason"] for e in entry["excluded"])
    spent = [m[protocol.DP_EPSILON_LIFETIME] for r in rounds for m in
             [r["sites"].get("site-1", {}).get("train", {}), *r["budget_exhausted"]] if protocol.DP_EPSILON_LIFETIME in m]
    assert len(spent) == 3 and max(spent) <= limit
    content = PrivacyLedger.in_folder(tmp_path / "sites" / "site-1").load()
    (key,) = content.attempts
    assert [(a.kind, a.round, a.steps) for a in content.attempts[key]] == [("counts", 1, 1), ("sgd", 1, K)]
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())["sites"]
    assert report["site-1"]["budget_exhausted"] is True and report["site-1"]["budget_exhausted_rounds"] == [2, 3]
    assert report["site-0"]["budget_exhausted"] is False
    assert report["site-1"]["lifetime"]["epsilon"] <= limit
    assert "budget stop triggered | yes, rounds 2, 3" in (tmp_path / "privacy" / "report.md").read_text()
    assert "NO privacy guarantee" in (tmp_path / "privacy" / "report.md").read_text()  # privacy.seed is set


def test_a_seeded_dp_run_resumed_for_a_third_round_equals_three_rounds_straight(tmp_path: Path) -> None:
    """Reproducible simulation mode: each attempt's noise follows from privacy.seed and the attempt
    number in the ledger, so a resume that repeats no round reproduces the straight run."""
    overrides = ["federation.num_sites=1", "privacy.seed=5"]
    _run(tmp_path / "straight", [*overrides, "federation.rounds=3"])
    _run(tmp_path / "stopped", [*overrides, "federation.rounds=2"])
    _run(tmp_path / "stopped", [*overrides, "federation.rounds=3"], resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "round-0003.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "checkpoints" / "round-0003.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_discriminator_scope_covers_every_shared_group_and_closes_side_channels(tmp_path: Path) -> None:
    grid, summary = _run(tmp_path, ["federation.num_sites=1", "federation.rounds=1", "privacy.scope=discriminator"])
    metrics = _train(summary, "site-0")[0]
    assert not set(REAL_DATA_METRICS) & set(metrics)
    weights = {k: v for k, v in metrics.items() if k.startswith("weight/")}
    assert weights and set(weights.values()) == {1.0}  # fixed loss weights (trainer-level check: test_privacy_mechanism)
    reply = grid.replies[0]
    assert protocol.CLASS_COUNTS_JSON not in reply.content.config_records[protocol.SITE]
    reference = split_groups(build_model(model_preset("tiny"), 5, seed=0).state_dict())
    for group in GROUPS:
        assert list(unpack(reply.content.array_records[group], reference[group], "float32")) == list(reference[group])
    report = json.loads((tmp_path / "privacy" / "report.json").read_text())
    site = report["sites"]["site-0"]
    assert sorted(site["covered_groups"]) == sorted(GROUPS) and site["not_covered_groups"] == []
    assert site["end_to_end_guarantee"] is True
    assert site["side_channels"]["loss weights"].startswith("disabled")
    assert site["side_channels"]["class centroids"].startswith("disabled")
    assert "post-processing" in site["covered"]["generator"]
    assert torch.isfinite(torch.tensor(site["epsilon"]))
