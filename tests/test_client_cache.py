"""Hospitals kept between messages (client/site_cache.py): reused while the run config stays,
rebuilt when it changes, bounded, dropped after a failure, and invisible in every result: weights,
local state and privacy ledger are bit for bit those of hospitals rebuilt for every message,
through a resumed run too. A hospital without privacy never imports Opacus."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from safetensors.torch import load_file

from client.app import app as client_app
from client.local_run import LocalRun
from client.site_cache import MIB, SITE_CACHE, CacheConfig, CachedSite, SiteCache
from common import protocol
from common.config import compose_config, plain_config
from common.model import GROUPS
from server.federation import run_federation
from tests.fakes import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.local_steps=2", "train.batch_size=8", "data.train_per_site=24", "data.test_per_site=10",
         "train.selection.warmup_steps=1", "train.selection.min_history=2", "samples_per_class=1",
         "federation.num_sites=2", "console.progress=off"]


def _run(folder: Path, overrides: list[str], resume: bool = False) -> None:
    run = plain_config(compose_config([*SMALL, *overrides]))
    run["output_dir"] = str(folder)
    run["resume"] = str(folder) if resume else None
    run_federation(InProcessGrid(client_app, 2), run, folder)  # a fresh Flower context per run, as after a restart


def _two_rounds_then_a_third_resumed(folder: Path, overrides: list[str]) -> list[int]:
    """Hospitals built during 2 rounds and during a resumed third (same process)."""
    before = SITE_CACHE.builds
    _run(folder, [*overrides, "federation.rounds=2"])
    after_two = SITE_CACHE.builds
    _run(folder, [*overrides, "federation.rounds=3"], resume=True)
    return [after_two - before, SITE_CACHE.builds - after_two]


def _files(folder: Path, pattern: str) -> dict[str, Path]:
    """Files by path, with the per-run folder a hospital's state lives in (named after the run's path) left out."""
    return {"/".join(p for p in path.relative_to(folder).parts if not p.startswith("run-")): path
            for path in folder.rglob(pattern)}


def _assert_same_files(a: Path, b: Path, pattern: str) -> int:
    """Every tensor of every matching safetensors file identical under ``a`` and ``b``; returns the count."""
    x_files, y_files = _files(a, pattern), _files(b, pattern)
    assert sorted(x_files) == sorted(y_files)
    for name, path in x_files.items():
        x, y = load_file(str(path)), load_file(str(y_files[name]))
        assert set(x) == set(y), name
        for key in x:
            assert torch.equal(x[key], y[key]), f"{name}: {key}"
    return len(x_files)


def _ledger(folder: Path) -> dict[str, list[dict]]:
    """Each hospital's ledger records, without the wall-clock times, the run folder's path and the
    hash chain (which covers both)."""
    ledgers = {}
    for path in sorted(folder.rglob("privacy-ledger.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for record in records:
            for stamp in ("recorded", "created", "chain"):
                record.pop(stamp, None)
            if "run" in record:
                record["run"] = "RUN"
        ledgers[str(path.relative_to(folder))] = records
    return ledgers


def test_kept_hospitals_are_reused_rebuilt_on_a_config_change_and_change_no_weight_or_local_state(tmp_path: Path) -> None:
    kept = _two_rounds_then_a_third_resumed(tmp_path / "kept", [])
    # 2 hospitals x (2 rounds x train + evaluate): each built once; the resumed run's config differs
    # (resume, federation.rounds), so each is built once more.
    assert kept == [2, 2]
    assert len(SITE_CACHE) == 2
    rebuilt = _two_rounds_then_a_third_resumed(tmp_path / "rebuilt", ["client.cache=false"])
    assert rebuilt == [0, 0]
    assert _assert_same_files(tmp_path / "kept" / "checkpoints", tmp_path / "rebuilt" / "checkpoints", "*.safetensors") == 3
    # The hospitals' local state (optimiser moments, loss weights, selection statistics, RNG).
    assert _assert_same_files(tmp_path / "kept" / "sites", tmp_path / "rebuilt" / "sites", "round-*.safetensors") >= 4


def test_kept_hospitals_leave_the_dp_weights_and_privacy_ledger_as_rebuilt_ones_do(tmp_path: Path) -> None:
    dp = ["privacy.enabled=true", "privacy.seed=3", "federation.evaluate_each_round=false"]
    assert _two_rounds_then_a_third_resumed(tmp_path / "kept", dp) == [2, 2]
    _two_rounds_then_a_third_resumed(tmp_path / "rebuilt", [*dp, "client.cache=false"])
    assert _assert_same_files(tmp_path / "kept" / "checkpoints", tmp_path / "rebuilt" / "checkpoints", "*.safetensors") == 3
    assert _assert_same_files(tmp_path / "kept" / "sites", tmp_path / "rebuilt" / "sites", "round-*.safetensors") >= 4
    kept, rebuilt = _ledger(tmp_path / "kept"), _ledger(tmp_path / "rebuilt")
    assert len(kept) == 2 and all(any(r["type"] == "step" for r in records) for records in kept.values())
    assert kept == rebuilt


def test_a_failed_message_drops_its_hospital(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tmp_path, ["federation.rounds=1"])
    assert len(SITE_CACHE) == 2

    def broken(self: LocalRun, *args: object) -> None:
        raise RuntimeError("the local training broke half-way")

    monkeypatch.setattr(LocalRun, "run_steps", broken)
    builds = SITE_CACHE.builds
    grid = InProcessGrid(client_app, 2)
    run = plain_config(compose_config([*SMALL, "federation.rounds=2", "federation.max_failed_rounds=1"]))
    run["output_dir"], run["resume"] = str(tmp_path), str(tmp_path)
    with pytest.raises(Exception, match="fewer than"):
        run_federation(grid, run, tmp_path)  # every train reply is an error: the run fails
    assert SITE_CACHE.builds > builds  # the resumed config built them ...
    assert len(SITE_CACHE) == 0  # ... and each failure dropped its hospital


def _instruction(folder: Path, overrides: list[str], kind: str = "train") -> Message:
    """A round-1 instruction without global groups: the hospital starts from its built weights."""
    run = plain_config(compose_config([*SMALL, *overrides]))
    run["output_dir"] = str(folder)
    config = ConfigRecord({protocol.SERVER_ROUND: 1, protocol.TRANSPORT_DTYPE: "float32",
                           protocol.RUN_CONFIG_JSON: json.dumps(run)})
    msg = Message(RecordDict({protocol.CONFIG: config}), dst_node_id=1, message_type=kind)
    msg.metadata._message_id = f"{kind}-{folder.name}"
    return msg


def _groups(reply: Message) -> dict[str, np.ndarray]:
    assert reply.content[protocol.SITE][protocol.STATUS] == "ok", reply.content[protocol.SITE]
    return {f"{g}/{k}": reply.content[g][k].numpy() for g in GROUPS for k in reply.content[g].keys()}


def test_a_repeated_message_starts_again_from_the_built_weights_not_the_last_trained_ones(tmp_path: Path) -> None:
    """A round's instruction delivered twice (a lost reply) trains the kept model from the weights it
    was built with, as a new hospital process would."""
    grid = InProcessGrid(client_app, 2)
    builds = SITE_CACHE.builds
    first = _groups(grid.answer(_instruction(tmp_path / "kept", [])))
    again = _groups(grid.answer(_instruction(tmp_path / "kept", [])))
    assert SITE_CACHE.builds - builds == 1
    fresh = _groups(InProcessGrid(client_app, 2).answer(_instruction(tmp_path / "rebuilt", ["client.cache=false"])))
    for key in first:
        assert np.array_equal(again[key], first[key]), key
        assert np.array_equal(fresh[key], first[key]), key


def _fake(nbytes: int) -> CachedSite:
    data = np.zeros(nbytes, np.uint8)
    return CachedSite(data=data, build_model=lambda _: None)  # type: ignore[arg-type]


def test_the_least_recently_used_hospitals_go_first_beyond_either_bound() -> None:
    cache = SiteCache()
    cache.config = CacheConfig(cache_sites=2, cache_mib=3)
    for site in "abc":
        cache.get(("run", site), "v1", lambda: _fake(MIB))
        cache.done(("run", site))
    assert ("run", "a") not in cache and len(cache) == 2  # 3 sites > 2: the oldest left
    assert cache.get(("run", "b"), "v1", lambda: _fake(MIB)) is not None and cache.builds == 3  # reused
    cache.done(("run", "b"))
    cache.get(("run", "d"), "v1", lambda: _fake(2 * MIB))
    cache.done(("run", "d"))
    # c, the least recently used, leaves for the count; b (1 MiB) and d (2 MiB) fit in 3 MiB.
    assert ("run", "c") not in cache and ("run", "b") in cache and ("run", "d") in cache
    cache.get(("run", "e"), "v1", lambda: _fake(4 * MIB))
    cache.done(("run", "e"))
    assert ("run", "b") not in cache and ("run", "d") not in cache and len(cache) == 1  # for memory
    assert cache.nbytes() == 4 * MIB  # the hospital in use stays, alone, even over the bound
    first = cache.get(("run", "e"), "v1", lambda: _fake(MIB))
    assert cache.get(("run", "e"), "v2", lambda: _fake(MIB)) is not first  # another config: built again
    assert cache.builds == 6


def test_a_round_without_privacy_imports_no_opacus_nor_matplotlib(tmp_path: Path) -> None:
    """In a fresh interpreter (other tests import Opacus): a train and an evaluate message without
    privacy, then one with privacy, which does import it (so the check can fail)."""
    script = textwrap.dedent(f"""
        import json, sys
        from flwr.app import ConfigRecord, Message, RecordDict
        from client.app import app
        from common import protocol
        from common.config import compose_config, plain_config
        from tests.fakes import InProcessGrid

        grid = InProcessGrid(app, 2)  # Flower's task identity, as its engine sets it

        def ask(kind, overrides):
            run = plain_config(compose_config({SMALL!r} + overrides))
            run["output_dir"] = {str(tmp_path)!r}
            config = ConfigRecord({{protocol.SERVER_ROUND: 1, protocol.TRANSPORT_DTYPE: "float32",
                                   protocol.RUN_CONFIG_JSON: json.dumps(run)}})
            msg = Message(RecordDict({{protocol.CONFIG: config}}), dst_node_id=1, message_type=kind)
            msg.metadata._message_id = kind + str(overrides)
            reply = grid.answer(msg)
            assert reply.content[protocol.SITE][protocol.STATUS] == "ok", reply.content[protocol.SITE]
            return sorted(m for m in ("opacus", "matplotlib") if m in sys.modules)

        print(json.dumps([ask("train", []), ask("evaluate", []),
                          ask("train", ["privacy.enabled=true", "privacy.seed=1"])]))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], [], ["opacus"]]


def test_with_the_cache_off_every_message_reads_its_data_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """client.cache=false keeps nothing between messages, the data set included."""
    import client.local_run as local_run

    loads: list[int] = []
    real_load = local_run.load_site_data

    def counting(*args: object, **kwargs: object) -> object:
        loads.append(1)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(local_run, "load_site_data", counting)
    grid = InProcessGrid(client_app, 2)
    for _ in range(2):
        _groups(grid.answer(_instruction(tmp_path / "off", ["client.cache=false"])))
    assert len(loads) == 2
    _groups(grid.answer(_instruction(tmp_path / "on", [])))
    _groups(grid.answer(_instruction(tmp_path / "on", [])))
    assert len(loads) == 3  # kept: read once for both messages
