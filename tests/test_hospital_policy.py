"""A deployed hospital against a hostile or careless coordinator: its own privacy floor and paths win,
every refusal names the key and trains nothing, repeated rounds never repeat the noise."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app as client_app
from common import protocol
from common.config import compose_config, plain_config
from common.model import GROUPS, build_model, model_preset
from common.privacy.accounting import epsilon
from common.privacy.ledger import FILENAME, PrivacyLedger
from common.records import to_arrayrecord
from tests.fakes import InProcessGrid

BASE = ["federation.num_sites=1", "train.local_steps=2", "train.batch_size=8", "data.train_per_site=24",
        "data.test_per_site=8", "train.selection.warmup_steps=2", "privacy.enabled=true"]
FLOOR = {"privacy-required": True, "privacy-scope": "classifier", "min-noise-multiplier": 1.0, "max-grad-norm": 1.0}


def _run(tmp: Path, overrides: list[str]) -> dict[str, Any]:
    other_data = any(o.startswith("data=") for o in overrides)  # the synthetic set's keys do not apply
    run = plain_config(compose_config([*(o for o in BASE if not (other_data and o.startswith("data."))), *overrides]))
    run["output_dir"] = str(tmp / "coordinator" / "run")
    return run


def _hospital(tmp: Path, **node: Any) -> Context:
    config = {"site-id": 0, "num-sites": 1, "site-name": "hug", "state-dir": str(tmp / "hospital"), **node}
    return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})


def _train(context: Context, run: dict[str, Any], rnd: int = 1, weights: dict[str, torch.Tensor] | None = None) -> Message:
    """One train message to the hospital (as the coordinator's strategy sends it); its reply."""
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: rnd, protocol.TRANSPORT_DTYPE: "float32",
                                                        protocol.RUN_CONFIG_JSON: json.dumps(run)})})
    for group in GROUPS if weights is not None else ():
        content[group] = to_arrayrecord({k: v for k, v in weights.items() if k.startswith(group + ".")}, "float32")
    grid = InProcessGrid(client_app, 1, contexts={1: context})
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", 1, str(rnd))])
    return reply


def _site(reply: Message) -> ConfigRecord:
    return reply.content.config_records[protocol.SITE]


def _assert_refused(reply: Message, key: str, tmp: Path) -> None:
    site = _site(reply)
    assert site[protocol.STATUS] == protocol.STATUS_REFUSED, dict(site)
    assert str(site[protocol.STATUS_MESSAGE]).startswith(f"{key}: refused by this hospital"), site[protocol.STATUS_MESSAGE]
    assert str(tmp) not in str(site[protocol.STATUS_MESSAGE])  # names the key, never the hospital's paths
    assert not any(g in reply.content.array_records for g in GROUPS)  # nothing trained, nothing sent


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "hospital-data"
    (root / "train" / "a").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path)  # a link out of the data folder
    return root


COORDINATOR_OVERRIDES = {
    "seed": (["privacy.seed=1"], "privacy.seed"),
    "DP off": (["privacy.enabled=false"], "privacy.enabled"),
    "ledger_dir": (["privacy.ledger_dir=/tmp/empty-ledgers"], "privacy.ledger_dir"),
    "state_dir": (["federation.state_dir=/tmp/elsewhere"], "federation.state_dir"),
    "less noise": (["privacy.noise_multiplier=0.5"], "privacy.noise_multiplier"),
    "larger clipping": (["privacy.max_grad_norm=4.0"], "privacy.max_grad_norm"),
    "less count noise": (["privacy.count_noise_std=0.5"], "privacy.count_noise_std"),
    "cache_dir": (["data=pathmnist", "data.cache_dir=/tmp/cache"], "data.cache_dir"),
    "data.root when none is pinned": (["data=pcam", "data.root=/srv/other-hospital"], "data.root"),
    "absolute split": (["data=imagefolder", "data.splits.train=/"], "data.splits.train"),
    "split with ..": (["data=imagefolder", "data.splits.train=../.."], "data.splits.train"),
    "split through a link": (["data=imagefolder", "data.splits.train=escape"], "data.splits.train"),
}


