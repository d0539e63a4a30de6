"""A hospital runs only the app code it pinned (issue 25 F1): the FAB's SHA-256 against app-sha256,
checked in Flower's ClientApp runtime before the FAB is installed; supernode.sh refuses to start
without a pin unless told --allow-any-app; `fedvitgan fab hash` prints what to pin."""

from __future__ import annotations

import hashlib
import importlib
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from client.app_pin import NODE_KEY, RUN_CLIENTAPP, AppNotApproved, check_fab, fab_hash_of, pin_clientapp_runtime
from simulations.cli import main as cli_main
from simulations.deployment import stage_app

ROOT = Path(__file__).resolve().parents[1]


def test_check_names_both_hashes_and_passes_the_pinned_fab() -> None:
    content = b"the reviewed release"
    pinned = hashlib.sha256(content).hexdigest()
    check_fab(content, pinned)
    check_fab(content, pinned.upper())  # a hash pasted in capitals is the same hash
    check_fab(b"anything", None)  # no pin: nothing to check (supernode.sh refuses that unless told)
    with pytest.raises(AppNotApproved) as refused:
        check_fab(b"an edited release", pinned)
    assert pinned in str(refused.value) and hashlib.sha256(b"an edited release").hexdigest() in str(refused.value)


def test_flowers_runtime_checks_the_fab_before_installing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = importlib.import_module(RUN_CLIENTAPP)
    installed: list[bytes] = []
    fab = SimpleNamespace(content=b"an edited release", hash_str="x")
    node_config = {NODE_KEY: hashlib.sha256(b"the reviewed release").hexdigest()}
    monkeypatch.setattr(runtime, "pull_task_input",
                        lambda client: ("message", SimpleNamespace(node_config=node_config), "run", fab))
    monkeypatch.setattr(runtime, "install_from_fab", lambda content, **kw: installed.append(content))
    monkeypatch.setattr(runtime, "_fedvitgan_pinned", False, raising=False)
    pin_clientapp_runtime()
    # What run_clientapp does, in its order: pull the task, then install the FAB (module globals).
    _, context, _, pulled = runtime.pull_task_input(None)
    with pytest.raises(AppNotApproved, match="nothing of it was installed"):
        runtime.install_from_fab(pulled.content, skip_prompt=True)
    assert installed == []
    fab.content = b"the reviewed release"
    runtime.pull_task_input(None)
    runtime.install_from_fab(fab.content, skip_prompt=True)
    assert installed == [b"the reviewed release"]


def test_an_edited_policy_changes_the_hash_a_hospital_pinned(tmp_path: Path) -> None:
    reviewed = stage_app(tmp_path / "reviewed")
    edited = stage_app(tmp_path / "edited")
    policy = edited / "client" / "policy.py"
    policy.write_text(policy.read_text().replace("if not policy.requires_privacy:\n        return",
                                                 "return  # the coordinator's edit"))
    assert fab_hash_of(reviewed) == fab_hash_of(stage_app(tmp_path / "again"))  # deterministic
    assert fab_hash_of(edited) != fab_hash_of(reviewed)


def test_fab_hash_prints_the_hash_of_a_folder_or_a_built_fab(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    app = stage_app(tmp_path / "app")
    assert cli_main(["fab", "hash", str(app)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == fab_hash_of(app) and len(printed) == 64
    fab = tmp_path / "built.fab"
    fab.write_bytes(b"\x50\x4b fab bytes")
    assert cli_main(["fab", "hash", str(fab)]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"\x50\x4b fab bytes").hexdigest()


def _supernode_sh(tmp_path: Path, node_config: str, *flags: str) -> subprocess.CompletedProcess:
    for name in ("ca.pem", "key"):
        (tmp_path / name).write_text("x")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FLWR_HOME": str(tmp_path / "flwr")}
    return subprocess.run(["bash", str(ROOT / "deploy" / "supernode.sh"), "127.0.0.1:1", str(tmp_path / "ca.pem"),
                           str(tmp_path / "key"), node_config, *flags], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_supernode_sh_refuses_to_start_without_a_pin(tmp_path: Path) -> None:
    done = _supernode_sh(tmp_path, 'site-id=0 site-name="hug"')
    assert done.returncode == 2 and "no app-sha256" in done.stderr and "--allow-any-app" in done.stderr
    # With --allow-any-app it goes on (and stops later: no fedvitgan on this PATH), saying what it gave up.
    done = _supernode_sh(tmp_path, 'site-id=0 site-name="hug"', "--allow-any-app")
    assert "runs whatever app the coordinator ships" in done.stderr and "no app-sha256" not in done.stderr
    pinned = _supernode_sh(tmp_path, 'site-id=0 site-name="hug" app-sha256="' + "0" * 64 + '"')
    assert "no app-sha256" not in pinned.stderr
