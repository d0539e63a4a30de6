"""The privacy report's accuracy cost: the reference row of the same method and scope whose epsilon is
nearest the run's, written from an experiment's results by simulations.experiments.reference_costs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from common.config import compose_config, plain_config
from common.privacy.reference_cost import Recipe, ReferenceCost, cost_statement, load_reference, nearest_cost
from simulations.experiments.config import experiment_config
from simulations.experiments.reference_costs import main as reference_main
from simulations.experiments.reference_costs import reference_rows
from simulations.experiments.runner import variant_run
from simulations.experiments.variants import load_variant

#: conf/train/default.yaml's whitening floor rule, as a recipe names it
DEFAULT_FLOOR = "clamp(0.0012 sigma^3, 0.01, 1) under DP-SGD, shared 0.01"

ROWS = [ReferenceCost("unified", "discriminator", 1.1, 0.40, 0.74, 3),
        ReferenceCost("unified", "discriminator", 3.0, 0.50, 0.74, 3),
        ReferenceCost("unified", "discriminator", 8.0, 0.60, 0.74, 3),
        ReferenceCost("supervised", "discriminator", 8.0, 0.50, 0.73, 3),
        ReferenceCost("unified", "classifier", 3.0, 0.72, 0.74, 3)]


def test_the_nearest_epsilon_on_a_log_scale_of_the_same_method_and_scope_is_chosen() -> None:
    # the geometric mean of 3 and 8 is 4.90: below it 3 is nearer, above it 8
    assert nearest_cost(ROWS, Recipe("unified", "discriminator"), 4.8).epsilon == 3.0
    assert nearest_cost(ROWS, Recipe("unified", "discriminator"), 5.0).epsilon == 8.0
    assert nearest_cost(ROWS, Recipe("unified", "discriminator"), 0.2).epsilon == 1.1
    assert nearest_cost(ROWS, Recipe("supervised", "discriminator"), 1.0).accuracy == 0.50
    assert nearest_cost(ROWS, Recipe("supervised", "classifier"), 3.0) is None
    assert nearest_cost(ROWS, Recipe("unified", "discriminator"), float("inf")) is None


def test_the_statement_quotes_the_cost_and_says_where_it_was_measured() -> None:
    reference = {"source": "the synthetic reference", "rows": ROWS}
    text = cost_statement(reference, Recipe("unified", "discriminator"), 7.5)
    assert "the synthetic reference" in text and "epsilon 8" in text
    assert "**14.0 points lost to DP**" in text and "0.600 against 0.740" in text
    better = {"source": "s", "rows": [ReferenceCost("unified", "discriminator", 8.0, 0.80, 0.74, 3)]}
    assert "**6.0 points gained under DP**" in cost_statement(better, Recipe("unified", "discriminator"), 8.0)
    assert "not measured" in cost_statement(reference, Recipe("semi_supervised", "discriminator"), 7.5)
    assert "No reference" in cost_statement(None, Recipe("unified", "discriminator"), 7.5)


def test_a_run_from_the_trunk_prior_is_quoted_its_own_recipe_never_the_one_from_scratch() -> None:
    frozen = ReferenceCost("supervised", "discriminator", 8.0, 0.76, 0.80, 3, trunk_prior=True, freeze_trunk=True)
    reference = {"source": "s", "rows": [*ROWS, frozen]}
    recipe = Recipe("supervised", "discriminator", trunk_prior=True, freeze_trunk=True)
    assert nearest_cost(reference["rows"], recipe, 8.0) == frozen
    assert nearest_cost(reference["rows"], Recipe("supervised", "discriminator"), 8.0).accuracy == 0.50
    text = cost_statement(reference, recipe, 8.0)
    assert "**4.0 points lost to DP**" in text and "a model.trunk_prior and privacy.freeze_trunk" in text
    # a frozen trunk without the prior (a random one) was not measured: no row of another recipe stands in
    alone = cost_statement(reference, Recipe("supervised", "discriminator", freeze_trunk=True), 8.0)
    assert "not measured" in alone and "points" not in alone
    # nor does the frozen prior's row stand in for a head that also reads the grid of patch tokens
    grid = Recipe("supervised", "discriminator", trunk_prior=True, freeze_trunk=True, classifier_grid=2)
    assert nearest_cost(reference["rows"], grid, 8.0) is None
    assert "(model.classifier_grid=2)" in cost_statement(reference, grid, 8.0)
    run = {"train": {"method": "supervised"}, "model": {"trunk_prior": "p.safetensors", "classifier_grid": 2},
           "privacy": {"scope": "discriminator", "freeze_trunk": True}}
    assert Recipe.of_run(run) == grid
    del run["model"]["classifier_grid"]  # a run recorded before the key: the CLS head
    assert Recipe.of_run(run) == recipe
    # a whitened head is its own recipe: the centred one's rows do not stand in for it
    centred = Recipe("supervised", "discriminator", trunk_prior=True, freeze_trunk=True, classifier_grid=2,
                     classifier_centre=True)
    whitened = dataclasses.replace(centred, classifier_whitening=True, whitening_images="random_process",
                                   whitening_floor=DEFAULT_FLOOR)
    rows = [ReferenceCost(**dataclasses.asdict(centred), epsilon=8.0, accuracy=0.7, accuracy_without_dp=0.6, seeds=3)]
    assert nearest_cost(rows, centred, 8.0) == rows[0] and nearest_cost(rows, whitened, 8.0) is None
    rows.append(ReferenceCost(**dataclasses.asdict(whitened), epsilon=8.0, accuracy=0.8, accuracy_without_dp=0.6,
                              seeds=3))
    assert nearest_cost(rows, whitened, 8.0) == rows[1] and nearest_cost(rows, centred, 8.0) == rows[0]
    assert "whitened by free images (model.classifier_whitening: random_process images)" in cost_statement(
        {"source": "s", "rows": rows}, whitened, 8.0)
    run["model"].update(classifier_grid=2, classifier_centre=True, classifier_whitening=True)
    assert Recipe.of_run(run) == whitened


def test_a_run_far_from_every_measured_epsilon_is_quoted_no_cost() -> None:
    reference = {"source": "s", "rows": ROWS}
    # 8 x 3 = 24 is the last epsilon the epsilon-8 row speaks for; clipping with almost no noise
    # (epsilon about 10^5) and a very strict budget are far from every row
    assert "points lost to DP" in cost_statement(reference, Recipe("unified", "discriminator"), 23.0)
    for epsilon in (25.0, 95_000.0, 0.3):
        text = cost_statement(reference, Recipe("unified", "discriminator"), epsilon)
        assert "points" not in text and "not measured" in text and "the nearest: epsilon" in text


def _results() -> dict:
    config = plain_config(compose_config(["experiment=privacy_utility"], config_name="experiments"))

    def run(variant: str, seed: int, accuracy: float, epsilon: float | None) -> dict:
        return {"variant": variant, "setting": "federated", "seed": seed, "balanced_accuracy": accuracy,
                "epsilon": epsilon}

    return {"config": config, "runs": [
        run("plain", 0, 0.80, None), run("plain", 1, 0.70, None), run("plain_dp8", 0, 0.60, 7.9),
        run("plain_dp8", 1, 0.50, 8.1), run("unified_dp3_head", 0, 0.70, 3.0), run("unified", 0, 0.74, None),
        run("unified_dp1", 0, 0.30, 1.0), run("unified_dp1", 5, 0.20, 1.0)]}


def test_rows_come_from_each_dp_variant_and_its_twin_on_the_same_seeds(tmp_path: Path) -> None:
    rows = reference_rows(_results())
    assert [(r.method, r.scope) for r in rows] == [("supervised", "discriminator"), ("unified", "classifier"),
                                                  ("unified", "discriminator")]
    plain = rows[0]
    assert (plain.epsilon, plain.accuracy, plain.accuracy_without_dp, plain.seeds) == pytest.approx((8.0, 0.55, 0.75, 2))
    assert rows[2].seeds == 1 and rows[2].accuracy == pytest.approx(0.30)  # seed 5 has no twin
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results()))
    out = tmp_path / "reference.json"
    assert reference_main([str(results), "--source", "a test", "--out", str(out)]) == 0
    loaded = load_reference(out)
    assert loaded["source"] == "a test" and [asdict(r) for r in loaded["rows"]] == [asdict(r) for r in rows]
    # Measuring one recipe again replaces its rows and, asked to, keeps the other recipes' rows.
    other = ReferenceCost("supervised", "discriminator", 8.0, 0.7, 0.75, 3, True, True, 2, True)
    stale = dataclasses.replace(rows[0], accuracy=0.01)
    out.write_text(json.dumps({"source": "old", "rows": [asdict(other), asdict(stale)]}))
    assert reference_main([str(results), "--source", "both", "--out", str(out), "--keep-other-recipes"]) == 0
    merged = load_reference(out)["rows"]
    assert other in merged and stale not in merged and set(rows) <= set(merged) and len(merged) == len(rows) + 1
    assert reference_main([str(results), "--source", "x", "--out", str(out)]) == 0
    assert other not in load_reference(out)["rows"]  # without the switch the file holds these results alone


def test_the_whitening_s_images_and_training_on_generated_images_are_part_of_the_recipe() -> None:
    """A unified run that trains on its generated images under DP, or whitens by its generator's images
    alone, is not quoted the cost of the recipe that does neither (their costs differ by 0.7-2 points
    on the synthetic patches, docs/results.md); a run config recorded before the keys reads as their
    defaults."""
    run = {"train": {"method": "unified", "selection": {"mode": "none"}, "whitening": {"source": "auto"}},
           "model": {"trunk_prior": "p.safetensors", "classifier_grid": 2, "classifier_centre": True,
                     "classifier_whitening": True},
           "privacy": {"scope": "discriminator", "freeze_trunk": True}}
    nogen = Recipe.of_run(run)
    assert nogen.whitening_images == "generator+random_process" and not nogen.generated_images
    rows = [ReferenceCost(**dataclasses.asdict(nogen), epsilon=8.0, accuracy=0.79, accuracy_without_dp=0.72, seeds=3)]
    assert nearest_cost(rows, nogen, 8.0) == rows[0]
    assert "no generated image trained on (train.selection.mode=none)" in cost_statement(
        {"source": "s", "rows": rows}, nogen, 8.0)
    run["train"]["selection"]["mode"] = "rule"
    trains_on_them = Recipe.of_run(run)
    assert trains_on_them.generated_images and nearest_cost(rows, trains_on_them, 8.0) is None
    assert "the classifier trained on generated images too" in cost_statement({"source": "s", "rows": rows},
                                                                              trains_on_them, 8.0)
    del run["train"]["selection"]  # recorded before the key: the rule, which trains on them
    assert Recipe.of_run(run) == trains_on_them
    run["train"].update(selection={"mode": "none"}, whitening={"source": "generator"})
    assert Recipe.of_run(run).whitening_images == "generator" and nearest_cost(rows, Recipe.of_run(run), 8.0) is None
    # the plain classifier trains on no generated image whatever its selection key says
    run["train"].update(method="supervised", selection={"mode": "rule"}, whitening={"source": "auto"})
    plain = Recipe.of_run(run)
    assert not plain.generated_images and plain.whitening_images == "random_process"


def test_the_shipped_reference_covers_both_methods_in_the_end_to_end_scope() -> None:
    reference = load_reference()
    assert reference is not None and reference["source"]
    pairs = {(r.method, r.scope) for r in reference["rows"]}
    assert {("unified", "discriminator"), ("supervised", "discriminator")} <= pairs


def test_the_whitening_floor_rule_is_part_of_the_recipe() -> None:
    """A run whose whitening floor is not the measured rule (the rule off, or other settings) is told its
    cost was not measured instead of being quoted the rule's; a row recorded before the key carries no
    rule and is quoted to no whitened run."""
    run = {"train": {"method": "supervised", "whitening": {"source": "auto"}},
           "model": {"trunk_prior": "p.safetensors", "classifier_grid": 2, "classifier_centre": True,
                     "classifier_whitening": True},
           "privacy": {"scope": "discriminator", "freeze_trunk": True}}
    rule = Recipe.of_run(run)
    assert rule.whitening_floor == DEFAULT_FLOOR
    rows = [ReferenceCost(**dataclasses.asdict(rule), epsilon=8.0, accuracy=0.79, accuracy_without_dp=0.72, seeds=3)]
    assert nearest_cost(rows, rule, 8.0) == rows[0]
    assert f"at the eigenvalue floor {DEFAULT_FLOOR} (train.whitening)" in cost_statement(
        {"source": "s", "rows": rows}, rule, 8.0)
    run["train"]["whitening"]["noise_shrinkage"] = 0.0
    fixed = Recipe.of_run(run)
    assert fixed.whitening_floor == "0.01" and nearest_cost(rows, fixed, 8.0) is None
    assert "at the eigenvalue floor 0.01 (train.whitening)" in cost_statement({"source": "s", "rows": rows}, fixed, 8.0)
    run["train"]["whitening"].update(noise_shrinkage=0.0012, noise_shrinkage_min=0.003)
    assert nearest_cost(rows, Recipe.of_run(run), 8.0) is None
    before_the_key = dataclasses.replace(rows[0], whitening_floor="")
    assert nearest_cost([before_the_key], rule, 8.0) is None
    del run["model"]["classifier_whitening"]  # no whitening: no floor in the recipe
    assert Recipe.of_run(run).whitening_floor == ""


@pytest.mark.parametrize("variant", ["plain_dp8_prior_whitened", "unified_dp8_prior_nogen", "plain_dp3_prior_whitened",
                                     "unified_dp3_prior_nogen", "plain_dp1_prior_whitened", "unified_dp1_prior_nogen"])
def test_the_shipped_reference_quotes_the_reference_experiment_s_own_whitened_variants(variant: str) -> None:
    """Each recipe of experiment=privacy_utility's table has its shipped row, floor rule included."""
    config = plain_config(compose_config(["experiment=privacy_utility"], config_name="experiments"))
    base = {k: v for k, v in config.items() if k != "experiment"}
    run = variant_run(base, experiment_config(config["experiment"]), load_variant(variant), 0)
    epsilon = float(run["privacy"]["target_epsilon"])
    row = nearest_cost(load_reference()["rows"], Recipe.of_run(run), epsilon)
    assert row is not None and row.whitening_floor == DEFAULT_FLOOR
    assert max(row.epsilon / epsilon, epsilon / row.epsilon) < 1.2
