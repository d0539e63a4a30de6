"""Host-to-device copies that do not stall the GPU.

The trainer draws its randomness (noise, label orders, augmentation parameters) from a CPU
``torch.Generator``, so a hospital's run is the same on any device and resumes exactly. A plain
``.to("cuda")`` of such a tensor copies from pageable memory and makes the host wait until the GPU has
finished everything queued before it; a step does a dozen of these. Copying from pinned memory
without blocking keeps the host ahead of the GPU. The values are the same either way, and on the CPU
nothing is copied.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``: pinned and non-blocking for CUDA, unchanged for the CPU."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def host_rows(mask: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The indices of ``mask``'s true rows (a host boolean mask) as a tensor on ``device``.

    Indexing with them equals indexing with the mask, without the device-to-host wait that a boolean
    mask on the GPU costs (its count must be known before the result can be allocated).
    """
    return to_device(mask.nonzero().squeeze(1), device)


def to_floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors as Python floats, read from the device in one copy (one wait, not one per value)."""
    if not values:
        return {}
    numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, numbers))
