"""``fedvitgan report RUN``: the run report, ``report.md`` and ``curves.png`` in the run folder.

Everything comes from the run's ``summary.json``: the global metrics per round, each hospital's
held-out metrics, loss weights and sample-selection acceptance per class, bytes each way and
seconds per round, the hospitals left out and why, the latest sample grid, and a link to the
privacy report when there is one. ``fedvitgan simulate`` and the loopback deployment write it at
the end of a run; run it again on any run folder (also one still training) to refresh it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.commands import run_folder_report
from simulations.run_folder import RunFolderError, load_summary
from simulations.summary_fields import MB, METRICS, bytes_each_way, class_names, prefixed, site_names


def fmt(value: Any, digits: int = 4) -> str:
    """A number as the report prints it (``n/a`` for a missing or non-finite value)."""
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.{digits}f}" if np.isfinite(number) else "n/a"


def count(value: Any) -> int | None:
    """A count recorded as a number (summary.json stores metrics as floats), as an int."""
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if k < numeric_from else "---:" for k in range(len(header))) + "|"]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return lines


def _overview(summary: Mapping[str, Any], run_dir: Path) -> list[str]:
    config = summary.get("config") or {}
    fed, data, model = config.get("federation") or {}, config.get("data") or {}, config.get("model") or {}
    privacy = config.get("privacy") or {}
    rounds = summary.get("rounds") or []
    dp = (f"DP-SGD, privacy.scope={privacy.get('scope')}" if privacy.get("enabled")
          else "off (no differential-privacy guarantee)")
    return [f"# Run report: {run_dir.name}", "",
            f"- run folder: `{run_dir}`",
            f"- rounds in summary.json: {len(rounds)} of federation.rounds={fed.get('rounds', 'n/a')}",
            f"- hospitals: {fed.get('num_sites', 'n/a')} configured, {len(site_names(rounds))} replied",
            f"- model: {model.get('name', 'n/a')} ({model.get('image_size', 'n/a')} px); data: {data.get('name', 'n/a')}"
            f"; partition: {(config.get('partition') or {}).get('name', 'n/a')}; seed: {config.get('seed', 'n/a')}",
            f"- differential privacy: {dp}", "",
            "![curves per round](curves.png)", ""]


def _global_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for entry in rounds:
        metrics = entry.get("global") or {}
        rows.append([str(entry["round"]), *(metrics.get(k) for k, _ in METRICS), count(metrics.get("examples")),
                     len(entry.get("sites") or {}), len(entry.get("excluded") or [])])
    return ["## Global metrics per round", "",
            "The hospitals' held-out metrics, averaged with weights equal to their held-out example counts "
            "(the server sees no patient image, so there is no central test set).", "",
            *_table(["round", *(label for _, label in METRICS), "examples", "hospitals replied", "left out"], rows), ""]


def _site_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for entry in rounds:
        for name, site in sorted((entry.get("sites") or {}).items()):
            evaluate, train = site.get("evaluate") or {}, site.get("train") or {}
            rows.append([str(entry["round"]), name, *(evaluate.get(k) for k, _ in METRICS),
                         train.get("loss/cls_real"), train.get("images_per_second")])
    return ["## Each hospital per round", "",
            "Held-out metrics of the global model at each hospital, its mean classification loss on real "
            "labels during local training, and its training throughput (real images per second).", "",
            *_table(["round", "hospital", *(label for _, label in METRICS), "loss cls_real", "images/s"], rows, 2), ""]


def _weights_section(rounds: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    names: list[str] = []
    for entry in rounds:
        for site in (entry.get("sites") or {}).values():
            names += [n for n in prefixed(site.get("train") or {}, "weight") if n not in names]
    weight_rows, accept_rows = [], []
    for entry in rounds:
        for name, site in sorted((entry.get("sites") or {}).items()):
            train = site.get("train") or {}
            weights, accepted = prefixed(train, "weight"), prefixed(train, "acceptance")
            weight_rows.append([str(entry["round"]), name, *(weights.get(n) for n in names)])
            accept_rows.append([str(entry["round"]), name, *(accepted.get(c) for c in classes),
                                count(train.get("selected_images"))])
    return ["## Loss weights per round", "",
            "The learned uncertainty weights exp(-s) of the classification losses at each hospital, after "
            "the round's local training.", "",
            *_table(["round", "hospital", *names], weight_rows, 2), "",
            "## Sample selection per class per round", "",
            "Share of the generated images of each class that the hospital's selection accepted for the "
            "classifier during the round (0 during the warm-up), and how many it accepted in all.", "",
            *_table(["round", "hospital", *classes, "selected images"], accept_rows, 2), ""]


def _traffic_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for entry in rounds:
        out, back = bytes_each_way(entry)
        rows.append([str(entry["round"]), out, back, f"{out / MB:.2f}", f"{back / MB:.2f}", entry.get("seconds")])
    return ["## Bytes and time per round", "",
            "Bytes sent to the hospitals (train and evaluate instructions) and received from them (model "
            "updates), and the round's wall-clock seconds.", "",
            *_table(["round", "bytes to hospitals", "bytes from hospitals", "MB to", "MB from", "seconds"], rows), ""]


def _secure_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per round of a SecAgg+ run: who is in the sum, who dropped out where, and what the protocol cost."""
    secure = [(entry["round"], entry["secure_aggregation"]) for entry in rounds if entry.get("secure_aggregation")]
    if not secure:
        return []
    rows = []
    for rnd, log in secure:
        stages = log.get("bytes") or {}
        keys = [s for s in stages if s != "collect_masked_vectors"]
        to_keys = sum(int(stages[s].get("to_sites", 0)) for s in keys)
        from_keys = sum(int(stages[s].get("from_sites", 0)) for s in keys)
        masked = int((stages.get("collect_masked_vectors") or {}).get("from_sites", 0))
        seconds = log.get("seconds") or {}
        dropouts = ", ".join(f"{d.get('site')} ({d.get('stage')})" for d in log.get("dropouts") or []) or "none"
        rows.append([str(rnd), str(len(log.get("participants") or [])), dropouts.replace("|", "\\|"),
                     f"{to_keys / 1024:.1f} / {from_keys / 1024:.1f}", f"{masked / MB:.2f}",
                     f"{sum(float(seconds.get(s, 0.0)) for s in keys):.2f}",
                     f"{float(seconds.get('collect_masked_vectors', 0.0)):.2f}"])
    return ["## Secure aggregation (SecAgg+)", "",
            "The coordinator received masked vectors only and unmasked their sum. Per round: the hospitals in "
            "the sum, those that dropped out (and at which stage), the key stages' traffic (setup, share_keys, "
            "unmask; KiB to / from the hospitals), the masked vectors' size (8 bytes per value, against 4 for a "
            "float32 update) and the seconds of the key stages and of the training stage.", "",
            *_table(["round", "in the sum", "dropped out", "key stages KiB to / from", "masked MB from",
                     "key stages s", "training stage s"], rows, 3), ""]


