"""``results.md`` and ``curves.png`` from the runs of ``results.json``.

Per setting: mean +- std over seeds of each variant's test metrics; the difference to ``plain`` with a
paired per-seed comparison (the same seed means the same patches, labels and initial weights);
validation balanced accuracy (what choices are made on); wall seconds; the seconds to first reach
95 % of ``plain``'s final balanced accuracy; and, for variants with a generator, its quality. Where
the runs' test predictions were kept (``predictions/``), each seed's difference to ``plain`` comes with
its paired bootstrap interval over the test patches (``simulations/experiments/paired.py``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.config import dataclass_from_mapping  # noqa: E402
from simulations.experiments.paired import PairedDifference, PairedIntervalConfig, paired_with_baseline  # noqa: E402

BASELINE = "plain"
TIME_TO_ACCURACY_FRACTION = 0.95


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(array) == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def group_runs(runs: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{setting: {variant: [runs sorted by seed]}}``."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run["setting"]][run["variant"]].append(run)
    for variants in grouped.values():
        for entries in variants.values():
            entries.sort(key=lambda r: r["seed"])
    return grouped


def paired_difference(runs: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str = "balanced_accuracy"
                      ) -> dict[str, Any] | None:
    """Per-seed ``run - baseline`` on the seeds both have; None when they share none."""
    base = {r["seed"]: r[key] for r in baseline}
    diffs = {r["seed"]: r[key] - base[r["seed"]] for r in runs if r["seed"] in base}
    if not diffs:
        return None
    values = list(diffs.values())
    mean, std = _mean_std(values)
    return {"mean": mean, "std": std, "per_seed": diffs, "lower": sum(v < 0 for v in values), "seeds": len(values)}


def first_time_reaching(curve: list[dict[str, Any]], threshold: float) -> float | None:
    """Training seconds at the first curve point whose test balanced accuracy reaches ``threshold``."""
    for point in curve:
        if point["test_balanced_accuracy"] >= threshold:
            return float(point["seconds"])
    return None


def time_to_accuracy(variants: dict[str, list[dict[str, Any]]]) -> tuple[float, dict[str, dict[str, Any]]] | None:
    """Per variant, the mean seconds to reach 95 % of plain's mean final balanced accuracy."""
    if BASELINE not in variants:
        return None
    target = TIME_TO_ACCURACY_FRACTION * _mean_std([r["balanced_accuracy"] for r in variants[BASELINE]])[0]
    table = {}
    for name, runs in variants.items():
        times = [first_time_reaching(r.get("curve", []), target) for r in runs]
        reached = [t for t in times if t is not None]
        table[name] = {"seconds": _mean_std(reached)[0] if reached else None, "reached": len(reached), "runs": len(runs)}
    return target, table


#: A DP variant's name: ``<twin>_dp<target epsilon><suffix>`` (e.g. unified_dp3, unified_dp3_head,
#: plain_dp_clip_only); ``<twin>`` is the same variant without DP.
DP_VARIANT = re.compile(r"^(?P<twin>.+?)_dp(?P<target>\d*)(?P<suffix>.*)$")


