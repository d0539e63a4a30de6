"""Per-seed differences to plain come with a paired bootstrap interval over the test patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from simulations.experiments.paired import PairedIntervalConfig, bootstrap_difference
from simulations.experiments.report import results_markdown
from simulations.experiments.runner import keep_predictions, load_predictions

CONFIG = PairedIntervalConfig(resamples=500)


def _predictions(n: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    wrong = rng.random(n) > accuracy
    return labels, np.where(wrong, (labels + 1) % 4, labels)


def test_the_difference_is_that_of_the_balanced_accuracies_and_its_interval_narrows_with_more_patches() -> None:
    labels, a = _predictions(400, 0.9, seed=0)
    _, b = _predictions(400, 0.8, seed=1)
    pair = bootstrap_difference(labels, a, b, CONFIG)
    expected = balanced_accuracy_score(labels, a) - balanced_accuracy_score(labels, b)
    assert pair.difference == pytest.approx(expected, abs=1e-12)
    assert pair.low < pair.difference < pair.high
    big_labels, big_a = _predictions(6400, 0.9, seed=0)
    _, big_b = _predictions(6400, 0.8, seed=1)
    big = bootstrap_difference(big_labels, big_a, big_b, CONFIG)
    assert (big.high - big.low) < 0.5 * (pair.high - pair.low)  # 16x the patches: about 1/4 of the width


def test_agreeing_models_have_a_narrow_interval_and_the_draws_are_reproducible() -> None:
    labels, a = _predictions(400, 0.85, seed=0)
    same = bootstrap_difference(labels, a, a, CONFIG)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    b = a.copy()
    b[:4] = labels[:4]  # b differs from a on 4 patches only: the pair moves together
    _, independent = _predictions(400, 0.85, seed=7)
    close, apart = bootstrap_difference(labels, b, a, CONFIG), bootstrap_difference(labels, independent, a, CONFIG)
    assert close.high - close.low < 0.5 * (apart.high - apart.low)
    assert bootstrap_difference(labels, b, a, CONFIG) == close
    with pytest.raises(ValueError, match="equal, non-empty"):
        bootstrap_difference(labels, a[:-1], a, CONFIG)


def _entry(variant: str, seed: int, accuracy: float, predictions: dict | None) -> dict:
    entry = {"variant": variant, "setting": "centralized", "seed": seed, "balanced_accuracy": accuracy,
             "macro_f1": accuracy, "accuracy": accuracy, "auroc": accuracy, "seconds": 1.0}
    if predictions is not None:
        entry["test_predictions"] = predictions
    return entry


def test_the_report_brackets_each_seed_whose_two_runs_kept_their_predictions(tmp_path: Path) -> None:
    labels, a = _predictions(300, 0.9, seed=0)
    _, b = _predictions(300, 0.8, seed=1)
    record = lambda predicted: {"labels": labels.tolist(), "predicted": predicted.tolist()}  # noqa: E731
    runs = [_entry("plain", 0, 0.8, record(b)), _entry("unified", 0, 0.9, record(a)),
            _entry("plain", 1, 0.8, None), _entry("unified", 1, 0.7, None)]  # seed 1: recorded before predictions
    for entry in runs:
        keep_predictions(tmp_path, entry)
    assert all("test_predictions" not in entry for entry in runs)
    assert json.loads((tmp_path / "predictions" / "centralized-unified-seed0.json").read_text())["labels"] == labels.tolist()
    kept = load_predictions(tmp_path, runs)
    assert sorted(kept) == [("centralized", "plain", 0), ("centralized", "unified", 0)]
    text = results_markdown({"variants": ["plain", "unified"], "runs": runs}, predictions=kept)
    pair = bootstrap_difference(labels, a, b, PairedIntervalConfig())
    line = next(x for x in text.splitlines() if x.startswith("- unified:"))
    assert f"seed 0: +0.100 [{pair.low:+.3f}, {pair.high:+.3f}]" in line
    assert line.endswith("seed 1: -0.100")  # no predictions, no bracket
    assert "paired bootstrap interval over the test patches" in text
    assert "paired bootstrap" not in results_markdown({"variants": ["plain", "unified"], "runs": runs})
    assert "difference to `semi_supervised`" not in text  # FixMatch did not run here


def test_fixmatch_gets_its_own_per_seed_comparison_where_it_ran(tmp_path: Path) -> None:
    labels, a = _predictions(300, 0.9, seed=0)
    _, b = _predictions(300, 0.85, seed=1)
    record = lambda predicted: {"labels": labels.tolist(), "predicted": predicted.tolist()}  # noqa: E731
    runs = [_entry("plain", 0, 0.8, record(b)), _entry("semi_supervised", 0, 0.85, record(b)),
            _entry("unified", 0, 0.9, record(a))]
    for entry in runs:
        keep_predictions(tmp_path, entry)
    text = results_markdown({"variants": ["plain", "semi_supervised", "unified"], "runs": runs},
                            predictions=load_predictions(tmp_path, runs))
    block = text.split("difference to `semi_supervised`")[1].split("\n\n", 2)[1]
    assert block.startswith("- plain: seed 0: -0.050 [") and "- unified: seed 0: +0.050 [" in block
