"""Reading a trunk prior file, with errors that name the file and what does not fit."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn


class PriorError(ValueError):
    """A trunk prior file that is missing, unreadable or made for another trunk."""


def load_trunk_prior(path: str | Path, trunk: nn.Module) -> dict[str, torch.Tensor]:
    """The trunk weights in ``path``, checked against ``trunk``'s keys and shapes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PriorError(f"model.trunk_prior: no file {path} (write one with `fedvitgan prior --out {path}`)")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise PriorError(f"model.trunk_prior: {path} is not a readable safetensors file ({error})") from None
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != tuple(expected[k].shape))
    if missing or extra or wrong:
        raise PriorError(f"model.trunk_prior: {path} was made for another trunk (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, other shapes {wrong[:3]}); build it for this model preset")
    return weights
