"""The one place that turns a configured device name into a torch device name."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> str:
    """``auto`` (or unset) -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``, ``cuda`` and
    ``cuda:N`` pass through."""
    if name is None or str(name) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)
