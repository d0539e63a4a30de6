"""Reference rows (logistic regression on pixels, a small CNN): same labels, same test patches, refused when federated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import compose_config, plain_config
from simulations.experiments.reference_rows import labelled_part, train_logistic_regression
from simulations.experiments.runner import load_sites, run_experiment

TOY = [
    "data.train_per_site=40", "data.test_per_site=20", "data.labeled_per_class=2", "data.val_fraction=0.2",
    "train.batch_size=8", "federation.num_sites=2", "experiment.steps=6", "experiment.eval_every=3",
    "experiment.rounds=2", "experiment.seeds=[0]", "experiment.settings=[centralized]",
]


def _run(overrides: list[str]) -> dict:
    return plain_config(compose_config(TOY + overrides, config_name="experiments"))


def test_logistic_regression_learns_only_from_the_labelled_patches() -> None:
    run = _run([])
    sites = load_sites(run, 0)
    labelled = labelled_part(sites[0].train)
    assert 0 < len(labelled) < len(sites[0].train)
    assert (np.asarray(labelled.labels) >= 0).all()
    metrics, curve, seconds = train_logistic_regression(sites[:1], 0)
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and metrics["val_balanced_accuracy"] is not None
    assert curve[-1].test == metrics["balanced_accuracy"] and seconds > 0


def test_reference_rows_score_the_same_test_patches_as_the_vit(tmp_path: Path) -> None:
    run = _run(["experiment.variants=[plain,logistic_regression,small_cnn]"])
    results = run_experiment(run, tmp_path, "test")
    entries = {r["variant"]: r for r in results["runs"]}
    assert entries.keys() == {"plain", "logistic_regression", "small_cnn"}
    assert len({e["test_examples"] for e in entries.values()}) == 1
    assert [p["step"] for p in entries["small_cnn"]["curve"]] == [3, 6]  # the plain baseline's step budget
    assert all(0.0 <= e["balanced_accuracy"] <= 1.0 for e in entries.values())


def test_a_reference_row_in_the_federated_setting_is_refused_before_anything_runs(tmp_path: Path) -> None:
    run = _run(["experiment.variants=[plain,small_cnn]", "experiment.settings=[centralized,federated]",
                "experiment.setting_variants.federated=[plain,small_cnn]"])
    with pytest.raises(ValueError, match="reference rows"):
        run_experiment(run, tmp_path, "test")
    assert not (tmp_path / "results.json").exists()
