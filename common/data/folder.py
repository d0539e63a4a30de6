"""Patch data sets stored as one image file per patch, and the class-folder scan they share."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.base import PatchDataset
from common.data.errors import DataError
from common.data.images import IMAGE_SUFFIXES, read_image, resize_square

logger = logging.getLogger("fedvitgan.data")


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files directly in ``folder`` (by suffix, case-insensitive; hidden files skipped), sorted."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in suffixes)
    return [folder / name for name in names]


def list_subfolders(folder: Path) -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def scan_class_folders(
    folder: Path,
    expected_classes: Sequence[str] | None = None,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """Files and labels of a ``<folder>/<class>/<image>`` layout.

    Class names are the sub-folder names: in ``expected_classes`` order when given (and then the
    folders must be exactly those), else sorted. Raises ``DataError`` naming the folder when it is
    missing, has no class folders, has other classes than expected, or a class folder has no image.
    """
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; expected one sub-folder per class "
                        f"holding the images (<class>/<image>{'|'.join(suffixes)})")
    found = list_subfolders(folder)
    if not found:
        raise DataError(f"data folder {folder} has no class sub-folders; expected one sub-folder per "
                        f"class holding the images")
    if expected_classes:
        expected = [str(c) for c in expected_classes]
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        if missing or extra:
            raise DataError(f"data folder {folder} has class folders {found}; expected exactly {expected} "
                            f"(missing: {missing or 'none'}, unexpected: {extra or 'none'}). Fix the folder, "
                            f"or set data.class_names to the classes this copy holds")
        classes = expected
    else:
        classes = found
    paths: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        files = list_images(folder / name, suffixes)
        if not files:
            raise DataError(f"class folder {folder / name} holds no image files; expected files ending in "
                            f"{', '.join(suffixes)}")
        paths.extend(files)
        labels.extend([k] * len(files))
    return paths, np.asarray(labels, dtype=np.int64), tuple(classes)


class ImageFilesDataset(PatchDataset):
    """Patches read from image files (one per patch), decoded and resized when loaded.

    With ``skip_corrupt`` every file is decoded once here, and the unreadable ones are logged,
    listed in ``warnings`` and left out; otherwise an unreadable file raises ``DataError`` when
    it is loaded.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        class_names: Sequence[str],
        image_size: int,
        *,
        skip_corrupt: bool = False,
        warnings: Sequence[str] = (),
        hospitals: np.ndarray | None = None,
        groups: np.ndarray | None = None,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(paths):
            raise ValueError("paths and labels differ in length")
        bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"image file {paths[i]} (index {i}) has label {int(labels[i])}, outside the "
                            f"class range 0..{len(class_names) - 1} ({', '.join(class_names)})")
        self.paths = [str(p) for p in paths]
        self.labels = labels
        self.class_names = tuple(class_names)
        self.image_size = int(image_size)
        self.warnings = tuple(warnings)
        self.hospitals = hospitals
        self.groups = groups
        self.skipped: list[str] = []
        if skip_corrupt:
            self._drop_unreadable()

    def _drop_unreadable(self) -> None:
        keep = np.ones(len(self.paths), dtype=bool)
        for i, path in enumerate(self.paths):
            try:
                read_image(Path(path))
            except DataError as error:
                keep[i] = False
                self.skipped.append(path)
                logger.warning("skipping unreadable image (data.skip_corrupt=true): %s", error)
        if self.skipped:
            self.paths = [p for p, k in zip(self.paths, keep) if k]
            self.labels = self.labels[keep]
            self.hospitals = None if self.hospitals is None else self.hospitals[keep]
            self.groups = None if self.groups is None else self.groups[keep]
            shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            note = f"skipped {len(self.skipped)} unreadable image file(s) (data.skip_corrupt=true): {shown}"
            self.warnings = (*self.warnings, note)

    def path(self, index: int) -> Path:
        """The file of patch ``index``."""
        return Path(self.paths[index])

    def missing_files(self) -> list[Path]:
        """Files of this data set that do not exist (a cheap completeness check)."""
        return [Path(p) for p in self.paths if not os.path.isfile(p)]

    def load_uint8(self, index: int) -> np.ndarray:
        return resize_square(read_image(Path(self.paths[index])), self.image_size)