def _excluded_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [[str(entry["round"]), str(e.get("site", "?")), str(e.get("phase", "train")),
             str(e.get("reason") or e.get("message") or "").replace("|", "\\|").replace("\n", " ")]
            for entry in rounds for e in entry.get("excluded") or []]
    if not rows:
        return ["## Hospitals left out", "", "None: every hospital's reply was used in every round.", ""]
    return ["## Hospitals left out", "", *_table(["round", "hospital", "phase", "reason"], rows, 4), ""]


def _samples_section(rounds: Sequence[Mapping[str, Any]], run_dir: Path) -> list[str]:
    grids = [entry["samples"] for entry in rounds if entry.get("samples") and (run_dir / entry["samples"]).is_file()]
    if not grids:
        return ["## Samples", "", "No sample grid in the run folder yet.", ""]
    latest = rounds[-1]["round"] if rounds else "?"
    return ["## Samples", "", f"One row of generated patches per class, from the global generator after round {latest}:",
            "", f"![global generator samples]({grids[-1]})", ""]


def _privacy_section(summary: Mapping[str, Any], run_dir: Path) -> list[str]:
    privacy = (summary.get("config") or {}).get("privacy") or {}
    if (run_dir / "privacy" / "report.md").is_file():
        return ["## Privacy", "", "Epsilon per hospital, what it covers and what it does not: "
                "[privacy report](privacy/report.md).", ""]
    if privacy.get("enabled"):
        return ["## Privacy", "", f"Differential privacy was on, but the privacy report is missing; write it with "
                f"`fedvitgan privacy-report {run_dir}`.", ""]
    return ["## Privacy", "", "Differential privacy was off in this run: no privacy guarantee is claimed.", ""]


def render_markdown(summary: Mapping[str, Any], run_dir: Path) -> str:
    """report.md's text."""
    rounds = sorted(summary.get("rounds") or [], key=lambda e: e["round"])
    lines = [*_overview(summary, run_dir), *_global_section(rounds), *_site_section(rounds),
             *_weights_section(rounds, class_names(summary)), *_traffic_section(rounds), *_secure_section(rounds),
             *_excluded_section(rounds),
             *_samples_section(rounds, run_dir), *_privacy_section(summary, run_dir)]
    return "\n".join(lines)


def write_run_report(run_dir: Path | str) -> dict[str, Path]:
    """Write ``report.md`` and ``curves.png`` into ``run_dir``; returns their paths."""
    from simulations.report_curves import plot_curves

    run_dir = Path(run_dir).resolve()
    summary = load_summary(run_dir)
    paths = {"md": run_dir / "report.md", "png": run_dir / "curves.png"}
    plot_curves(summary, paths["png"])
    tmp = paths["md"].with_suffix(".md.tmp")
    tmp.write_text(render_markdown(summary, run_dir))
    tmp.replace(paths["md"])
    return paths


def main(argv: list[str]) -> int:
    """Write the report of a run folder; 0 on success, 2 when the folder is not a run folder."""
    return run_folder_report(argv, "fedvitgan report", __doc__, write_run_report, (RunFolderError,),
                             epilog="example:\n  fedvitgan report runs/2026-11-26_14-41-00")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
