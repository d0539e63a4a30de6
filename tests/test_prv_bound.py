"""PRV accounting that no coordinator value can make unbounded, and a report that says when no
hospital trained."""

from __future__ import annotations

import json
import tracemalloc
import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy import accounting
from common.privacy.accounting import PRV_MAX_MIB, epsilon, epsilons, noise_for_target, prv_grid_points, prv_mib
from common.privacy.report import NO_DP_STEPS, build_report, render_markdown


def _opacus(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = PRVAccountant() if kind == "prv" else RDPAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def test_the_grid_estimate_is_opacus_own_and_bounds_the_memory_it_takes() -> None:
    history = [(1.0, 0.05, 500), (1.2, 1.0, 1)]
    tracemalloc.start()
    _opacus("prv", history, 1e-5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert 1e5 < prv_grid_points(history, 1e-5) < 1e6
    assert peak / 2**20 <= prv_mib(history, 1e-5) <= 3 * peak / 2**20  # an upper estimate, not a wild one


def test_a_computable_history_gets_opacus_prv_exactly() -> None:
    history = [(1.0, 0.05, 500)]
    assert epsilons(history, 1e-5) == {"rdp": pytest.approx(_opacus("rdp", history, 1e-5)),
                                       "prv": pytest.approx(_opacus("prv", history, 1e-5))}


def test_weak_noise_is_not_computed_by_prv_and_rdp_stands_in_never_below_it() -> None:
    history = [(0.05, 0.05, 500)]  # about 1.3e9 grid points: tens of GiB in Opacus' PRV
    assert prv_mib(history, 1e-5) > 100 * PRV_MAX_MIB
    tracemalloc.start()
    both = epsilons(history, 1e-5)
    judged = epsilon(history, 1e-5, "prv")  # what a budget check with accountant=prv uses
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert both["prv"] is None and judged == both["rdp"] == pytest.approx(_opacus("rdp", history, 1e-5))
    assert peak < 64 * 2**20


def test_the_prv_noise_search_is_bounded_and_reaches_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    sigma = noise_for_target(3.0, 1e-5, 0.05, 500, "prv")
    assert _opacus("prv", [(sigma, 0.05, 500)], 1e-5) <= 3.0
    assert 3.0 - _opacus("prv", [(sigma, 0.05, 500)], 1e-5) < 0.02
    monkeypatch.setattr(accounting, "PRV_MAX_MIB", 0)  # nothing computable: RDP only, never less noise
    accounting._epsilon.cache_clear()
    noise_for_target.cache_clear()
    try:
        assert noise_for_target(3.0, 1e-5, 0.05, 500, "prv") >= sigma
    finally:
        accounting._epsilon.cache_clear()
        noise_for_target.cache_clear()


def test_a_dp_run_where_no_hospital_trained_says_so_plainly(tmp_path) -> None:  # noqa: ANN001
    config = {"privacy": {"enabled": True}}
    (tmp_path / "summary.json").write_text(json.dumps({"config": config, "rounds": [
        {"round": 1, "sites": {}, "excluded": [{"site": "site-0", "reason": "refused"}]}]}))
    report = build_report(tmp_path)
    assert report["enabled"] and report["sites"] == {}
    assert NO_DP_STEPS in render_markdown(report)