def privacy_utility_series(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per setting with DP runs: ``{"families": {family: [(epsilon, mean, std), ...] by epsilon},
    "no_dp": {twin: mean}}``. A family is a DP variant's twin plus its suffix (``unified``,
    ``unified_head``); epsilon is the mean over seeds of the largest any hospital reported. Accuracy is
    the privacy table's: each run's mean test balanced accuracy over its last ``last_evaluations``
    evaluation points (its final figure for a run recorded without a curve), then mean +- std of seeds."""
    count = _last_evaluations_count(results)

    def accuracy(run: Mapping[str, Any]) -> float:
        last = last_evaluations_mean(run, count)
        return float(run["balanced_accuracy"]) if last is None else last

    series: dict[str, dict[str, Any]] = {}
    for setting, variants in group_runs(results.get("runs", [])).items():
        families: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        twins: set[str] = set()
        for name, runs in variants.items():
            match = DP_VARIANT.match(name)
            epsilons = [r["epsilon"] for r in runs if r.get("epsilon") is not None]
            if match is None or not epsilons:
                continue
            twins.add(match["twin"])
            mean, std = _mean_std([accuracy(r) for r in runs])
            families[match["twin"] + match["suffix"]].append((float(np.mean(epsilons)), mean, std))
        if families:
            no_dp = {t: _mean_std([accuracy(r) for r in variants[t]])[0] for t in sorted(twins) if t in variants}
            series[setting] = {"families": {f: sorted(points) for f, points in sorted(families.items())}, "no_dp": no_dp}
    return series


def plot_privacy_utility(results: dict[str, Any], path: Path | str) -> Path | None:
    """``privacy_utility.png``: test balanced accuracy (the privacy table's mean of each run's last
    evaluations, mean +- std over seeds) against epsilon (log scale), one line per DP family, each
    variant without DP as a dashed line; None without DP runs."""
    series = privacy_utility_series(results)
    count = _last_evaluations_count(results)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(6.5 * len(series), 4.2), squeeze=False)
    for ax, (setting, data) in zip(axes[0], series.items()):
        colours = {}
        for index, twin in enumerate(data["no_dp"]):
            colours[twin] = f"C{index}"
            ax.axhline(data["no_dp"][twin], color=colours[twin], linestyle="--", label=f"{twin}, no DP")
        for index, (family, points) in enumerate(data["families"].items()):
            twin = next((t for t in colours if family == t or family.startswith(t + "_")), None)
            eps, mean, std = zip(*points)
            # A family with a suffix (e.g. unified_head) takes its twin's colour, dotted, a marker of its own.
            marker = "o" if family == twin else "s^Dv<>"[index % 6]
            ax.errorbar(eps, mean, yerr=std, marker=marker, capsize=3,
                        label=f"{family} (DP)", color=colours.get(twin or "", f"C{len(colours) + index}"),
                        linestyle="-" if family == twin else ":")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon per hospital (log scale)")
        ax.set_ylabel(f"test balanced accuracy (mean of the last {count} evaluations)")
        ax.set_title(f"{setting}: accuracy against privacy budget")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")  # lower right hid the low DP points of the digits
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _paired_cost(name: str, variants: Mapping[str, list[dict[str, Any]]], key: str = "balanced_accuracy"
                 ) -> str | None:
    """A variant ``<twin>_dp...`` against ``<twin>`` (the same variant without DP), paired by seed on
    ``key``, in points: ``mean (per seed)``; None without such a twin or a shared seed."""
    match = DP_VARIANT.match(name)
    if match is None or match["twin"] not in variants:
        return None
    diff = paired_difference(variants[name], variants[match["twin"]], key)
    if diff is None:
        return None
    seeds = " / ".join(f"{100 * v:+.1f}" for _, v in sorted(diff["per_seed"].items()))
    return f"{100 * diff['mean']:+.1f} ({seeds})"


def _cost_of_privacy(name: str, variants: dict[str, list[dict[str, Any]]]) -> str:
    """The paired cost against the same variant without DP in balanced accuracy; ``-`` without one."""
    cost = _paired_cost(name, variants)
    return "-" if cost is None else f"{cost} vs {DP_VARIANT.match(name)['twin']}"  # type: ignore[index]


def last_evaluations_mean(run: Mapping[str, Any], count: int) -> float | None:
    """The mean test balanced accuracy of ``run``'s last ``count`` evaluation points (all of them when
    it has fewer); None for a run recorded without its curve."""
    points = [p["test_balanced_accuracy"] for p in (run.get("curve") or [])][-count:]
    return float(np.mean(points)) if points else None


def _last_evaluations_cells(name: str, variants: Mapping[str, list[dict[str, Any]]], count: int) -> str:
    """The privacy table's last two cells: the mean over seeds of each run's last ``count`` evaluation
    points, and its paired cost against the same variant without DP (``-`` where not computable)."""
    last = {variant: [{"seed": r["seed"], "last": m} for r in runs if (m := last_evaluations_mean(r, count)) is not None]
            for variant, runs in variants.items()}
    if len(last[name]) < len(variants[name]):
        return "- | -"
    return f"{_mean_std([r['last'] for r in last[name]])[0]:.3f} | {_paired_cost(name, last, 'last') or '-'}"


def _last_evaluations_count(results: dict[str, Any]) -> int:
    """The experiment's ``last_evaluations`` (conf/'s, for results written before it existed)."""
    from simulations.experiments.config import ExperimentConfig

    value = ((results.get("config") or {}).get("experiment") or {}).get("last_evaluations")
    return int(value) if value is not None else ExperimentConfig().last_evaluations


def _paired_interval_config(results: dict[str, Any]) -> PairedIntervalConfig:
    """The experiment's ``paired_interval`` section (conf/'s, for results written before it existed)."""
    section = ((results.get("config") or {}).get("experiment") or {}).get("paired_interval") or {}
    return dataclass_from_mapping(PairedIntervalConfig, section, "experiment.paired_interval")


def _bracket(interval: PairedDifference | None) -> str:
    return "" if interval is None else f" [{interval.low:+.3f}, {interval.high:+.3f}]"


def _per_seed_lines(setting: str, names: Sequence[str], variants: Mapping[str, list[dict[str, Any]]], baseline: str,
                    predictions: Mapping[tuple[str, str, int], Mapping[str, Any]],
                    interval: PairedIntervalConfig) -> list[str]:
    """Each variant's per-seed balanced-accuracy difference to ``baseline`` (with its paired interval
    where both runs kept their test predictions); nothing when ``baseline`` did not run here."""
    per_seed = [(name, paired_difference(variants[name], variants.get(baseline, [])))
                for name in names if name != baseline]
    found = [(n, d) for n, d in per_seed if d is not None]
    if not found:
        return []
    intervals = {(name, seed): paired_with_baseline(predictions, setting, name, baseline, seed, interval)
                 for name, diff in found for seed in diff["per_seed"]}
    lines = [f"Per-seed balanced-accuracy difference to `{baseline}`"
             + (f" (in brackets: its {interval.level:.0%} paired bootstrap interval over the test patches, "
                f"{interval.resamples} draws; the test split's sampling noise only, not retraining's)"
                if any(v is not None for v in intervals.values()) else "") + ":", ""]
    for name, diff in found:
        cells = ", ".join(f"seed {s}: {v:+.3f}{_bracket(intervals[(name, s)])}" for s, v in sorted(diff["per_seed"].items()))
        lines.append(f"- {name}: {cells}")
    return [*lines, ""]


def results_markdown(results: dict[str, Any], header: str = "",
                     predictions: Mapping[tuple[str, str, int], Mapping[str, Any]] | None = None) -> str:
    """The Markdown report of ``results`` (the content of ``results.json``); with the runs' kept test
    ``predictions`` (by setting, variant, seed) each seed's difference to plain gets its interval."""
    grouped = group_runs(results.get("runs", []))
    interval = _paired_interval_config(results)
    plotted = privacy_utility_series(results)  # the settings privacy_utility.png shows
    lines = ["# Experiment results", ""]
    if header:
        lines += [header, ""]
    order = list(results.get("variants") or [])
    for setting in [s for s in ("centralized", "local", "federated") if s in grouped]:
        variants = grouped[setting]
        names = [v for v in order if v in variants] + sorted(v for v in variants if v not in order)
        lines += [f"## {setting}", "",
                  "Test split (pooled over hospitals), mean +- std over seeds; difference to `plain` paired by seed.", "",
                  "| variant | seeds | balanced accuracy | macro-F1 | accuracy | AUROC | val. bal. acc. "
                  "| vs plain (mean +- std) | seeds below plain | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            runs = variants[name]
            cells = [_fmt(*_mean_std([r[k] for r in runs])) for k in ("balanced_accuracy", "macro_f1", "accuracy", "auroc")]
            val = _fmt(*_mean_std([r.get("val_balanced_accuracy") for r in runs]))
            diff = paired_difference(runs, variants.get(BASELINE, [])) if name != BASELINE else None
            diff_text = "-" if diff is None else f"{diff['mean']:+.3f} +- {diff['std']:.3f}"
            below = "-" if diff is None else f"{diff['lower']} of {diff['seeds']}"
            seconds = _mean_std([r["seconds"] for r in runs])[0]
            lines.append(f"| {name} | {len(runs)} | {' | '.join(cells)} | {val} | {diff_text} | {below} | {seconds:.0f} |")
        lines.append("")
        for baseline in [BASELINE, *(b for b in interval.also_against if b != BASELINE)]:
            lines += _per_seed_lines(setting, names, variants, baseline, predictions or {}, interval)
        spent = [(n, [r["epsilon"] for r in variants[n] if r.get("epsilon") is not None]) for n in names]
        if any(values for _, values in spent):
            last = _last_evaluations_count(results)
            lines += ["Privacy: the largest epsilon any hospital reported (per hospital, never summed; the run's "
                      "accountant), mean over seeds; `-`: no DP. Balanced accuracy at the last evaluation, and the "
                      f"mean of each run's last {last} evaluation points (then over seeds).", "",
                      "| variant | epsilon | balanced accuracy | vs the same variant without DP (mean, per seed) "
                      f"| last {last} evaluations | vs without DP (last {last}; mean, per seed) |",
                      "|---|---|---|---|---|---|"]
            for name, values in spent:
                mean_acc = _mean_std([r["balanced_accuracy"] for r in variants[name]])[0]
                epsilon_text = f"{sum(values) / len(values):.2f}" if values else "-"
                lines.append(f"| {name} | {epsilon_text} | {mean_acc:.3f} | {_cost_of_privacy(name, variants)} "
                             f"| {_last_evaluations_cells(name, variants, last)} |")
            lines.append("")
            if setting in plotted:
                lines += ["![balanced accuracy against epsilon](privacy_utility.png)", ""]
        tta = time_to_accuracy(variants)
        if tta is not None:
            target, table = tta
            lines += [f"Wall seconds of training to first reach {TIME_TO_ACCURACY_FRACTION:.0%} of plain's final "
                      f"balanced accuracy ({target:.3f}), at the evaluation points:", "",
                      "| variant | seconds (mean over seeds that reached it) | seeds that reached it |", "|---|---|---|"]
            for name in names:
                row = table[name]
                seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
                lines.append(f"| {name} | {seconds} | {row['reached']} of {row['runs']} |")
            lines.append("")
        quality = [(n, variants[n]) for n in names if any("generator" in r for r in variants[n])]
        if quality:
            lines += ["Generator quality (lower is better): Frechet distance of real and generated patches in the "
                      "reference classifier's feature space, overall and per class, and of their HED stain statistics.", "",
                      "| variant | FD overall | FD per class (mean) | stain FD |", "|---|---|---|---|"]
            for name, runs in quality:
                gens = [r["generator"] for r in runs if "generator" in r]
                overall = _fmt(*_mean_std([g["frechet_overall"] for g in gens]), digits=2)
                per_class = _fmt(*_mean_std([float(np.mean(list(g["frechet_per_class"].values()))) for g in gens]), digits=2)
                stain = _fmt(*_mean_std([g["stain_frechet"] for g in gens]), digits=4)
                lines.append(f"| {name} | {overall} | {per_class} | {stain} |")
            lines.append("")
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: Path | str) -> Path:
    """``curves.png``: test balanced accuracy against steps and against wall seconds, one row per
    setting, one line per variant (mean over seeds at each evaluation point)."""
    grouped = group_runs(results.get("runs", []))
    settings = [s for s in ("centralized", "local", "federated") if s in grouped] or ["centralized"]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        for name, runs in sorted(grouped.get(setting, {}).items()):
            curves = [r.get("curve") or [] for r in runs]
            length = min((len(c) for c in curves), default=0)
            if length == 0:
                continue
            steps = [curves[0][i]["step"] for i in range(length)]
            acc = [float(np.mean([c[i]["test_balanced_accuracy"] for c in curves])) for i in range(length)]
            secs = [float(np.mean([c[i]["seconds"] for c in curves])) for i in range(length)]
            axes[row][0].plot(steps, acc, marker=".", label=name)
            axes[row][1].plot(secs, acc, marker=".", label=name)
        for col, xlabel in enumerate(("local steps", "wall seconds of training")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test balanced accuracy")
            ax.set_title(setting)
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
