"""The partition report: patches per hospital, split and class, as one Markdown table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SPLITS: tuple[str, ...] = ("train", "test")


def _rows(rows: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    if isinstance(rows, Mapping):  # site name -> report
        return [(str(site), report) for site, report in rows.items()]
    return [(str(report.get("site", f"site-{k}")), report) for k, report in enumerate(rows)]


def partition_report(rows: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of all hospitals: one line per hospital and split, one column per class.

    ``rows`` are ``SiteData.report()`` dicts (``{"site", "train": {class: n}, "test": {class: n}}``),
    or a mapping site -> such a dict. Columns are the classes in first-seen order (``unlabelled``,
    the patches whose label is withheld, last), then the total; a last line per split sums all
    hospitals.
    """
    items = _rows(rows)
    classes: list[str] = []
    for _, report in items:
        for split in SPLITS:
            for name in report.get(split, {}) or {}:
                if name not in classes and name != "unlabelled":
                    classes.append(name)
    if any("unlabelled" in (report.get(s) or {}) for _, report in items for s in SPLITS):
        classes.append("unlabelled")
    lines = ["| hospital | split | " + " | ".join(classes) + " | total |",
             "|---|---|" + "---:|" * (len(classes) + 1)]
    totals = {split: dict.fromkeys(classes, 0) for split in SPLITS}
    for site, report in items:
        for split in SPLITS:
            counts = report.get(split) or {}
            values = [int(counts.get(c, 0)) for c in classes]
            for c, v in zip(classes, values):
                totals[split][c] += v
            lines.append(f"| {site} | {split} | " + " | ".join(map(str, values)) + f" | {sum(values)} |")
    for split in SPLITS:
        values = list(totals[split].values())
        lines.append(f"| **all** | {split} | " + " | ".join(map(str, values)) + f" | {sum(values)} |")
    return "\n".join(lines) + "\n"