@pytest.mark.parametrize("case", sorted(COORDINATOR_OVERRIDES))
def test_each_coordinator_override_is_refused_naming_the_key(tmp_path: Path, data_root: Path, case: str) -> None:
    overrides, key = COORDINATOR_OVERRIDES[case]
    pinned = {"data-root": str(data_root)} if "imagefolder" in " ".join(overrides) else {}
    context = _hospital(tmp_path, **FLOOR, **pinned)
    reply = _train(context, _run(tmp_path, overrides))
    _assert_refused(reply, key, tmp_path)
    assert not (tmp_path / "hospital" / "hug" / FILENAME).exists()  # no release, no ledger entry
    assert not list((tmp_path / "hospital").rglob("round-*.safetensors"))


def test_the_same_hospital_trains_a_run_within_its_policy_and_a_simulation_may_set_the_test_keys(tmp_path: Path) -> None:
    reply = _train(_hospital(tmp_path, **FLOOR), _run(tmp_path, ["privacy.noise_multiplier=1.5"]))
    assert _site(reply)[protocol.STATUS] == "ok" and all(g in reply.content.array_records for g in GROUPS)
    assert (tmp_path / "hospital" / "hug" / FILENAME).is_file()
    # In a simulation (no site-id: one person runs both sides) the seed and folders may come from the run.
    simulated = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                        run_config={})
    run = _run(tmp_path, ["privacy.seed=1", f"privacy.ledger_dir={tmp_path / 'ledgers'}",
                          f"federation.state_dir={tmp_path / 'sim-state'}"])
    assert _site(_train(simulated, run))[protocol.STATUS] == "ok"
    assert (tmp_path / "ledgers" / "site-0" / FILENAME).is_file()


def test_a_stricter_scope_and_a_derived_noise_below_the_floor_are_refused(tmp_path: Path) -> None:
    strict = _hospital(tmp_path, **{"privacy-scope": "discriminator"})
    _assert_refused(_train(strict, _run(tmp_path, ["privacy.scope=classifier"])), "privacy.scope", tmp_path)
    _assert_refused(_train(strict, _run(tmp_path, ["privacy.scope=classifier", "privacy.enabled=false"])),
                    "privacy.enabled", tmp_path)  # any floor implies DP
    floor = _hospital(tmp_path, **{"min-noise-multiplier": 2.0, "privacy-scope": "classifier"})
    reply = _train(floor, _run(tmp_path, ["privacy.noise_multiplier=null", "privacy.target_epsilon=50"]))
    _assert_refused(reply, "privacy.target_epsilon", tmp_path)
    content = PrivacyLedger.in_folder(tmp_path / "hospital" / "hug").load()
    assert all(a.kind == "counts" for attempts in content.attempts.values() for a in attempts)  # no training step
    weak_centre = _run(tmp_path, ["privacy.noise_multiplier=3.0", "privacy.centre_noise_multiplier=1.0"])
    _assert_refused(_train(floor, weak_centre), "privacy.centre_noise_multiplier", tmp_path)


def test_a_derived_noise_keeps_the_runs_epsilon_within_the_target_count_release_included(tmp_path: Path) -> None:
    """privacy.target_epsilon is this run's epsilon: the count release the first round makes is part
    of it, so the noise derived for the planned steps leaves room for it (one round planned here)."""
    run = _run(tmp_path, ["federation.rounds=1", "privacy.noise_multiplier=null", "privacy.target_epsilon=3"])
    reply = _train(_hospital(tmp_path), run)
    assert _site(reply)[protocol.STATUS] == "ok", dict(_site(reply))
    metrics = reply.content.metric_records[protocol.METRICS]
    assert int(metrics[protocol.DP_STEPS_TOTAL]) == 2 and float(metrics[protocol.DP_COUNT_NOISE_STD]) == 10.0
    assert 2.97 <= float(metrics[protocol.DP_EPSILON]) <= 3.0
    dp_alone = [(float(metrics[protocol.DP_NOISE_MULTIPLIER]), float(metrics[protocol.DP_SAMPLE_RATE]), 2)]
    # the count release's share is left out of the DP-SGD steps' epsilon
    assert epsilon(dp_alone, float(metrics[protocol.DP_DELTA]), "rdp") < float(metrics[protocol.DP_EPSILON]) - 0.03


