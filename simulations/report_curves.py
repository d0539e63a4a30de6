"""``curves.png`` of the run report: six panels per round, drawn from ``summary.json``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simulations.summary_fields import MB, METRICS, bytes_each_way, class_names, prefixed, site_names  # noqa: E402


def _value(metrics: Mapping[str, Any] | None, key: str) -> float:
    value = (metrics or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _mean_over_sites(entry: Mapping[str, Any], key: str) -> float:
    values = [_value(site.get("train"), key) for site in (entry.get("sites") or {}).values()]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _finish(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_curves(summary: Mapping[str, Any], path: Path) -> Path:
    """Global metrics, each hospital's balanced accuracy, training losses, loss weights, selection
    acceptance per class, and bytes and seconds, all per round."""
    rounds: Sequence[Mapping[str, Any]] = sorted(summary.get("rounds") or [], key=lambda e: e["round"])
    x = [int(e["round"]) for e in rounds]
    sites = site_names(rounds)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0][0]
    for key, label in METRICS:
        ax.plot(x, [_value(e.get("global"), key) for e in rounds], marker="o", label=label)
    _finish(ax, "global (held-out, example-weighted)", "score")
    ax = axes[0][1]
    for name in sites:
        ax.plot(x, [_value(((e.get("sites") or {}).get(name) or {}).get("evaluate"), "balanced_accuracy") for e in rounds],
                marker="o", label=name)
    _finish(ax, "each hospital's held-out balanced accuracy", "balanced accuracy")
    ax = axes[0][2]
    losses = sorted({k for e in rounds for s in (e.get("sites") or {}).values() for k in prefixed(s.get("train") or {}, "loss")})
    for name in losses:
        ax.plot(x, [_mean_over_sites(e, f"loss/{name}") for e in rounds], marker="o", label=name)
    _finish(ax, "training losses (mean over hospitals)", "loss")
    ax = axes[1][0]
    for k, name in enumerate(sites):
        colour = f"C{k % 10}"
        weights = sorted({w for e in rounds for w in prefixed((((e.get("sites") or {}).get(name) or {}).get("train") or {}),
                                                                  "weight")})
        for style, weight in zip(("-", "--", ":", "-."), weights):
            ax.plot(x, [_value(((e.get("sites") or {}).get(name) or {}).get("train"), f"weight/{weight}") for e in rounds],
                    style, color=colour, marker="o", markersize=3, label=f"{name} {weight}")
    _finish(ax, "loss weights exp(-s) per hospital", "weight")
    ax = axes[1][1]
    for name in class_names(summary):
        ax.plot(x, [_mean_over_sites(e, f"acceptance/{name}") for e in rounds], marker="o", label=name)
    ax.set_ylim(-0.05, 1.05)
    _finish(ax, "selection acceptance per class (mean over hospitals)", "accepted / proposed")
    ax = axes[1][2]
    traffic = np.array([bytes_each_way(e) for e in rounds], dtype=float).reshape(-1, 2) / MB
    width = 0.4
    ax.bar(np.array(x) - width / 2, traffic[:, 0], width, label="MB to hospitals")
    ax.bar(np.array(x) + width / 2, traffic[:, 1], width, label="MB from hospitals")
    _finish(ax, "bytes and seconds per round", "MB")
    seconds = ax.twinx()
    seconds.plot(x, [_value(e, "seconds") for e in rounds], color="black", marker="s", label="seconds")
    seconds.set_ylabel("seconds")
    seconds.legend(fontsize=7, loc="upper right")
    for row in axes:
        for a in row:
            if x:
                a.set_xticks(x if len(x) <= 12 else np.linspace(x[0], x[-1], 12).round().astype(int))
    fig.suptitle(f"run {Path(str((summary.get('config') or {}).get('output_dir') or path.parent)).name}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
