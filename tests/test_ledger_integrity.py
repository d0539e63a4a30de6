"""The privacy ledger is tamper-evident (hash chain + the marker's count and head), keyed by the data
folder rather than its name, and checks the budget under the same lock as it records a release
(issue 25 F4, F6, F7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.privacy.accounting import build_plan, epsilon
from common.privacy.budget import BudgetExhausted, SitePrivacy
from common.privacy.config import PrivacyConfig
from common.privacy.ledger import LedgerError, PrivacyLedger, dataset_fingerprint


def _three_attempts(ledger: PrivacyLedger, dataset: str = "data") -> None:
    for rnd in (1, 2, 3):
        ledger.end(ledger.begin(dataset, {}, "sgd", "run-a", rnd, 1.0, 0.2, 4), 4)


def test_an_emptied_ledger_stops_every_later_run(tmp_path: Path) -> None:
    _three_attempts(PrivacyLedger.in_folder(tmp_path))
    (tmp_path / "privacy-ledger.jsonl").write_text("")
    later = PrivacyLedger.in_folder(tmp_path)  # a new process, a new run
    with pytest.raises(LedgerError, match="no longer extends .* found 0 records"):
        later.load()
    with pytest.raises(LedgerError, match="no longer extends"):
        later.begin("data", {}, "sgd", "run-b", 1, 1.0, 0.2, 4)


def test_a_ledger_rolled_back_to_an_older_copy_stops_a_new_run(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    ledger.end(ledger.begin("data", {}, "sgd", "run-a", 1, 1.0, 0.2, 4), 4)
    shutil.copy(ledger.path, tmp_path / "backup")
    ledger.end(ledger.begin("data", {}, "sgd", "run-a", 2, 1.0, 0.2, 4), 4)
    shutil.copy(tmp_path / "backup", ledger.path)
    with pytest.raises(LedgerError, match="rolled back to an older copy"):
        PrivacyLedger.in_folder(tmp_path).load()


def test_a_record_edited_in_the_middle_breaks_the_chain(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    _three_attempts(ledger)
    lines = ledger.path.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if '"attempt": 2' in line and '"type": "attempt"' in line)
    record = json.loads(lines[index])
    record["noise_multiplier"] = 100.0  # a cheaper release on paper; its chain value left as it was
    lines[index] = json.dumps(record) + "\n"
    ledger.path.write_text("".join(lines))
    with pytest.raises(LedgerError, match="hash chain breaks"):
        ledger.load()


def test_a_crash_between_the_append_and_the_marker_update_is_not_tampering(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    ledger.end(ledger.begin("data", {}, "sgd", "run-a", 1, 1.0, 0.2, 4), 4)
    marker_before = ledger.marker.read_text()
    ledger.end(ledger.begin("data", {}, "sgd", "run-a", 2, 1.0, 0.2, 4), 4)
    ledger.marker.write_text(marker_before)  # the marker missed the last appends
    assert ledger.history("data") == [(1.0, 0.2, 8)]  # the longer ledger extends what the marker saw
    ledger.end(ledger.begin("data", {}, "sgd", "run-a", 3, 1.0, 0.2, 4), 4)
    assert ledger.history("data") == [(1.0, 0.2, 12)]


def test_the_same_folder_under_another_name_shares_one_budget(tmp_path: Path) -> None:
    root = tmp_path / "patches"
    nct, _ = dataset_fingerprint({"name": "nct_crc", "root": str(root)}, 0, 0)
    folder, _ = dataset_fingerprint({"name": "imagefolder", "root": str(root) + "/"}, 0, 0)
    other, _ = dataset_fingerprint({"name": "nct_crc", "root": str(tmp_path / "elsewhere")}, 0, 0)
    assert nct == folder != other


def test_releases_under_an_older_name_keyed_entry_count_towards_the_folder(tmp_path: Path) -> None:
    # Ledgers written before this change keyed a data set by its name and folder.
    ledger = PrivacyLedger.in_folder(tmp_path / "state")
    description = {"dataset": "nct_crc", "root": str((tmp_path / "patches").resolve())}
    old_key = "0123456789abcdef"
    ledger.end(ledger.begin(old_key, description, "sgd", "old-run", 1, 1.0, 0.2, 50), 50)
    key, renamed = dataset_fingerprint({"name": "imagefolder", "root": str(tmp_path / "patches")}, 0, 0)
    privacy = SitePrivacy.open(ledger, key, renamed, "new-run", 1, [])
    assert SitePrivacy.dp_steps(privacy.lifetime) == 50


def test_two_processes_cannot_both_pass_the_budget_check(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_folder(tmp_path)
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0)
    plan = build_plan(cfg, 1000, 1000, 10, 50, 10)
    one = epsilon([plan.next_round()], plan.delta, "rdp")
    two = epsilon([(plan.noise_multiplier, plan.sample_rate, 100)], plan.delta, "rdp")
    budget = (one + two) / 2  # room for one round, not two
    first = SitePrivacy.open(ledger, "data", {}, "run-a", 1, [])
    second = SitePrivacy.open(ledger, "data", {}, "run-b", 1, [])  # opened before the first trains
    for privacy in (first, second):
        privacy.plan = build_plan(cfg, 1000, 1000, 10, 50, 10, max_epsilon=budget)
        assert not privacy.check_budget().exhausted  # both pass the early check
    first.finish_training(first.begin_training(), 50)
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
        second.begin_training()  # checked again under the lock, on the ledger as it stands
    assert ledger.history("data") == [(1.0, plan.sample_rate, 50)]  # the second recorded nothing
