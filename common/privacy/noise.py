"""DP-SGD's Gaussian noise for one step, drawn ahead on a host thread while the GPU computes.

The noise of a step does not depend on the step's data, so it can be drawn before the gradients
exist. Drawing it on the host from the attempt's noise generator keeps every run reproducible in
the test mode and identical on any device, but on a GPU the draw (tens of millions of numbers for
the whole discriminator) would otherwise stall the step. ``prefetch`` starts the draw on a worker
thread; ``take`` returns it (drawing it there and then if nothing was started). The numbers and
their order are the same either way: one ``torch.normal`` per covered parameter, in order, from the
same generator, which no other code touches.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class NoiseSource:
    """Per-parameter Gaussian draws of std ``std`` from ``generator``, optionally prefetched."""

    def __init__(self, generator: torch.Generator, shapes: Sequence[tuple[int, ...]], std: float,
                 pin: bool = False) -> None:
        self.generator = generator
        self.shapes = [tuple(s) for s in shapes]
        self.std = float(std)
        self.pin = pin  # pinned host memory, so the copy to a GPU does not block
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[list[torch.Tensor]] | None = None

    def _draw(self) -> list[torch.Tensor]:
        draws = []
        for shape in self.shapes:
            noise = torch.normal(0.0, self.std, size=shape, generator=self.generator, dtype=torch.float32)
            draws.append(noise.pin_memory() if self.pin else noise)
        return draws

    def prefetch(self) -> None:
        """Start drawing the next step's noise on a worker thread (no-op if a draw is pending)."""
        if self._pending is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dp-noise")
            self._pending = self._executor.submit(self._draw)

    def take(self) -> list[torch.Tensor]:
        """The next step's noise, one tensor per shape in order (the prefetched draw if there is one)."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else self._draw()

    def close(self) -> None:
        """Wait for a pending draw and stop the worker thread."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
