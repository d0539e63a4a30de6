"""Flattening a hospital's local training state into named tensors and back.

Optimiser moments, loss log-variances, selection statistics and the random generator's state are
stored as ``{name: tensor}`` so they fit a Flower ArrayRecord or a safetensors file alike.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def flatten_optimizer(prefix: str, optimizer: Optimizer) -> dict[str, torch.Tensor]:
    """Per-parameter optimiser state (e.g. Adam's step, exp_avg, exp_avg_sq) under ``prefix``."""
    flat: dict[str, torch.Tensor] = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            flat[f"{prefix}.{index}.{name}"] = tensor.detach().cpu().clone()
    return flat


def load_flat_optimizer(prefix: str, optimizer: Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Restore what ``flatten_optimizer`` produced; hyper-parameters stay those of ``optimizer``."""
    state_dict = optimizer.state_dict()
    params = {i for group in state_dict["param_groups"] for i in group["params"]}
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if not key.startswith(prefix + "."):
            continue
        index_text, name = key[len(prefix) + 1 :].split(".", 1)
        index = int(index_text)
        if index not in params:
            raise ValueError(f"optimizer state {key!r} refers to parameter {index}, which {prefix} lacks")
        restored.setdefault(index, {})[name] = value.clone()
    state_dict["state"] = restored
    optimizer.load_state_dict(state_dict)
