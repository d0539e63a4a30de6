"""Experiment procedures are registered: a new one is its function and one registration."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.config import ConfigError, compose_config, plain_config
from simulations.experiments import procedures, variants
from simulations.experiments.inprocess import CurvePoint
from simulations.experiments.procedures import Job, JobResult, Procedure, procedure_names, register_procedure
from simulations.experiments.runner import run_experiment

TOY = [
    "data.train_per_site=20", "data.test_per_site=10", "data.labeled_per_class=2", "data.val_fraction=0.0",
    "federation.num_sites=2", "experiment.workers=1", "experiment.steps=4", "experiment.eval_every=2", "experiment.rounds=2",
    "experiment.seeds=[0]", "experiment.settings=[centralized,local]",
    "experiment.setting_variants.local=[guess]", "experiment.setting_variants.federated=[guess]",
]


def constant_guess(job: Job) -> JobResult:
    """A stand-in procedure: guesses class 0 for every test patch of each scored site."""
    sites = job.eval_sites
    correct = sum(int((s.test.labels == 0).sum()) for s in sites)
    total = sum(len(s.test) for s in sites)
    metrics = {"balanced_accuracy": 1.0 / sites[0].train.num_classes, "macro_f1": 0.0, "accuracy": correct / total,
               "auroc": 0.5, "val_balanced_accuracy": None}
    return JobResult(metrics, [CurvePoint(job.experiment.steps, metrics["balanced_accuracy"], None, 0.0)], 0.0, sites,
                     entry={"scored_sites": len(sites)})


@pytest.fixture
def conf_with_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the variants folder with one more variant, and a private copy of the registry."""
    conf = tmp_path / "conf"
    shutil.copytree(variants.CONF_DIR / "variants", conf / "variants")
    (conf / "variants" / "guess.yaml").write_text("description: constant guess\nprocedure: constant_guess\n")
    monkeypatch.setattr(variants, "CONF_DIR", conf)
    monkeypatch.setattr(procedures.PROCEDURES, "_entries", dict(procedures.PROCEDURES._entries))
    return conf


def test_the_built_in_procedures() -> None:
    assert procedure_names() == ["logistic_regression", "small_cnn", "standard", "two_stage"]
    assert procedures.procedure("standard").federated
    assert not procedures.procedure("two_stage").federated and procedures.procedure("small_cnn").reference


def test_a_registered_procedure_runs_in_an_experiment(conf_with_variant: Path, tmp_path: Path) -> None:
    register_procedure(Procedure("constant_guess", run=constant_guess))
    run = plain_config(compose_config(TOY + ["experiment.variants=[guess]"], config_name="experiments"))
    results = run_experiment(run, tmp_path / "out", "test")
    by_setting = {r["setting"]: r for r in results["runs"]}
    assert by_setting.keys() == {"centralized", "local"}
    assert by_setting["centralized"]["scored_sites"] == 1 and by_setting["local"]["scored_sites"] == 2
    assert by_setting["local"]["balanced_accuracy"] == pytest.approx(0.2)


def test_an_unregistered_or_non_federated_procedure_is_refused_at_start(conf_with_variant: Path,
                                                                         tmp_path: Path) -> None:
    run = plain_config(compose_config(TOY + ["experiment.variants=[guess]"], config_name="experiments"))
    with pytest.raises((ConfigError, ValueError), match=r"guess\.yaml\): procedure 'constant_guess' is not one of"):
        run_experiment(run, tmp_path / "a", "test")
    register_procedure(Procedure("constant_guess", run=constant_guess))
    federated = plain_config(compose_config(TOY + ["experiment.variants=[guess]", "experiment.settings=[federated]"],
                                            config_name="experiments"))
    with pytest.raises((ConfigError, ValueError), match="no federated form"):
        run_experiment(federated, tmp_path / "b", "test")
    assert not (tmp_path / "b" / "results.json").exists()