def test_privacy_required_without_a_scope_means_the_whole_discriminator(tmp_path: Path) -> None:
    required = _hospital(tmp_path, **{"privacy-required": True})
    reply = _train(required, _run(tmp_path, ["privacy.scope=classifier", "privacy.noise_multiplier=1.0"]))
    _assert_refused(reply, "privacy.scope", tmp_path)
    assert "names no privacy-scope" in str(_site(reply)[protocol.STATUS_MESSAGE])
    assert not reply.content.array_records  # nothing sent
    ok = _train(required, _run(tmp_path, ["privacy.scope=discriminator", "privacy.noise_multiplier=1.0"]))
    assert _site(ok)[protocol.STATUS] == "ok"


def test_a_misspelt_policy_key_is_an_error_not_silently_ignored(tmp_path: Path) -> None:
    reply = _train(_hospital(tmp_path, max_epsilon=1.0), _run(tmp_path, []))
    assert _site(reply)[protocol.STATUS] == "data_error"
    assert "'max_epsilon'" in str(_site(reply)[protocol.STATUS_MESSAGE]) and "not known" in str(_site(reply)[protocol.STATUS_MESSAGE])


def test_max_epsilon_null_from_the_coordinator_does_not_lift_the_hospitals_own_budget(tmp_path: Path) -> None:
    run = _run(tmp_path, ["privacy.max_epsilon=null"])
    first = _train(_hospital(tmp_path, **{"max-epsilon": 1e6, "privacy-scope": "classifier"}), run)
    metrics = first.content.metric_records[protocol.METRICS]
    history = list(zip(metrics[protocol.DP_HISTORY_NOISE], metrics[protocol.DP_HISTORY_RATE],
                       [int(s) for s in metrics[protocol.DP_HISTORY_STEPS]]))
    q, delta = float(metrics[protocol.DP_SAMPLE_RATE]), float(metrics[protocol.DP_DELTA])
    spent = epsilon(history, delta, "rdp")
    would_be = epsilon([*history, (1.0, q, 2)], delta, "rdp")
    limit = (spent + would_be) / 2  # enough for the round trained, not for another
    second = _train(_hospital(tmp_path, **{"max-epsilon": limit, "privacy-scope": "classifier"}), run, rnd=2)
    site = _site(second)
    assert site[protocol.STATUS] == protocol.STATUS_BUDGET_EXHAUSTED
    assert "max-epsilon" in str(site[protocol.STATUS_MESSAGE]) and "privacy.max_epsilon is null" in str(site[protocol.STATUS_MESSAGE])
    stopped = second.content.metric_records[protocol.METRICS]
    assert math.isclose(float(stopped[protocol.DP_MAX_EPSILON]), limit)
    assert float(stopped[protocol.DP_EPSILON_LIFETIME]) <= limit < float(stopped[protocol.DP_WOULD_BE_EPSILON])
    ledger = PrivacyLedger.in_folder(tmp_path / "hospital" / "hug").load()
    assert [a.round for attempts in ledger.attempts.values() for a in attempts if a.kind == "sgd"] == [1]


class _RecordingDP:
    """Wraps DPTraining to record, per training attempt, the first noise values it will draw."""

    draws: list[torch.Tensor] = []

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from common.privacy.wiring import DPTraining

        dp = DPTraining(*args, **kwargs)
        probe = torch.Generator().set_state(dp.noise_rng.get_state())
        cls.draws.append(torch.normal(0.0, 1.0, size=(8,), generator=probe))
        return dp


