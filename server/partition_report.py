"""The partition report: per hospital, per split, per class patch counts (JSON + Markdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def partition_markdown(rows: dict[str, Any]) -> str:
    """A Markdown table: one row per hospital and split, one column per class."""
    classes: list[str] = []
    for report in rows.values():
        for split in ("train", "test"):
            for name in report.get(split, {}):
                if name not in classes:
                    classes.append(name)
    lines = ["| hospital | split | " + " | ".join(classes) + " | total |",
             "|---|---|" + "---:|" * (len(classes) + 1)]
    for site in sorted(rows):
        for split in ("train", "test"):
            counts = rows[site].get(split, {})
            total = sum(int(v) for v in counts.values())
            lines.append(f"| {site} | {split} | " + " | ".join(str(counts.get(c, 0)) for c in classes) + f" | {total} |")
    return "\n".join(lines) + "\n"


def write_partition_report(run_dir: Path, rows: dict[str, Any]) -> Path:
    """Merge ``rows`` (site -> report) into ``partition.json`` / ``partition.md`` of the run."""
    path = Path(run_dir) / "partition.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    if all(existing.get(site) == report for site, report in rows.items()):
        return path
    existing.update(rows)
    path.write_text(json.dumps(existing, indent=2))
    markdown = partition_markdown(existing)
    (Path(run_dir) / "partition.md").write_text("# Partition: patches per hospital and class\n\n" + markdown)
    print("partition (patches per hospital and class):\n" + markdown, flush=True)
    return path
