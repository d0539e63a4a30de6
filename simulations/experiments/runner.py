"""``fedvitgan experiment``: run every (variant, setting, seed) and write results.json, results.md, curves.png.

    fedvitgan experiment                                   # conf/experiment/few_labels_quick.yaml
    fedvitgan experiment experiment=few_labels             # the default experiment (about 1 hour on 2 cores)
    fedvitgan experiment experiment.seeds=[0,1,2] experiment.steps=1000 data.labeled_per_class=5
    fedvitgan experiment hydra.run.dir=runs/exp1           # a stopped experiment continues in its folder

Every variant gets the same patches (the seed fixes data, partition, labels and initial weights), the
same step budget and the same held-out patches. Results are written after each run, so a stopped
experiment resumes where it stopped when started again with the same folder and config.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from common.config import CONF_DIR, ConfigError, plain_config  # noqa: E402
from common.data.errors import DataError  # noqa: E402
from common.data.registry import load_site_data  # noqa: E402
from common.data.sites import SiteData  # noqa: E402
from common.run_config import run_config  # noqa: E402
from common.train import run_train_config  # noqa: E402
from simulations.commands import run_hydra_main  # noqa: E402
from simulations.experiments.config import ExperimentConfig, experiment_config  # noqa: E402
from simulations.experiments.environment import machine_description, package_versions, trunk_prior_hashes  # noqa: E402
from simulations.experiments.inprocess import TEST_PREDICTIONS, CurvePoint  # noqa: E402
from simulations.experiments.paired import predictions_path  # noqa: E402
from simulations.experiments.procedures import Job, procedure  # noqa: E402
from simulations.experiments.quality import site_generator_quality  # noqa: E402
from simulations.experiments.report import plot_curves, plot_privacy_utility, results_markdown  # noqa: E402
from simulations.experiments.variants import Variant, apply_overrides, load_variant  # noqa: E402

logger = logging.getLogger("fedvitgan.experiment")
METRICS = ("balanced_accuracy", "macro_f1", "accuracy", "auroc")


def _say(text: str) -> None:
    print(text, flush=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=CONF_DIR.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_sites(run: dict[str, Any], seed: int) -> list[SiteData]:
    """Every hospital's data under ``run``'s data and partition sections, for ``seed``."""
    n = int(run["federation"]["num_sites"])
    return [load_site_data(run["data"], run["partition"], s, n, int(run["model"]["image_size"]), seed) for s in range(n)]


def variant_run(base: dict[str, Any], exp: ExperimentConfig, variant: Variant, seed: int) -> dict[str, Any]:
    """The run config of one variant and seed of the experiment ``base``, checked: a bad override
    fails here, naming the key, before any data is read."""
    run = apply_overrides(base, variant.overrides, f"variant {variant.name} (conf/variants/{variant.name}.yaml)")
    run["seed"] = seed
    run["train"]["optim"]["schedule_steps"] = exp.steps  # a cosine schedule spans the whole budget
    run_train_config(run)
    return run


def run_one(base: dict[str, Any], exp: ExperimentConfig, setting: str, variant_name: str, seed: int,
            folder: Path) -> dict[str, Any]:
    """Train one (variant, setting, seed) and return its results.json entry."""
    variant = load_variant(variant_name)
    run = variant_run(base, exp, variant, seed)
    sites = load_sites(run, seed)
    started = time.perf_counter()
    entry: dict[str, Any] = {"variant": variant_name, "setting": setting, "seed": seed, "steps": exp.steps}

    def show(point: CurvePoint) -> None:
        val = "" if point.val is None else f"val {point.val:.3f}  "
        _say(f"    {variant_name} / {setting} / seed {seed}: step {point.step:>6}  {val}test {point.test:.3f}  "
             f"({point.seconds:.0f} s)")

    proc = procedure(variant.procedure)
    config = run_config(run)
    result = proc.run(Job(run, config, exp, setting, seed, sites, folder / f"{setting}-{variant_name}-seed{seed}", show))
    metrics, curve, models, eval_sites = result.metrics, result.curve, result.models, result.eval_sites
    entry.update(result.entry)
    entry["seconds"] = result.seconds
    entry.update({k: metrics[k] for k in METRICS})
    entry["test_examples"] = sum(len(s.test) for s in eval_sites)
    entry["val_balanced_accuracy"] = metrics.get("val_balanced_accuracy")
    entry["curve"] = [p.as_dict() for p in curve]
    entry[TEST_PREDICTIONS] = metrics.get(TEST_PREDICTIONS)  # kept in predictions/, not in results.json
    if exp.generator_quality.enabled and config.train.uses_generator and variant.procedure == "standard":
        if setting == "federated":
            from simulations.experiments.federated import final_global_model

            models = [final_global_model(folder / f"{setting}-{variant_name}-seed{seed}", config, len(sites[0].class_names),
                                         seed)] * len(sites)
        entry["generator"] = site_generator_quality(eval_sites, models, exp.generator_quality.samples_per_class, seed)
    entry["wall_seconds"] = time.perf_counter() - started
    return entry


def _results_header(results: dict[str, Any]) -> str:
    meta = results["meta"]
    packages = ", ".join(f"{name} {version}" for name, version in meta.get("packages", {}).items())
    return (f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \n"
            + (f"Packages: {packages}  \n" if packages else "")
            + f"Date: {meta['date']}, commit {meta['commit']}  \n"
            + "".join(f"Trunk prior: `{p}`, SHA-256 {h[:16]}  \n" for p, h in meta.get("trunk_priors", {}).items())
            + f"Budget: {meta['steps']} local steps per hospital (federated: {meta['rounds']} rounds), "
            f"seeds {meta['seeds']}. `seconds` is training time on this machine (local: all hospitals one after "
            f"another; federated: whole rounds, with the federation's own overhead).")


def keep_predictions(folder: Path, entry: dict[str, Any]) -> None:
    """Move a finished run's pooled test predictions out of its results.json entry into
    ``predictions/<setting>-<variant>-seed<seed>.json`` (the report pairs them by seed)."""
    predictions = entry.pop(TEST_PREDICTIONS, None)
    if not predictions:
        return
    path = predictions_path(folder, entry["setting"], entry["variant"], entry["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(predictions))
    os.replace(tmp, path)


def load_predictions(folder: Path, runs: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The kept test predictions of ``runs`` (those that have a readable file), by (setting, variant, seed)."""
    found: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run in runs:
        path = predictions_path(folder, run["setting"], run["variant"], run["seed"])
        try:
            found[(run["setting"], run["variant"], run["seed"])] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a run recorded before predictions were kept, or a damaged file: no interval for it
    return found