@pytest.mark.parametrize("mode", ["deployed", "seeded simulation"])
def test_two_train_messages_for_the_same_round_draw_different_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     mode: str) -> None:
    monkeypatch.setattr("client.private_round.DPTraining", _RecordingDP)
    _RecordingDP.draws = []
    weights = build_model(model_preset("tiny"), 5, seed=0).state_dict()
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
    if mode == "deployed":
        context, run = _hospital(tmp_path), _run(tmp_path, [])
    else:  # privacy.seed: reproducible, yet the attempt number (kept in the ledger) changes every draw
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                          state=RecordDict(), run_config={})
        run = _run(tmp_path, ["privacy.seed=3"])
    for state in (weights, other):  # the same round twice, with other global weights
        assert _site(_train(context, run, rnd=1, weights=state))[protocol.STATUS] == "ok"
    first, second = _RecordingDP.draws
    assert not torch.equal(first, second)
    folder = tmp_path / "hospital" / "hug" if mode == "deployed" else tmp_path / "coordinator" / "run" / "sites" / "site-0"
    content = PrivacyLedger.in_folder(folder).load()
    (attempts,) = content.attempts.values()
    assert [(a.kind, a.round, a.number) for a in attempts] == [("counts", 1, 1), ("sgd", 1, 2), ("sgd", 1, 3)]


def test_a_count_release_with_almost_no_noise_is_refused_before_anything_is_released(tmp_path: Path) -> None:
    # F3: std 1e-6 used to reveal the exact training-set size, then record epsilon 1e12.
    hospital = _hospital(tmp_path, **{"max-epsilon": 8.0, "privacy-scope": "classifier"})
    reply = _train(hospital, _run(tmp_path, ["privacy.count_noise_std=1e-6", "privacy.noise_multiplier=1.0"]))
    _assert_refused(reply, "privacy.count_noise_std", tmp_path)
    assert "floor of 1" in str(_site(reply)[protocol.STATUS_MESSAGE])
    assert not (tmp_path / "hospital" / "hug" / FILENAME).is_file()  # no ledger, nothing released


def test_a_count_release_the_budget_cannot_pay_for_is_not_made(tmp_path: Path) -> None:
    # A hospital that lowered its count-noise floor: the budget is checked before the release.
    hospital = _hospital(tmp_path, **{"max-epsilon": 1.0, "privacy-scope": "classifier",
                                      "min-count-noise-multiplier": 1e-9})
    reply = _train(hospital, _run(tmp_path, ["privacy.count_noise_std=0.01", "privacy.noise_multiplier=1.0"]))
    site = _site(reply)
    assert site[protocol.STATUS] == protocol.STATUS_BUDGET_EXHAUSTED, dict(site)
    assert "before the count release" in str(site[protocol.STATUS_MESSAGE])
    metrics = reply.content.metric_records[protocol.METRICS]
    assert float(metrics[protocol.DP_WOULD_BE_EPSILON]) > 1.0 and protocol.REAL_EXAMPLES not in metrics
    ledger = tmp_path / "hospital" / "hug" / FILENAME
    assert not ledger.is_file() or not any(PrivacyLedger.in_folder(ledger.parent).load().attempts.values())


@pytest.mark.parametrize("node, expected", [({}, 1e-5), ({"max-delta": 1e-7}, 1e-7)])
def test_the_hospital_judges_epsilon_at_its_own_delta(tmp_path: Path, node: dict, expected: float) -> None:
    # F5: a coordinator's delta of 9.99e-4 bought a max-epsilon=8 hospital 1,952 steps instead of 1,171.
    hospital = _hospital(tmp_path, **{"max-epsilon": 50.0, "privacy-scope": "classifier", **node})
    reply = _train(hospital, _run(tmp_path, ["privacy.delta=9.99e-4", "privacy.noise_multiplier=1.0"]))
    assert _site(reply)[protocol.STATUS] == "ok", dict(_site(reply))
    metrics = reply.content.metric_records[protocol.METRICS]
    assert float(metrics[protocol.DP_DELTA]) == pytest.approx(min(expected, 0.1 / float(metrics[protocol.REAL_EXAMPLES]))
                                                              if not node else expected)
    history = list(zip(metrics[protocol.DP_HISTORY_NOISE], metrics[protocol.DP_HISTORY_RATE],
                       [int(s) for s in metrics[protocol.DP_HISTORY_STEPS]]))
    assert float(metrics[protocol.DP_EPSILON]) == pytest.approx(epsilon(history, float(metrics[protocol.DP_DELTA]), "rdp"))
    assert float(metrics[protocol.DP_EPSILON]) > epsilon(history, 9.99e-4, "rdp")  # never the coordinator's delta


