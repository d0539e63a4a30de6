"""A real Flower deployment on 127.0.0.1: SuperLink with TLS + SuperNode authentication, two
hospitals, an unregistered SuperNode and one that trusts another CA (one deployment, ~2-4 min on
2 CPU cores: every ClientApp message starts a fresh process that imports torch).

Every process is started and stopped by ``simulations.deploy_loopback.run_loopback`` (by process
id, in a ``finally`` block, terminate then kill, descendants included); the last test checks that
none is left.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.model import GROUPS, build_model, model_preset
from simulations.deploy_loopback import (
    FOREIGN,
    INTRUDER,
    LoopbackOptions,
    LoopbackResult,
    received_train_messages,
    run_loopback,
    train_messages,
)
from simulations.deployment import (
    FINISHED_COMPLETED,
    PROJECT_ROOT,
    DeploymentError,
    flower_bin,
    flower_env,
    node_config_string,
)
from simulations.processes import still_running

pytestmark = pytest.mark.slow

ROUNDS = 2
SITES = ("site-0", "site-1")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> LoopbackResult:
    out = tmp_path_factory.mktemp("loopback")
    # Evaluation messages would double the ClientApp processes; the checks here need training only.
    options = LoopbackOptions(out / "deploy", rounds=ROUNDS, sites=len(SITES), with_intruders=True,
                              overrides=["federation.evaluate_each_round=false"], timeout_s=420)
    try:
        return run_loopback(options)
    except (DeploymentError, OSError) as error:  # every process is already stopped; show the logs
        logs = sorted((options.out / "logs").glob("*.log"))
        tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs)
        pytest.fail(f"loopback deployment failed: {error}\n{tails}")


def _log(result: LoopbackResult, name: str) -> str:
    return Path(result.processes[name].log).read_text(errors="replace")


def _summary(result: LoopbackResult) -> dict:
    return json.loads((Path(result.run_dir) / "summary.json").read_text())


def test_two_rounds_complete_over_tls_with_supernode_authentication(deployment: LoopbackResult) -> None:
    assert deployment.status == FINISHED_COMPLETED
    summary = _summary(deployment)
    assert summary["completed_rounds"] == ROUNDS
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    for record in summary["rounds"]:
        assert sorted(record["sites"]) == list(SITES) and record["aggregated"] and not record["excluded"]
    superlink_log = _log(deployment, "SuperLink")
    command = deployment.processes["SuperLink"].command  # what deploy/superlink.sh exec'd
    assert Path(command[1]).name == "flower-superlink", command
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--database"):
        assert flag in command
    assert "--insecure" not in command
    assert f"Uvicorn running on https://127.0.0.1:{deployment.superlink_port}" in superlink_log
    for site in SITES:
        node_command = deployment.processes[f"SuperNode {site}"].command
        assert Path(node_command[1]).name == "flower-supernode", node_command
        assert "--root-certificates" in node_command and "--auth-supernode-private-key" in node_command
        assert "--insecure" not in node_command
        assert f"Activated node_id={deployment.node_ids[site]}" in superlink_log
    run_dir = Path(deployment.run_dir)
    assert (run_dir / "samples" / f"round-{ROUNDS:03d}.png").is_file()
    assert f"[round {ROUNDS}/{ROUNDS}]" in (run_dir / "flwr-log.txt").read_text()
    assert f"| {ROUNDS} |" in (run_dir / "report.md").read_text() and (run_dir / "curves.png").is_file()


def test_global_model_after_round_two_differs_in_every_group(deployment: LoopbackResult) -> None:
    checkpoints = Path(deployment.run_dir) / "checkpoints"
    initial = build_model(model_preset("tiny"), 5, seed=0).state_dict()  # the run's seed is 0
    first = load_file(str(checkpoints / "round-0001.safetensors"))
    final = load_file(str(checkpoints / f"round-{ROUNDS:04d}.safetensors"))
    assert set(final) == set(initial)
    for group in GROUPS:
        keys = [k for k in initial if k.startswith(group + ".")]
        assert keys, group
        assert any(not torch.equal(final[k], initial[k]) for k in keys), f"{group} never left the initial model"
        assert any(not torch.equal(final[k], first[k]) for k in keys), f"{group} did not change in round {ROUNDS}"
        assert all(torch.isfinite(final[k]).all() for k in keys)


def test_unregistered_supernode_is_refused_and_the_run_completes_without_it(deployment: LoopbackResult) -> None:
    report = deployment.processes[f"SuperNode {INTRUDER}"]
    assert report.exited_by_itself and report.exit_code != 0
    log = _log(deployment, f"SuperNode {INTRUDER}")
    assert "Failed to activate SuperNode" in log and "Exit Code: 305" in log
    assert "No SuperNode found with the given public key" in _log(deployment, "SuperLink")
    assert deployment.status == FINISHED_COMPLETED
    assert all(sorted(r["sites"]) == list(SITES) for r in _summary(deployment)["rounds"])


def test_supernode_trusting_another_ca_cannot_connect(deployment: LoopbackResult) -> None:
    report = deployment.processes[f"SuperNode {FOREIGN}"]
    assert report.exited_by_itself and report.exit_code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in _log(deployment, f"SuperNode {FOREIGN}")
    # Its key was registered, so only TLS kept it out: the SuperLink never activated it.
    assert f"Activated node_id={deployment.node_ids[FOREIGN]}" not in _log(deployment, "SuperLink")


def test_a_warm_supernode_forks_its_clientapps_from_one_warm_process(deployment: LoopbackResult,
                                                                      tmp_path: Path) -> None:
    """``deploy/supernode.sh --warm``: the same run completes, no ``flwr-clientapp`` process starts."""
    options = LoopbackOptions(tmp_path / "warm", rounds=1, sites=1, local_steps=2, warm=True, timeout_s=300)
    try:
        warm = run_loopback(options)
    except (DeploymentError, OSError) as error:
        logs = sorted((options.out / "logs").glob("*.log"))
        pytest.fail(f"warm loopback deployment failed: {error}\n"
                    + "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs))
    summary = _summary(warm)
    assert warm.status == FINISHED_COMPLETED and summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1] and set(summary["rounds"][0]["sites"]) == {"site-0"}
    warm_log, cold_log = _log(warm, "SuperNode site-0"), _log(deployment, "SuperNode site-0")
    assert "fedvitgan superexec: fork server ready" in warm_log
    assert "fedvitgan supernode: polling the SuperLink every 1 s when idle" in warm_log
    assert "Start `flwr-clientapp` process" not in warm_log and "Start `flwr-clientapp` process" not in cold_log
    assert "fedvitgan superexec: cold" in cold_log  # cold too: every task passes the app-sha256 check
    assert warm.pids_left_running == [] and still_running({r.pid: None for r in warm.processes.values()}) == []


def test_an_app_edited_after_the_hospitals_review_is_refused_before_it_runs(tmp_path: Path) -> None:
    """F1: the coordinator edits client/policy.py; every hospital pinned the reviewed app's hash."""
    options = LoopbackOptions(tmp_path / "tampered", rounds=1, sites=1, local_steps=2, tampered_app=True,
                              overrides=["federation.max_failed_rounds=1", "federation.evaluate_each_round=false"],
                              timeout_s=300)
    with pytest.raises(DeploymentError):
        run_loopback(options)  # the run fails: its one round has no valid reply
    log = (options.out / "logs" / "site-0.log").read_text(errors="replace")
    assert "this hospital runs only the app it approved" in log
    assert not list((options.out / "hospitals" / "site-0" / "state").rglob("round-*.safetensors"))  # nothing trained
    summary = json.loads((options.out / "run" / "summary.json").read_text())
    (excluded,) = summary["rounds"][0]["excluded"]  # a Flower error reply: no site name, the node's id
    assert excluded["phase"] == "train" and "AppNotApproved" in excluded["reason"]
    assert "this hospital runs only the app it approved" in excluded["reason"]


