"""Durable state: atomic writes, the locked append-only privacy ledger, per-run hospital state, and the
fall-back to the previous checkpoint or state file when the newest one is damaged."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
from pathlib import Path

import pytest

from client.app import app as client_app
from client.site_state import SiteStateStore
from common.config import compose_config, plain_config
from common.durable import atomic_write, atomic_write_with
from common.privacy.ledger import FILENAME, MARKER, LedgerError, PrivacyLedger
from server.federation import run_federation
from tests.fakes import InProcessGrid

K = 2
SMALL = ["federation.num_sites=1", f"train.local_steps={K}", "train.batch_size=8", "data.train_per_site=24",
         "data.test_per_site=8", "samples_per_class=1", "federation.evaluate_each_round=false"]


def _run(folder: Path, overrides: list[str], resume: bool = False) -> dict:
    run = plain_config(compose_config([*SMALL, *overrides]))
    run["output_dir"] = str(folder)
    run["resume"] = str(folder) if resume else None
    run_federation(InProcessGrid(client_app, int(run["federation"]["num_sites"])), run, folder)
    return json.loads((folder / "summary.json").read_text())


def _train(summary: dict, rnd: int) -> dict:
    (entry,) = [r for r in summary["rounds"] if r["round"] == rnd]
    return entry["sites"]["site-0"]["train"]


# ----------------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_behind(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write(target, "old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("new but incompl")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, half_then_crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    atomic_write(tmp_path / "secret.key", b"k", mode=0o600)
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- the ledger
def _append_attempts(path: str, count: int) -> None:
    ledger = PrivacyLedger(path)
    for _ in range(count):
        attempt = ledger.begin("data", {"dataset": "x"}, "sgd", "run", 1, 1.0, 0.1, 1)
        ledger.step(attempt, 1)
        ledger.end(attempt, 1)


def test_two_processes_appending_100_entries_each_leave_200(tmp_path: Path) -> None:
    path = str(tmp_path / FILENAME)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_attempts, args=(path, 100)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    attempts = PrivacyLedger(path).load().attempts["data"]
    assert len(attempts) == 200 and sorted(a.number for a in attempts) == list(range(1, 201))
    assert all(a.finished and a.steps == 1 for a in attempts)
    assert PrivacyLedger(path).history("data") == [(1.0, 0.1, 200)]


def test_an_attempt_cut_short_counts_the_steps_it_started_and_a_torn_line_is_cut_off(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    attempt = ledger.begin("data", {}, "sgd", "run", 1, 1.0, 0.25, 5)
    for step in (1, 2, 3):
        ledger.step(attempt, step)
    with open(ledger.path, "a") as handle:  # a writer killed in the middle of a line
        handle.write('{"type": "step", "dataset": "data", "att')
    (cut,) = ledger.load().attempts["data"]
    assert (cut.steps, cut.planned, cut.finished) == (3, 5, False)
    second = ledger.begin("data", {}, "sgd", "run", 2, 1.0, 0.25, 5)  # the torn line goes first
    ledger.end(second, 5)
    assert [(a.number, a.steps) for a in ledger.load().attempts["data"]] == [(1, 3), (2, 5)]
    assert ledger.history("data") == [(1.0, 0.25, 8)]


def test_a_deleted_or_rolled_back_ledger_stops_the_hospital(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dp = ["privacy.enabled=true"]
    _run(tmp_path, [*dp, "federation.rounds=1"])
    site = tmp_path / "sites" / "site-0"
    ledger = PrivacyLedger.in_folder(site)
    assert ledger.path.is_file() and (site / MARKER).is_file()
    backup = tmp_path / "ledger-after-round-1"
    shutil.copy(ledger.path, backup)
    ledger.path.unlink()
    with pytest.raises(LedgerError, match="existed .* and is gone"):
        ledger.load()
    summary = _run(tmp_path, [*dp, "federation.rounds=2"], resume=True)
    (excluded,) = summary["rounds"][-1]["excluded"]
    assert "LedgerError" in excluded["reason"] and str(tmp_path) not in excluded["reason"]
    assert any("is gone" in r.getMessage() for r in caplog.records)
    store = SiteStateStore.for_run(site, str(tmp_path), keep_last=2)
    assert store.rounds() == [1]  # nothing trained
    # Restored: the hospital trains round 3 (round 2 went by without it). Rolled back to that older
    # copy after round 3: round 4 is refused, as the local state remembers a later release.
    shutil.copy(backup, ledger.path)
    summary = _run(tmp_path, [*dp, "federation.rounds=3"], resume=True)
    assert _train(summary, 3)["dp/steps_total"] == 2 * K
    shutil.copy(backup, ledger.path)
    summary = _run(tmp_path, [*dp, "federation.rounds=4"], resume=True)
    assert "LedgerError" in summary["rounds"][-1]["excluded"][0]["reason"]
    assert any("rolled back to an older copy" in r.getMessage() for r in caplog.records)
    assert store.rounds() == [1, 3]


# ----------------------------------------------------------------------------- per-run state
def test_runs_sharing_a_state_dir_keep_separate_state_and_each_resumes_its_own(tmp_path: Path) -> None:
    shared = f"federation.state_dir={tmp_path / 'hospital-state'}"
    _run(tmp_path / "a", [shared, "federation.rounds=3"])
    store_a = SiteStateStore.for_run(tmp_path / "hospital-state" / "site-0", str(tmp_path / "a"), keep_last=2)
    before = {p.name: p.read_bytes() for p in store_a.folder.iterdir()}
    _run(tmp_path / "b", [shared, "federation.rounds=1"])
    summary = _run(tmp_path / "b", [shared, "federation.rounds=2"], resume=True)  # a fresh hospital process
    assert _train(summary, 2)["global_step"] == 2 * K  # B's own round-1 optimiser and step counter
    assert _train(summary, 2)["state/restored_round"] == 1
    store_b = SiteStateStore.for_run(tmp_path / "hospital-state" / "site-0", str(tmp_path / "b"), keep_last=2)
    assert store_a.folder != store_b.folder and store_b.rounds() == [1, 2]
    assert {p.name: p.read_bytes() for p in store_a.folder.iterdir()} == before  # A untouched, not pruned
    assert json.loads((store_b.folder / "run.json").read_text())["run"] == str(tmp_path / "b")


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def test_a_truncated_newest_state_file_or_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    _run(tmp_path, ["federation.rounds=2"])
    store = SiteStateStore.for_run(tmp_path / "sites" / "site-0", str(tmp_path), keep_last=2)
    _truncate(store.path(2))
    summary = _run(tmp_path, ["federation.rounds=3"], resume=True)
    metrics = _train(summary, 3)
    assert metrics["state/files_skipped"] == 1 and metrics["state/restored_round"] == 1
    assert metrics["global_step"] == 2 * K  # round 1's state plus this round
    _truncate(tmp_path / "checkpoints" / "round-0003.safetensors")
    summary = _run(tmp_path, ["federation.rounds=4"], resume=True)
    session = summary["sessions"][-1]
    assert session["resumed_after_round"] == 2
    assert any("round-0003.safetensors" in w for w in session["warnings"])
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "round-0004.safetensors").is_file()


def test_the_lifetime_is_the_union_of_the_ledger_and_the_local_state(tmp_path: Path) -> None:
    """A record the ledger lost but the hospital's local state remembers still counts (and once only)."""
    from common.privacy.budget import SitePrivacy

    ledger = PrivacyLedger.in_folder(tmp_path)
    attempts = []
    for rnd in (1, 2, 3):
        attempt = ledger.begin("data", {}, "sgd", "run-a", rnd, 1.0, 0.2, 4)
        attempts.append(ledger.end(attempt, 4))
    lines = ledger.path.read_text().splitlines(keepends=True)
    with pytest.raises(LedgerError, match="hash chain breaks"):  # a chained ledger that lost a record stops
        ledger._parse("".join(line for line in lines if '"attempt": 2' not in line))
    # A ledger written before the hash chain (no chain values, nothing in the marker) that lost a record:
    unchained = [json.dumps({k: v for k, v in json.loads(line).items() if k != "chain"}) + "\n" for line in lines]
    ledger.path.write_text("".join(line for line in unchained if '"attempt": 2' not in line))
    ledger.marker.unlink()
    assert ledger.history("data") == [(1.0, 0.2, 8)]
    privacy = SitePrivacy.open(ledger, "data", {}, "run-a", 4, attempts)
    assert [a.number for a in privacy.run] == [1, 2, 3] and privacy.from_state_only == 1
    assert SitePrivacy.dp_steps(privacy.lifetime) == 12