def _evaluate(context: Context, run: dict[str, Any], rnd: int = 1) -> Message:
    """One evaluate message to the hospital; its reply."""
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: rnd, protocol.TRANSPORT_DTYPE: "float32",
                                                        protocol.RUN_CONFIG_JSON: json.dumps(run)})})
    grid = InProcessGrid(client_app, 1, contexts={1: context})
    (reply,) = grid.send_and_receive([grid.create_message(content, "evaluate", 1, str(rnd))])
    return reply


def test_evaluation_passes_the_same_privacy_policy_as_training(tmp_path: Path) -> None:
    required = _hospital(tmp_path, **{"privacy-required": True})
    _assert_refused(_evaluate(required, _run(tmp_path, ["privacy.enabled=false"])), "privacy.enabled", tmp_path)


def test_score_histograms_finer_than_the_hospital_allows_are_refused(tmp_path: Path) -> None:
    # F2: 100,000 bins return every held-out patch's class probability to 1e-5.
    hospital = _hospital(tmp_path)
    _assert_refused(_evaluate(hospital, _run(tmp_path, ["privacy.enabled=false", "federation.score_bins=100000"])),
                    "federation.score_bins", tmp_path)
    ok = _evaluate(_hospital(tmp_path, **{"max-score-bins": 200000}),
                   _run(tmp_path, ["privacy.enabled=false", "federation.score_bins=100000"]))
    assert _site(ok)[protocol.STATUS] == "ok"  # the hospital may allow more itself


def test_a_deployed_hospital_evaluates_on_its_own_held_out_split(tmp_path: Path) -> None:
    hospital = _hospital(tmp_path)
    reply = _evaluate(hospital, _run(tmp_path, ["privacy.enabled=false", "+data.test_split=elsewhere"]))
    _assert_refused(reply, "data.test_split", tmp_path)
    assert "its own held-out split" in str(_site(reply)[protocol.STATUS_MESSAGE])
    reply = _evaluate(hospital, _run(tmp_path, ["privacy.enabled=false", "+data.test_split=train"]))
    _assert_refused(reply, "data.test_split", tmp_path)
    reply = _train(hospital, _run(tmp_path, ["privacy.enabled=false", "+data.test_split=train"]))
    _assert_refused(reply, "data.test_split", tmp_path)  # training under such a run is refused too


def test_evaluating_with_another_data_configuration_than_training_is_refused(tmp_path: Path) -> None:
    hospital = _hospital(tmp_path)
    assert _site(_train(hospital, _run(tmp_path, ["privacy.enabled=false"])))[protocol.STATUS] == "ok"
    assert _site(_evaluate(hospital, _run(tmp_path, ["privacy.enabled=false"])))[protocol.STATUS] == "ok"
    changed = _run(tmp_path, ["privacy.enabled=false", "data.stain_shift=0.5"])
    _assert_refused(_evaluate(hospital, changed), "data", tmp_path)


def test_a_held_out_split_that_overlaps_the_training_split_is_refused(tmp_path: Path) -> None:
    from client.paths import check_held_out
    from client.policy import Refusal
    from tests.data_fixtures import data_section

    base = data_section("imagefolder", tmp_path)
    check_held_out({**base, "splits": {"train": "train", "test": "test"}})
    for test_at in ("train", "train/held", "."):
        with pytest.raises(Refusal, match="data.splits.test"):
            check_held_out({**base, "splits": {"train": "train", "test": test_at}})
    with pytest.raises(Refusal, match="data.test_split"):
        check_held_out({**base, "test_split": "train", "splits": {"train": "train"}})
