"""What the run report reads from a run's ``summary.json``: the metric names, the hospitals that
replied, the class names, bytes each way. Shared by the Markdown report and the curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

METRICS: tuple[tuple[str, str], ...] = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                                        ("macro_f1", "macro-F1"), ("auroc", "AUROC"))
MB = 1e6


def site_names(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every hospital that replied in some round, sorted."""
    return sorted({name for entry in rounds for name in (entry.get("sites") or {})})


def prefixed(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{name: value}`` of the metrics called ``<prefix>/<name>``."""
    return {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(prefix + "/")}


def class_names(summary: Mapping[str, Any]) -> list[str]:
    """Class names in the order the run reports acceptance (first-seen order)."""
    names: list[str] = []
    for entry in summary.get("rounds", []):
        for site in (entry.get("sites") or {}).values():
            names += [c for c in prefixed(site.get("train") or {}, "acceptance") if c not in names]
    return names


def bytes_each_way(entry: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes to the hospitals, bytes from them) in one round: train and evaluate instructions out,
    model updates back."""
    sent = entry.get("bytes") or {}
    return int(sent.get("train_to_sites", 0)) + int(sent.get("evaluate_to_sites", 0)), int(sent.get("train_from_sites", 0))