def test_every_started_process_is_stopped(deployment: LoopbackResult) -> None:
    assert deployment.pids_left_running == []
    pids = {r.pid: None for r in deployment.processes.values()}
    assert still_running(pids) == []
    recorded = json.loads((Path(deployment.out) / "deployment.json").read_text())
    assert recorded["status"] == FINISHED_COMPLETED and recorded["error"] is None


# ----------------------------------------------------------------------------- docs and scripts
def _help(command: list[str], flwr_home: Path) -> str:
    env = flower_env(flwr_home)
    done = subprocess.run([*command, "--help"], check=False, capture_output=True, text=True, env=env,
                          timeout=120, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL)
    return done.stdout + done.stderr


def test_documented_flags_exist_in_the_installed_flower(tmp_path: Path) -> None:
    """Every ``--flag`` in docs/deployment.md and deploy/*.sh is one the installed tools print."""
    commands = [
        [flower_bin("flower-superlink")], [flower_bin("flower-supernode")], [flower_bin("flower-superexec")],
        [flower_bin("flwr-clientapp")], [flower_bin("flwr"), "run"], [flower_bin("flwr"), "supernode", "register"],
        [flower_bin("flwr"), "log"], [flower_bin("flwr"), "list"], [sys.executable, "-m", "simulations.cli", "certs"],
        [sys.executable, "-m", "simulations.cli", "data", "check"],
        [sys.executable, "-m", "simulations.deploy_loopback"], [sys.executable, "-m", "simulations.cli", "superexec"],
        [sys.executable, "-m", "simulations.cli", "supernode"],
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = "\n".join(pool.map(lambda c: _help(c, tmp_path), commands))
    known = set(re.findall(r"--[a-z][a-z0-9-]+", helps))
    texts = [PROJECT_ROOT / "docs" / "deployment.md", *sorted((PROJECT_ROOT / "deploy").glob("*.sh"))]
    for path in texts:
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", path.read_text()))
        unknown = sorted(used - known - {"--help", "--format"})
        assert not unknown, f"{path} uses flags the installed tools do not list: {unknown}"


def test_node_config_strings_are_what_flower_parses() -> None:
    from flwr.common.config import parse_config_args

    config = {"site-id": 1, "num-sites": 3, "site-name": "hug", "data-root": "/data/my pcam", "device": "cuda:0"}
    assert parse_config_args([node_config_string(config)]) == config


def test_a_train_message_the_supernode_ignored_is_not_counted_as_received(tmp_path: Path) -> None:
    # As Flower 1.42's SuperNode logs it after a SuperLink restart: the dead run's round-2 message
    # arrives and is ignored (the run stopped while its receipt was confirmed: it was stored, so a
    # ClientApp may still train on it); the resumed run's round-2 message is confirmed.
    log = tmp_path / "site-0.log"
    log.write_text("\n".join([
        "INFO :      [RUN 11, ROUND 1]", "INFO :      Receiving: train message (ID: aa01)",
        "INFO :      Received successfully",
        "INFO :      [RUN 11, ROUND 2]", "INFO :      Receiving: train message (ID: bb02)",
        "INFO :      Run ID 11 is not in `RUNNING` status. Ignoring message bb02.",
        "INFO :      [RUN 12, ROUND 2]", "INFO :      Receiving: train message (ID: cc03)",
        "INFO :      [RUN 12, ROUND 3]", "INFO :      Receiving: evaluate message (ID: dd04)",
        "INFO :      Received successfully",
    ]) + "\n")
    assert received_train_messages(log) == 2
    assert received_train_messages(log, 2) == 1
    assert received_train_messages(log, 1) == 1
    assert [(m.round, m.message_id, m.confirmed, m.ignored) for m in train_messages(log)] == [
        (1, "aa01", True, False), (2, "bb02", False, True), (2, "cc03", False, False)]
    assert received_train_messages(tmp_path / "missing.log") == 0
