"""``fedvitgan experiment``: one entry per (variant, setting, seed), honest tables, same patches and budget."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, compose_config, plain_config
from simulations.experiments.config import experiment_config
from simulations.experiments.environment import PACKAGES, cpu_model, package_versions
from simulations.experiments.runner import run_experiment

TOY = [
    "data.train_per_site=40", "data.test_per_site=20", "data.labeled_per_class=2", "data.val_fraction=0.2",
    "train.batch_size=8", "train.unlabelled_batch_size=8", "train.selection.warmup_steps=5",
    "train.selection.min_history=2", "federation.num_sites=2", "samples_per_class=1",
    "experiment.steps=20", "experiment.eval_every=10", "experiment.rounds=2", "experiment.seeds=[0,1]",
    "experiment.generator_quality.samples_per_class=4", "experiment.two_stage.generated_per_class=4",
]


def _run(overrides: list[str]) -> dict:
    return plain_config(compose_config(TOY + overrides, config_name="experiments"))


@pytest.mark.slow
def test_runner_writes_one_entry_per_job_and_a_table_that_matches(tmp_path: Path) -> None:
    run = _run([
        "experiment.variants=[plain,semi_supervised,two_stage,unified,unified_labelled_only,oracle]",
        "experiment.settings=[centralized,local,federated]",
        "experiment.setting_variants.local=[plain,unified_labelled_only]",
        "experiment.setting_variants.federated=[unified]",
    ])
    results = run_experiment(run, tmp_path, "test")
    saved = json.loads((tmp_path / "results.json").read_text())
    jobs = experiment_config(run["experiment"]).jobs()
    assert len(jobs) == 6 * 2 + 2 * 2 + 1 * 2
    assert sorted((r["setting"], r["variant"], r["seed"]) for r in saved["runs"]) == sorted(jobs)
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    for entry in saved["runs"]:
        assert entry["steps"] == 20 and 0.0 <= entry["balanced_accuracy"] <= 1.0
        # Two-stage's curve starts with its classifier stage (steps 11-20).
        assert [p["step"] for p in entry["curve"]] == ([20] if entry["variant"] == "two_stage" else [10, 20])
        assert ("generator" in entry) == (entry["variant"] in ("unified", "unified_labelled_only"))
    # The same held-out patches for every variant of a setting and seed.
    by_setting: dict[tuple[str, int], set[int]] = {}
    for entry in saved["runs"]:
        by_setting.setdefault((entry["setting"], entry["seed"]), set()).add(entry["test_examples"])
    assert all(len(sizes) == 1 for sizes in by_setting.values())
    # results.md's means are the means of results.json.
    table = (tmp_path / "results.md").read_text()
    centralized = table.split("## centralized")[1].split("## ")[0]
    for variant in ("plain", "unified", "oracle", "two_stage"):
        row = next(line for line in centralized.splitlines() if line.startswith(f"| {variant} |"))
        shown = float(re.split(r"\s*\|\s*", row)[3].split(" +- ")[0])
        mean = np.mean([r["balanced_accuracy"] for r in saved["runs"]
                        if r["variant"] == variant and r["setting"] == "centralized"])
        assert abs(shown - mean) < 6e-4, (variant, shown, mean)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # Each run's test predictions sit in predictions/ (not in results.json), on the same patches for
    # every variant of a (setting, seed), and the report pairs them with plain's.
    assert all("test_predictions" not in entry for entry in saved["runs"])
    labels: dict[tuple[str, int], list[int]] = {}
    for setting, variant, seed in jobs:
        kept = json.loads((tmp_path / "predictions" / f"{setting}-{variant}-seed{seed}.json").read_text())
        entry = next(r for r in saved["runs"] if (r["setting"], r["variant"], r["seed"]) == (setting, variant, seed))
        assert len(kept["labels"]) == len(kept["predicted"]) == entry["test_examples"]
        assert labels.setdefault((setting, seed), kept["labels"]) == kept["labels"]
    assert re.search(r"- unified: seed 0: [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\], seed 1:", centralized)


def test_a_stopped_experiment_continues_and_a_changed_one_is_refused(tmp_path: Path) -> None:
    run = _run(["experiment.variants=[plain]", "experiment.seeds=[0]"])
    run_experiment(run, tmp_path, "test")
    first = json.loads((tmp_path / "results.json").read_text())["runs"]
    more = _run(["experiment.variants=[plain]", "experiment.seeds=[0,1]"])
    run_experiment(more, tmp_path, "test")
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs[0] == first[0] and [r["seed"] for r in runs] == [0, 1]
    with pytest.raises(ConfigError, match="another config"):
        run_experiment(_run(["experiment.variants=[plain]", "data.labeled_per_class=3"]), tmp_path, "test")


def test_results_record_the_cpu_and_the_package_versions_they_came_from(tmp_path: Path) -> None:
    # One commit gives other figures on another install or CPU: results.json and results.md name both.
    run_experiment(_run(["experiment.variants=[plain]", "experiment.seeds=[0]", "experiment.settings=[centralized]"]),
                   tmp_path, "test")
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["packages"]["numpy"] == np.__version__ and meta["packages"]["torch"] == torch.__version__.split("+")[0]
    assert set(meta["packages"]) == set(PACKAGES)
    assert cpu_model() in meta["machine"]
    assert f"numpy {np.__version__}" in (tmp_path / "results.md").read_text()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU @ 2.10GHz\nflags\t: avx2\n")
    assert cpu_model(cpuinfo) == "Some CPU @ 2.10GHz"
    assert package_versions(("numpy", "no-such-package-here")) == {"numpy": np.__version__,
                                                                    "no-such-package-here": "not installed"}


def test_a_training_seed_offset_retrains_on_the_same_patches(tmp_path: Path) -> None:
    # The noise floor of a per-seed comparison: the same variant, data and labels, other initial weights
    # and batch order.
    base = ["experiment.variants=[plain]", "experiment.seeds=[0]", "experiment.settings=[centralized]"]
    same = run_experiment(_run(base), tmp_path / "a", "test")["runs"][0]
    again = run_experiment(_run(base), tmp_path / "b", "test")["runs"][0]
    other = run_experiment(_run([*base, "experiment.training_seed_offset=100"]), tmp_path / "c", "test")["runs"][0]
    assert same["curve"] == [{**p, "seconds": q["seconds"]} for p, q in zip(again["curve"], same["curve"])]
    assert other["test_examples"] == same["test_examples"]
    assert [p["test_balanced_accuracy"] for p in other["curve"]] != [p["test_balanced_accuracy"] for p in same["curve"]] \
        or other["auroc"] != same["auroc"]
    assert json.loads((tmp_path / "c" / "results.json").read_text())["meta"]["training_seed_offset"] == 100
    with pytest.raises(ConfigError, match="training_seed_offset"):
        run_experiment(_run(base), tmp_path / "c", "test")
    with pytest.raises(ConfigError, match="centralized and local settings only"):
        experiment_config(_run(["experiment.settings=[federated]", "experiment.training_seed_offset=1"])["experiment"])


def test_unknown_variants_and_impossible_grids_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown variant 'plainn'"):
        experiment_config(_run(["experiment.variants=[plainn]"])["experiment"])
    with pytest.raises(ConfigError, match="two_stage"):
        experiment_config(_run(["experiment.variants=[two_stage]", "experiment.settings=[federated]",
                                "experiment.setting_variants.federated=[two_stage]"])["experiment"])
    with pytest.raises(ConfigError, match="multiple of rounds"):
        experiment_config(_run(["experiment.settings=[federated]", "experiment.rounds=3"])["experiment"])
    # A grid that setting_variants empties runs nothing: refused, naming the key; a partly empty one
    # names the settings it skips.
    with pytest.raises(ConfigError, match=r"no run to do: experiment.setting_variants leaves none of the variants "
                                          r"\['semi_supervised'\] in the settings \['federated'\]"):
        experiment_config(_run(["experiment.variants=[semi_supervised]", "experiment.settings=[federated]",
                                "experiment.setting_variants.federated=[plain]"])["experiment"])
    partly = experiment_config(_run(["experiment.variants=[semi_supervised]", "experiment.settings=[centralized,federated]",
                                     "experiment.setting_variants.federated=[plain]"])["experiment"])
    assert partly.settings_left_empty() == ["federated"] and [j[0] for j in partly.jobs()] == ["centralized"] * 2


def test_a_dp_variant_outside_the_federated_setting_is_refused_before_any_training(tmp_path: Path) -> None:
    # The centralized and local settings train in this process, without the hospitals' DP machinery:
    # a DP variant there would be reported beside its epsilon-less twin as if it had been private.
    for setting, restrict in (("centralized", []), ("local", ["experiment.setting_variants.local=[plain,plain_dp8]"])):
        run = _run(["experiment.variants=[plain,plain_dp8]", f"experiment.settings=[{setting}]", *restrict])
        with pytest.raises(ConfigError, match=f"'plain_dp8' enables privacy.*the {setting} setting"):
            run_experiment(run, tmp_path / setting, "test")
        assert not (tmp_path / setting / "results.json").exists()
    # Privacy switched on for the whole experiment counts too.
    with pytest.raises(ConfigError, match="'plain' enables privacy"):
        run_experiment(_run(["experiment.variants=[plain]", "experiment.settings=[centralized]",
                             "privacy.enabled=true"]), tmp_path / "all", "test")


def test_the_report_shows_each_dp_variants_epsilon_and_its_cost_against_the_same_variant_without_dp() -> None:
    from simulations.experiments.report import results_markdown

    def run(variant: str, seed: int, accuracy: float, epsilon: float | None) -> dict:
        return {"variant": variant, "setting": "federated", "seed": seed, "balanced_accuracy": accuracy,
                "macro_f1": accuracy, "accuracy": accuracy, "auroc": accuracy, "seconds": 1.0, "epsilon": epsilon}

    runs = [run("plain", 0, 0.80, None), run("plain", 1, 0.70, None),
            run("plain_dp8", 0, 0.60, 7.9), run("plain_dp8", 1, 0.65, 8.1),
            run("unified_dp8", 0, 0.62, 8.0)]
    text = results_markdown({"variants": ["plain", "plain_dp8", "unified_dp8"], "runs": runs})
    assert "| plain_dp8 | 8.00 | 0.625 | -12.5 (-20.0 / -5.0) vs plain | - | - |" in text  # recorded without curves
    assert "| unified_dp8 | 8.00 | 0.620 | - | - | - |" in text  # no `unified` run to compare with
    assert "| plain | - | 0.750 | - | - | - |" in text
    no_dp = results_markdown({"variants": ["plain"], "runs": runs[:2]})
    assert "Privacy:" not in no_dp
    assert "privacy_utility.png" in text and "privacy_utility.png" not in no_dp


def test_the_privacy_table_gives_the_mean_of_each_run_s_last_evaluations_and_its_cost() -> None:
    from simulations.experiments.report import last_evaluations_mean, results_markdown

    def run(variant: str, seed: int, curve: list[float], epsilon: float | None) -> dict:
        points = [{"step": 10 * (i + 1), "seconds": i + 1.0, "test_balanced_accuracy": v} for i, v in enumerate(curve)]
        return {"variant": variant, "setting": "federated", "seed": seed, "balanced_accuracy": curve[-1],
                "macro_f1": 0.5, "accuracy": 0.5, "auroc": 0.5, "seconds": 1.0, "epsilon": epsilon, "curve": points}

    runs = [run("plain", 0, [0.1, 0.7, 0.8, 0.9], None), run("plain", 1, [0.6, 0.6, 0.6, 0.6], None),
            run("plain_dp8", 0, [0.9, 0.5, 0.6, 0.4], 8.0), run("plain_dp8", 1, [0.5, 0.5, 0.5, 0.2], 8.0)]
    assert last_evaluations_mean(runs[0], 3) == pytest.approx(0.8)
    assert last_evaluations_mean(runs[0], 9) == pytest.approx(0.625)  # fewer points than asked: all of them
    text = results_markdown({"variants": ["plain", "plain_dp8"], "runs": runs,
                             "config": {"experiment": {"last_evaluations": 3}}})
    # last 3: plain 0.8 and 0.6, plain_dp8 0.5 and 0.4; at the last point: -50.0 and -40.0
    assert "| last 3 evaluations | vs without DP (last 3; mean, per seed) |" in text
    assert "| plain_dp8 | 8.00 | 0.300 | -45.0 (-50.0 / -40.0) vs plain | 0.450 | -25.0 (-30.0 / -20.0) |" in text
    assert "| plain | - | 0.750 | - | 0.700 | - |" in text
    two = results_markdown({"variants": ["plain", "plain_dp8"], "runs": runs,
                            "config": {"experiment": {"last_evaluations": 2}}})
    assert "| plain_dp8 | 8.00 | 0.300 | -45.0 (-50.0 / -40.0) vs plain | 0.425 | -30.0 (-35.0 / -25.0) |" in two


def test_the_privacy_utility_plot_has_one_line_per_dp_family_beside_each_variant_without_dp(tmp_path: Path) -> None:
    from simulations.experiments.report import plot_privacy_utility, privacy_utility_series

    def run(variant: str, seed: int, accuracy: float, epsilon: float | None) -> dict:
        return {"variant": variant, "setting": "federated", "seed": seed, "balanced_accuracy": accuracy,
                "epsilon": epsilon}

    runs = [run("plain", 0, 0.8, None), run("plain", 1, 0.7, None),
            run("plain_dp8", 0, 0.6, 7.9), run("plain_dp8", 1, 0.5, 8.1), run("plain_dp1", 0, 0.3, 1.0),
            run("unified_dp3_head", 0, 0.7, 3.0), run("unified", 0, 0.9, None)]
    series = privacy_utility_series({"runs": runs})["federated"]
    assert series["no_dp"] == pytest.approx({"plain": 0.75, "unified": 0.9})
    assert list(series["families"]) == ["plain", "unified_head"]
    (eps1, acc1, _), (eps8, acc8, std8) = series["families"]["plain"]
    assert (eps1, acc1) == pytest.approx((1.0, 0.3)) and (eps8, acc8) == pytest.approx((8.0, 0.55))
    assert std8 == pytest.approx(0.0707, abs=1e-4)
    assert plot_privacy_utility({"runs": runs}, tmp_path / "p.png").stat().st_size > 1000
    assert plot_privacy_utility({"runs": runs[:2]}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_the_privacy_utility_plot_shows_the_tables_mean_of_the_last_evaluations() -> None:
    from simulations.experiments.report import privacy_utility_series

    def run(variant: str, seed: int, curve: list[float], epsilon: float | None) -> dict:
        return {"variant": variant, "setting": "federated", "seed": seed, "balanced_accuracy": curve[-1],
                "epsilon": epsilon, "curve": [{"step": 50 * (i + 1), "test_balanced_accuracy": a}
                                              for i, a in enumerate(curve)]}

    runs = [run("plain", 0, [0.1, 0.9, 0.8, 0.7], None), run("plain_dp8", 0, [0.2, 0.6, 0.5, 0.4], 8.0),
            {"variant": "plain_dp8", "setting": "federated", "seed": 1, "balanced_accuracy": 0.3, "epsilon": 8.0}]
    series = privacy_utility_series({"runs": runs})["federated"]
    assert series["no_dp"]["plain"] == pytest.approx(0.8)  # (0.9 + 0.8 + 0.7) / 3, not the last point 0.7
    (_, mean, _), = series["families"]["plain"]
    assert mean == pytest.approx((0.5 + 0.3) / 2)  # seed 1 has no curve: its final figure stands
    two = privacy_utility_series({"runs": runs, "config": {"experiment": {"last_evaluations": 2}}})["federated"]
    assert two["no_dp"]["plain"] == pytest.approx(0.75)


def test_the_spent_epsilon_is_the_largest_any_hospital_reported(tmp_path) -> None:  # noqa: ANN001
    import json

    from common import protocol
    from simulations.experiments.federated import spent_epsilon

    rounds = [{"round": 1, "sites": {"a": {"train": {protocol.DP_EPSILON: 1.5}}, "b": {"train": {}}}},
              {"round": 2, "sites": {"a": {"train": {protocol.DP_EPSILON: 2.5}}, "b": {"train": {protocol.DP_EPSILON: 2.9}}}}]
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": rounds}))
    assert spent_epsilon(tmp_path) == 2.9
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": [{"round": 1, "sites": {"a": {"train": {}}}}]}))
    assert spent_epsilon(tmp_path) is None


def _prior_file(path: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    from common.config import CONF_DIR, dataclass_from_mapping, load_yaml
    from common.model import ModelConfig
    from common.model.discriminator import ViTTrunk

    torch.manual_seed(seed)
    trunk = ViTTrunk(dataclass_from_mapping(ModelConfig, load_yaml(CONF_DIR / "model" / "tiny.yaml"), "model"))
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
    return path


def test_results_name_the_trunk_prior_file_and_refuse_runs_from_another_prior_or_machine(tmp_path: Path) -> None:
    # A prior is rebuilt on each machine with other weights, and one commit gives other figures on another
    # CPU: a results.json records both and refuses to mix runs from another of either into one table.
    prior = _prior_file(tmp_path / "prior.safetensors", seed=0)
    overrides = ["experiment.variants=[plain]", "experiment.seeds=[0]", "experiment.settings=[centralized]",
                 f"model.trunk_prior={prior}", "experiment.steps=10", "experiment.eval_every=10"]
    folder = tmp_path / "run"
    run_experiment(_run(overrides), folder, "test")
    meta = json.loads((folder / "results.json").read_text())["meta"]
    assert meta["trunk_priors"] == {str(prior): hashlib.sha256(prior.read_bytes()).hexdigest()}
    assert f"SHA-256 {meta['trunk_priors'][str(prior)][:16]}" in (folder / "results.md").read_text()
    run_experiment(_run(overrides), folder, "test")  # the same prior and machine: resumes (nothing left to do)
    _prior_file(prior, seed=1)  # rebuilt: other weights at the same path
    with pytest.raises(ConfigError, match="another trunk prior file: .*prior.safetensors had SHA-256"):
        run_experiment(_run(overrides), folder, "test")
    _prior_file(prior, seed=0)
    results = json.loads((folder / "results.json").read_text())
    results["meta"]["machine"] = "x86_64, Some Other CPU, 2 CPU cores"
    (folder / "results.json").write_text(json.dumps(results))
    with pytest.raises(ConfigError, match="runs made on another machine .*Some Other CPU"):
        run_experiment(_run(overrides), folder, "test")


def test_a_resumed_experiment_keeps_naming_the_prior_its_earlier_runs_started_from(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the variant names its prior relative to the working directory
    (tmp_path / "priors").mkdir()
    prior = _prior_file(tmp_path / "priors" / "tiny.safetensors", seed=0)
    base = ["experiment.seeds=[0]", "experiment.settings=[centralized]", "experiment.steps=10",
            "experiment.eval_every=10"]
    run_experiment(_run([*base, "experiment.variants=[plain_prior]"]), tmp_path / "run", "test")
    run_experiment(_run([*base, "experiment.variants=[plain]"]), tmp_path / "run", "test")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["variant"] for r in results["runs"]] == ["plain_prior", "plain"]
    assert results["meta"]["trunk_priors"] == {"priors/tiny.safetensors": hashlib.sha256(prior.read_bytes()).hexdigest()}
