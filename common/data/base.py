"""The one interface every patch data set implements, and its tensor conversion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

#: Label of a patch whose class is not given to the training (the few-labels regime).
UNLABELLED = -1


def uint8_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 in [-1, 1] (the generator's tanh range)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) or (3, H, W) floats in [-1, 1] -> HWC uint8 (batched as NHWC)."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return array.movedim(-3, -1).numpy()


class PatchDataset(Dataset):
    """A labelled set of RGB patches at one square size.

    Subclasses set ``labels`` (int64, ``UNLABELLED`` where the label is withheld), ``class_names``
    and ``image_size``, and implement ``load_uint8``. Items are ``(CHW float tensor in [-1, 1],
    label)``.
    """

    labels: np.ndarray
    class_names: tuple[str, ...]
    image_size: int
    #: Caveats a data check or a partition report should print (e.g. patient leakage).
    warnings: tuple[str, ...] = ()
    #: Hospital id per patch where the data set records one (natural partition), else None.
    hospitals: np.ndarray | None = None
    #: Patient or slide id per patch where the data set records one (group partitions), else None.
    groups: np.ndarray | None = None

    def load_uint8(self, index: int) -> np.ndarray:
        """The patch at ``index`` as an (image_size, image_size, 3) uint8 array."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(len(self.labels))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return uint8_to_tensor(self.load_uint8(int(index))), int(self.labels[index])

    def class_counts(self) -> dict[str, int]:
        """Patches per class name (unlabelled ones under ``"unlabelled"`` when present)."""
        counts = {name: int((self.labels == k).sum()) for k, name in enumerate(self.class_names)}
        unlabelled = int((self.labels == UNLABELLED).sum())
        if unlabelled:
            counts["unlabelled"] = unlabelled
        return counts


class PatchSubset(PatchDataset):
    """The patches of ``base`` at ``indices``, optionally with some labels withheld."""

    def __init__(
        self,
        base: PatchDataset,
        indices: Sequence[int] | np.ndarray,
        labels: np.ndarray | None = None,
    ) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = (
            base.labels[self.indices].copy() if labels is None else np.asarray(labels, np.int64)
        )
        if len(self.labels) != len(self.indices):
            raise ValueError("labels and indices differ in length")
        self.class_names = base.class_names
        self.image_size = base.image_size
        self.warnings = base.warnings

    @property  # type: ignore[override]
    def hospitals(self) -> np.ndarray | None:
        return None if self.base.hospitals is None else self.base.hospitals[self.indices]

    @property  # type: ignore[override]
    def groups(self) -> np.ndarray | None:
        return None if self.base.groups is None else self.base.groups[self.indices]

    def load_uint8(self, index: int) -> np.ndarray:
        return self.base.load_uint8(int(self.indices[index]))


class ConcatPatches(PatchDataset):
    """Several patch data sets of the same classes and size, one after another."""

    def __init__(self, parts: Sequence[PatchDataset]) -> None:
        if not parts:
            raise ValueError("ConcatPatches needs at least one data set")
        first = parts[0]
        for part in parts[1:]:
            if part.class_names != first.class_names or part.image_size != first.image_size:
                raise ValueError(f"cannot concatenate data sets with classes {list(part.class_names)} at "
                                 f"{part.image_size} px and {list(first.class_names)} at {first.image_size} px")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.labels = np.concatenate([np.asarray(p.labels, np.int64) for p in parts])
        self.class_names = first.class_names
        self.image_size = first.image_size
        self.warnings = tuple(dict.fromkeys(w for p in parts for w in p.warnings))

    def load_uint8(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part].load_uint8(int(index - self.offsets[part]))


class ArrayPatches(PatchDataset):
    """Patches held in memory as an (N, H, W, 3) uint8 array (e.g. generated images)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"expected (N, S, S, 3) uint8 images, got {images.dtype} {images.shape}")
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        self.image_size = int(images.shape[1])

    def load_uint8(self, index: int) -> np.ndarray:
        return self.images[index]
