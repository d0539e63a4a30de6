"""Writers of tiny data sets in exactly the real on-disk layouts (see docs/datasets.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from common.config import CONF_DIR, load_yaml

NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


def data_section(name: str, root: Path | str, **overrides: Any) -> dict[str, Any]:
    """The ``data`` section a run composes for data set ``name`` (``conf/data/<name>.yaml``, whose
    values are the only defaults), with ``root`` and ``overrides`` on top; a mapping merges into the
    file's, as a Hydra override ``data.splits.val=...`` does."""
    section = {**load_yaml(CONF_DIR / "data" / f"{name}.yaml"), "root": str(root)}
    for key, value in overrides.items():
        merge = isinstance(value, dict) and isinstance(section.get(key), dict)
        section[key] = {**section[key], **value} if merge else value
    return section


def image(seed: int, height: int, width: int) -> np.ndarray:
    """A small deterministic RGB image (a colour ramp plus a seed-dependent offset)."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([yy * 255 // max(height - 1, 1), xx * 255 // max(width - 1, 1),
                     np.full_like(yy, (seed * 37) % 256)], axis=-1)
    return ((base + seed * 11) % 256).astype(np.uint8)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its bytes (a broken download)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


# ---------------------------------------------------------------- PCam
def pcam_name(token: str, part: str) -> str:
    return f"camelyonpatch_level_2_split_{token}_{part}.h5"


def write_pcam(root: Path, token: str, labels: Sequence[int], size: int = 96,
               x_key: str = "x", y_key: str = "y", x_dtype: str = "uint8") -> tuple[Path, Path]:
    """``camelyonpatch_level_2_split_<token>_{x,y}.h5`` with one patch per label."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    x = np.stack([image(i, size, size) for i in range(n)]).astype(x_dtype)
    y = np.asarray(labels, dtype=np.uint8).reshape(n, 1, 1, 1)
    x_path, y_path = root / pcam_name(token, "x"), root / pcam_name(token, "y")
    with h5py.File(x_path, "w") as f:
        f.create_dataset(x_key, data=x, chunks=(1, size, size, 3) if x.ndim == 4 else None)
    with h5py.File(y_path, "w") as f:
        f.create_dataset(y_key, data=y)
    return x_path, y_path


# ---------------------------------------------------------------- NCT-CRC / image folders
def write_class_folders(folder: Path, counts: dict[str, int], size: int = 32, suffix: str = ".tif",
                        nct_names: bool = True) -> list[Path]:
    """``<folder>/<CLASS>/<CLASS>-XXXXXXXX<suffix>`` (or ``img_<k><suffix>``) images."""
    paths = []
    for c, (name, count) in enumerate(counts.items()):
        for k in range(count):
            stem = f"{name}-{''.join('ABCDEFGHKLMNPQRSTVWY'[(c * 7 + k * 3 + j) % 20] for j in range(8))}" \
                if nct_names else f"img_{k}"
            paths.append(save(folder / name / f"{stem}{suffix}", image(c * 10 + k, size, size)))
    return paths


# ---------------------------------------------------------------- PathMNIST
def pathmnist_arrays(size: int, counts: dict[str, int], num_classes: int = 9) -> dict[str, np.ndarray]:
    arrays = {}
    for s, (split, n) in enumerate(counts.items()):
        arrays[f"{split}_images"] = np.stack([image(s * 100 + i, size, size) for i in range(n)])
        arrays[f"{split}_labels"] = (np.arange(n) % num_classes).astype(np.uint8).reshape(n, 1)
    return arrays


def write_pathmnist(root: Path, size: int = 28, counts: dict[str, int] | None = None,
                    compressed: bool = False, **replace: np.ndarray) -> Path:
    """``pathmnist.npz`` / ``pathmnist_<size>.npz`` with train/val/test images and labels."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = pathmnist_arrays(size, counts or {"train": 12, "val": 4, "test": 6})
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = root / ("pathmnist.npz" if size == 28 else f"pathmnist_{size}.npz")
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


# ---------------------------------------------------------------- Camelyon17-WILDS
def write_camelyon17(root: Path, per_center: int = 4, size: int = 96, centers: Sequence[int] = range(5),
                     bad_tumor: bool = False) -> list[dict[str, int]]:
    """``metadata.csv`` (with WILDS's unnamed index column) and the patches it lists.

    Each centre has two patients; the last patch of each centre in centres 0, 3, 4 is id_val
    (csv split 1); tumour alternates.
    """
    rows = []
    for center in centers:
        for k in range(per_center):
            patient = center * 10 + k % 2
            rows.append({"patient": patient, "node": k % 2, "x_coord": 100 * k, "y_coord": 200 + center,
                         "tumor": k % 2 if not (bad_tumor and k == 1) else 3, "slide": center * 5 + k % 2,
                         "center": center, "split": int(k == per_center - 1 and center in (0, 3, 4))})
    lines = [",patient,node,x_coord,y_coord,tumor,slide,center,split"]
    for i, r in enumerate(rows):
        lines.append(f"{i},{r['patient']:03d},{r['node']},{r['x_coord']},{r['y_coord']},{r['tumor']},"
                     f"{r['slide']},{r['center']},{r['split']}")
        folder = f"patient_{r['patient']:03d}_node_{r['node']}"
        save(root / "patches" / folder / f"patch_{folder}_x_{r['x_coord']}_y_{r['y_coord']}.png",
             image(i, size, size))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return rows


# ---------------------------------------------------------------- BreakHis
BREAKHIS_TYPES = {"benign": ("adenosis", "fibroadenoma"), "malignant": ("ductal_carcinoma", "lobular_carcinoma")}


def write_breakhis(root: Path, patients_per_type: int = 2, per_mag: int = 2,
                   mags: Sequence[str] = ("40X", "100X"), size: tuple[int, int] = (46, 70)) -> list[Path]:
    """``BreaKHis_v1/histology_slides/breast/<class>/SOB/<type>/<patient>/<mag>/*.png`` (small 700x460-shaped)."""
    paths = []
    breast = root / "BreaKHis_v1" / "histology_slides" / "breast"
    n = 0
    for cls, types in BREAKHIS_TYPES.items():
        for t, kind in enumerate(types):
            code = f"{cls[0].upper()}_{kind[:2].upper()}"
            for p in range(patients_per_type):
                patient_id = f"14-{t}{p}{len(cls)}00"
                patient = f"SOB_{code}_{patient_id}"
                for mag in mags:
                    for k in range(per_mag):
                        name = f"SOB_{code}-{patient_id}-{mag[:-1]}-{k + 1:03d}.png"
                        paths.append(save(breast / cls / "SOB" / kind / patient / mag / name,
                                          image(n, *size)))
                        n += 1
    return paths


#: The keys every data section shares (conf/data/*.yaml), with every training label kept.
ALL_LABELS = {"labeled_fraction": 1.0, "labeled_per_class": None, "val_fraction": 0.0, "drop_unlabelled": False}
