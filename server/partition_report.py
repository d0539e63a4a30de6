"""Writes the partition report the hospitals sent (class counts) into the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.data.report import partition_report
from common.durable import atomic_write


def write_partition_report(run_dir: Path, rows: dict[str, Any]) -> Path:
    """Merge ``rows`` (site -> report) into ``partition.json`` / ``partition.md`` of the run."""
    path = Path(run_dir) / "partition.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    if all(existing.get(site) == report for site, report in rows.items()):
        return path
    existing.update(rows)
    atomic_write(path, json.dumps(existing, indent=2))
    markdown = partition_report({site: existing[site] for site in sorted(existing)})
    atomic_write(Path(run_dir) / "partition.md", "# Partition: patches per hospital and class\n\n" + markdown)
    print("partition (patches per hospital and class):\n" + markdown, flush=True)
    return path
