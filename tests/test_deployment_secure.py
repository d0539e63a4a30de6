"""SecAgg+ in a real Flower deployment on 127.0.0.1 (TLS, SuperNode authentication, ``flwr run``):
three hospitals, one round, warm SuperNodes (about a minute on 2 CPU cores).

The in-process tests (tests/test_secure_aggregation.py) check the arithmetic and the dropouts; this
one checks that the four stages travel through a SuperLink and SuperNodes (each stage one message per
hospital, its secrets kept in the ClientApp's context between them) and that what reached the
coordinator's run folder holds the secure round's record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from common.model import GROUPS
from simulations.deploy_loopback import LoopbackOptions, LoopbackResult, run_loopback
from simulations.deployment import FINISHED_COMPLETED, DeploymentError

pytestmark = pytest.mark.slow

SITES = 3


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> LoopbackResult:
    out = tmp_path_factory.mktemp("loopback-secure")
    options = LoopbackOptions(out / "deploy", rounds=1, sites=SITES, warm=True, secure_aggregation=True,
                              overrides=["federation.evaluate_each_round=false"], timeout_s=420)
    try:
        return run_loopback(options)
    except (DeploymentError, OSError) as error:
        logs = sorted((options.out / "logs").glob("*.log"))
        tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs)
        pytest.fail(f"loopback deployment failed: {error}\n{tails}")


def test_a_secure_round_completes_in_a_deployment(deployment: LoopbackResult) -> None:
    assert deployment.status == FINISHED_COMPLETED
    summary = json.loads((Path(deployment.run_dir) / "summary.json").read_text())
    assert summary["config"]["federation"]["secure_aggregation"] == "secaggplus"
    entry = summary["rounds"][0]
    assert entry["aggregated"] is True, entry.get("failure")
    log = entry["secure_aggregation"]
    assert sorted(log["participants"]) == [f"site-{i}" for i in range(SITES)] and log["dropouts"] == []
    assert set(log["bytes"]) == set(Stage.all())
    assert all(log["bytes"][stage]["from_sites"] > 0 for stage in Stage.all())
    assert all(entry["aggregation"][g]["secure_aggregation"] == "secaggplus" for g in GROUPS)
    # What came back is the masked vector: 8 bytes per value, twice the float32 instruction's payload.
    assert entry["bytes"]["train_from_sites"] > 1.9 * entry["bytes"]["train_to_sites"]
    assert "Secure aggregation (SecAgg+)" in (Path(deployment.run_dir) / "report.md").read_text()
