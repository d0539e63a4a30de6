"""What the C library does with freed host memory: keep it for the next step, or hand it back.

A training step on the CPU allocates and frees the same large temporaries every step (activations,
gradients, and with DP's book-keeping clipping one gradient per patch for some layers). glibc's
malloc serves blocks above a moving threshold with fresh ``mmap`` pages and returns the top of
its heap to the system when more than a threshold is free; each step then pays page faults on
memory it just gave back. ``train.host_memory=retain`` (the default) sets glibc's mmap threshold
to its largest value (32 MiB) and stops the trimming, so freed blocks are reused: the process
keeps its peak host memory instead of returning it between steps. Measured on a 2-core CPU: a
DP step (privacy.scope=discriminator, tiny preset) went from 1.21-1.24x to 1.06-1.15x a plain
step (median 1.10 over 9 runs), and the plain step got up to 7 % faster (``benchmarks/README.md``, ``dp_overhead``). ``release`` leaves
the C library's own behaviour. The setting is process-wide and applied once; it does nothing
where the C library is not glibc (macOS, musl) and changes no number a step computes.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Protocol

HOST_MEMORY_POLICIES = ("retain", "release")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
LARGEST_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit systems
NO_TRIM = 2**31 - 1  # mallopt takes an int: about 2 GiB of free heap top before any is returned

_retained = False  # this process already took the retain settings


class _Mallopt(Protocol):
    def mallopt(self, param: int, value: int) -> int: ...


@functools.cache
def _glibc() -> _Mallopt | None:
    """The process's own C library if it is glibc (its symbols, no library search), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: raises AttributeError elsewhere)
        return libc  # type: ignore[return-value]
    except (OSError, AttributeError, TypeError):
        return None


def apply_host_memory_policy(policy: str, libc: _Mallopt | None = None) -> bool:
    """Apply ``policy`` (``retain`` or ``release``) to this process once; True if the C library took
    the ``retain`` settings. ``libc`` is for tests; by default the process's glibc, if any."""
    global _retained
    if policy not in HOST_MEMORY_POLICIES:
        raise ValueError(f"host_memory must be one of {HOST_MEMORY_POLICIES}, got {policy!r}")
    if policy == "release" or (_retained and libc is None):
        return _retained
    lib = libc if libc is not None else _glibc()
    if lib is None:
        return False
    ok = lib.mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) == 1 and lib.mallopt(M_TRIM_THRESHOLD, NO_TRIM) == 1
    if libc is None:
        _retained = ok
    return ok