def write_outputs(folder: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and curves.png (rewritten after every run)."""
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, allow_nan=True))
    os.replace(tmp, folder / "results.json")
    predictions = load_predictions(folder, results.get("runs", []))
    (folder / "results.md").write_text(results_markdown(results, _results_header(results), predictions) + "\n")
    plot_curves(results, folder / "curves.png")
    plot_privacy_utility(results, folder / "privacy_utility.png")


def check_same_origin(path: Path, saved: dict[str, Any], machine: str, priors: dict[str, str]) -> None:
    """Refuse to add runs to ``path`` from another machine or another trunk prior file than its recorded
    runs came from: one commit gives other figures on another CPU, and a prior rebuilt elsewhere has other
    weights, so one table would compare those as well as its variants (results written before a key was
    recorded are not checked on it)."""
    if saved.get("machine") not in (None, machine):
        raise ConfigError(f"{path} holds runs made on another machine ({saved['machine']}; this one: {machine}): "
                          "figures from two machines do not compare; use a new folder (hydra.run.dir=...)")
    recorded = saved.get("trunk_priors")
    if recorded is None:
        return
    for prior, now in priors.items():
        if recorded.get(prior, now) != now:
            raise ConfigError(f"{path} holds runs made from another trunk prior file: {prior} had SHA-256 "
                              f"{recorded[prior]}, now {now} (rebuilt?); use a new folder (hydra.run.dir=...)")


def check_private_settings(base: dict[str, Any], exp: ExperimentConfig) -> None:
    """Refuse a variant with DP-SGD (privacy.enabled) in the centralized or local setting: those train
    in this process without the hospitals' DP machinery, so the run would be reported as private
    while taking no DP step."""
    for setting in exp.settings:
        if setting == "federated":
            continue
        for name in exp.variants_for(setting):
            variant = load_variant(name)
            if procedure(variant.procedure).reference:
                continue
            if variant_run(base, exp, variant, exp.seeds[0])["privacy"]["enabled"]:
                raise ConfigError(f"experiment: variant {name!r} enables privacy (DP-SGD), which runs only in the "
                                  f"federated setting (each hospital's own DP machinery); the {setting} setting "
                                  "would train it without DP. Leave it out of that setting (experiment.settings "
                                  "or experiment.setting_variants).")


def run_experiment(run: dict[str, Any], folder: Path, command: str) -> dict[str, Any]:
    """Every job of ``run['experiment']`` not yet in ``folder/results.json``; returns the results."""
    exp = experiment_config(run["experiment"])
    base = {k: v for k, v in run.items() if k != "experiment"}
    check_private_settings(base, exp)
    if exp.threads:
        torch.set_num_threads(int(exp.threads))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    results: dict[str, Any] = {"config": run, "variants": list(exp.variants), "runs": []}
    priors = trunk_prior_hashes(variant_run(base, exp, load_variant(name), exp.seeds[0]) for name in exp.variants)
    machine = machine_description()
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: v for k, v in saved.get("config", {}).items() if k != "experiment"} != base:
            raise ConfigError(f"{path} was written with another config; use a new folder (hydra.run.dir=...)")
        if saved.get("meta", {}).get("training_seed_offset", 0) != exp.training_seed_offset:
            raise ConfigError(f"{path} was written with another experiment.training_seed_offset; use a new folder "
                              f"(hydra.run.dir=...)")
        check_same_origin(path, saved.get("meta", {}), machine, priors)
        priors = {**(saved.get("meta", {}).get("trunk_priors") or {}), **priors}  # the earlier runs' priors stay named
        results["runs"] = saved.get("runs", [])
    results["meta"] = {"command": command, "machine": machine, "packages": package_versions(),
                       "date": time.strftime("%Y-%m-%d"), "commit": _commit(), "steps": exp.steps,
                       "rounds": exp.rounds, "seeds": list(exp.seeds),
                       "training_seed_offset": exp.training_seed_offset, "trunk_priors": priors}
    done = {(r["setting"], r["variant"], r["seed"]) for r in results["runs"]}
    todo = [job for job in exp.jobs() if job not in done]
    total, finished = len(exp.jobs()), len(done)

    def record(entry: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        keep_predictions(folder, entry)
        results["runs"].append(entry)
        write_outputs(folder, results)
        _say(f"[{finished}/{total}] {entry['variant']} / {entry['setting']} / seed {entry['seed']}: test balanced "
             f"accuracy {entry['balanced_accuracy']:.3f} after {entry['seconds']:.0f} s of training")

    for setting in exp.settings_left_empty():
        _say(f"setting {setting}: none of {list(exp.variants)} runs there (experiment.setting_variants.{setting} = "
             f"{exp.setting_variants[setting]}); it is skipped")
    in_process = [job for job in todo if job[0] != "federated"]
    _say(f"{len(todo)} of {total} runs to do ({exp.steps} steps each), {exp.workers} at a time in this process group")
    if exp.workers > 1 and len(in_process) > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(exp.workers, maxtasksperchild=1) as pool:
            arguments = [(base, run["experiment"], *job, str(folder)) for job in in_process]
            for entry in pool.imap_unordered(_run_job, arguments):
                record(entry)
    else:
        for setting, variant, seed in in_process:
            record(run_one(base, exp, setting, variant, seed, folder))
    for setting, variant, seed in [job for job in todo if job[0] == "federated"]:
        record(run_one(base, exp, setting, variant, seed, folder))  # Ray brings its own worker processes
    write_outputs(folder, results)
    return results


def _run_job(arguments: tuple[dict[str, Any], dict[str, Any], str, str, int, str]) -> dict[str, Any]:
    """One in-process run in a worker process (``experiment.workers`` > 1)."""
    base, section, setting, variant, seed, folder = arguments
    exp = experiment_config(section)
    torch.set_num_threads(int(exp.threads or 1))
    return run_one(base, exp, setting, variant, seed, Path(folder))


@hydra.main(config_path=str(CONF_DIR), config_name="experiments", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    run = plain_config(cfg)
    folder = Path(HydraConfig.get().runtime.output_dir).resolve()
    command = "fedvitgan experiment " + " ".join(HydraConfig.get().overrides.task)
    try:
        run_experiment(run, folder, command.strip())
    except (ConfigError, DataError, ValueError) as error:
        print(f"fedvitgan experiment: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _say(f"\nexperiment folder: {folder}  (results.md, results.json, curves.png)")


def main(argv: list[str]) -> int:
    """Run ``fedvitgan experiment`` with ``argv`` (Hydra overrides and flags)."""
    return run_hydra_main(_hydra_entry, "fedvitgan experiment", argv)
