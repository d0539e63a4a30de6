"""An exponential moving average of a model's parameters over a round's local steps.

With ``train.iterate_average`` = d > 0 the round's result is ``avg``, where ``avg`` starts at the
round's initial parameters and after each step becomes ``d * avg + (1 - d) * current``. Averaging
iterates lowers the variance the noise of DP-SGD leaves in the last one (De et al. 2022 average the
parameters); it uses nothing but the iterates, so under DP it is post-processing and free.
"""

from __future__ import annotations

import torch
from torch import nn


class IterateAverage:
    """EMA of ``module``'s parameters (buffers stay the last iterate's); ``apply`` writes it back."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"iterate average decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current parameters (call after each optimiser step)."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        """Overwrite the module's parameters with their average."""
        torch._foreach_copy_(self.params, self.average)
