"""Real batches for local training: a labelled and an unlabelled stream, or one mixed stream.

With ``streams: separate`` (the default) every step gets a batch of ``batch_size`` labelled patches
*and* a batch of ``unlabelled_batch_size`` unlabelled ones, each drawn from its own shuffled,
endlessly repeated loader. A hospital with 50 labelled patches among 3,000 therefore still shows its
classifier labelled patches at every step; drawn from one mixed loader, about one patch in 60 would
carry a label. ``streams: mixed`` keeps that single loader (the behaviour before streams existed).

Each yielded batch is ``(images, labels)`` with the labelled rows first and ``UNLABELLED`` (-1) as
the label of every unlabelled row, so a step needs no other interface.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from common.data.base import UNLABELLED, PatchDataset, PatchSubset
from common.train.config import TrainConfig
from common.train.methods import training_method

Batch = tuple[torch.Tensor, torch.Tensor]


class _EpochShuffle(Sampler[int]):
    """A fresh permutation every epoch from one seeded generator, drawn exactly as a shuffling
    ``DataLoader(generator=...)`` without workers draws it (its per-epoch base seed, the permutation,
    then ``RandomSampler``'s empty remainder permutation), so the order is the same with or without
    (persistent) loader workers, and as before loader workers existed."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the loader's base-seed draw
        yield from torch.randperm(self.size, generator=self.generator).tolist()
        torch.randperm(self.size, generator=self.generator)  # RandomSampler's remainder draw


def _endless(dataset: PatchDataset, batch_size: int, seed: int, workers: int = 0,
             pin_memory: bool = False) -> Iterator[Batch]:
    """Shuffled full batches of ``min(batch_size, len(dataset))`` patches, epoch after epoch (the
    order depends on ``seed`` only, not on the number of loader workers)."""
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), sampler=_EpochShuffle(len(dataset), seed),
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


def _together(labelled: Iterator[Batch] | None, unlabelled: Iterator[Batch] | None) -> Iterator[Batch]:
    while True:
        parts = [next(stream) for stream in (labelled, unlabelled) if stream is not None]
        if len(parts) == 1:
            yield parts[0]
        else:
            (xl, yl), (xu, yu) = parts
            yield torch.cat([xl, xu]), torch.cat([yl, torch.full_like(yu, UNLABELLED)])


def training_batches(dataset: PatchDataset, cfg: TrainConfig, seed: int, pin_memory: bool = False
                     ) -> Iterator[Batch]:
    """Endless real batches of ``dataset`` for ``cfg.method`` and ``cfg.streams``, loaded by
    ``cfg.loader_workers`` worker processes (into pinned memory with ``pin_memory``, for CUDA).

    ``supervised`` draws labelled patches only. Raises ``ValueError`` when the method needs
    labelled patches and the hospital has none, or when the data set is empty.
    """
    if len(dataset) == 0:
        raise ValueError("the hospital has no training patches")
    labels = np.asarray(dataset.labels)
    labelled_rows = np.flatnonzero(labels >= 0)
    unlabelled_rows = np.flatnonzero(labels < 0)
    method = training_method(cfg.method)
    if method.needs_labels and len(labelled_rows) == 0:
        raise ValueError(f"train.method={cfg.method} needs labelled patches and this hospital has none")
    loading = {"workers": cfg.loader_workers, "pin_memory": pin_memory}
    if cfg.streams == "mixed":
        if method.labelled_only:
            return _endless(PatchSubset(dataset, labelled_rows), cfg.batch_size, seed, **loading)
        return _endless(dataset, cfg.batch_size, seed, **loading)
    labelled = (_endless(PatchSubset(dataset, labelled_rows), cfg.batch_size, seed, **loading)
                if len(labelled_rows) else None)
    wants_unlabelled = not method.labelled_only and cfg.unlabelled_batch_size > 0
    unlabelled = None
    if wants_unlabelled and len(unlabelled_rows):
        unlabelled = _endless(PatchSubset(dataset, unlabelled_rows), cfg.unlabelled_batch_size, seed + 1, **loading)
    if labelled is None and unlabelled is None:
        raise ValueError("the hospital has no labelled patches and train.unlabelled_batch_size is 0")
    return _together(labelled, unlabelled)
