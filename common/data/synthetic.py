"""A seeded generator of H&E-like tissue patches, for demos and tests (no real patient data).

Each class is drawn as stain concentration maps (haematoxylin, eosin, DAB) and rendered through a
hospital's stain profile (``common.data.stain``), so hospitals differ the way labs do: in colour, not
in tissue. The classes overlap on purpose (variable nuclear size and density, patches that contain
some neighbouring tissue, blur and noise), so that a classifier needs many labelled patches to do
well and generated images have room to help.

Every patch is a pure function of ``(seed, site, split, index)``: the same arguments always give the
same pixels, in any order and in any process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.data.base import PatchDataset
from common.data.stain import StainProfile, site_profile

CLASS_NAMES: tuple[str, ...] = ("tumour", "stroma", "lymphocytes", "adipose", "mucus_debris")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


def _grid(size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in patch units; ``zoom`` > 1 shows more tissue (everything looks smaller)."""
    centres = (np.arange(size) + 0.5) / size * zoom + (1.0 - zoom) / 2.0
    return np.meshgrid(centres, centres, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-scale noise with about ``cells`` bumps across the patch (bilinear)."""
    coarse = rng.normal(size=(cells + 1, cells + 1))
    pos = np.linspace(0.0, cells, size)
    i0 = np.minimum(pos.astype(int), cells - 1)
    t = pos - i0
    rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def _nuclei(
    rng: np.random.Generator,
    grid: tuple[np.ndarray, np.ndarray],
    count: int,
    major: tuple[float, float],
    aspect: tuple[float, float],
    intensity: tuple[float, float],
    angle: float | None = None,
    angle_spread: float = np.pi,
    clusters: int = 0,
) -> np.ndarray:
    """Haematoxylin map of ``count`` elliptical nuclei (radii in patch units)."""
    yy, xx = grid
    if count <= 0:
        return np.zeros_like(yy)
    if clusters > 0:
        centres = rng.uniform(0.1, 0.9, size=(clusters, 2))
        pick = rng.integers(0, clusters, size=count)
        cy = centres[pick, 0] + rng.normal(0, 0.14, size=count)
        cx = centres[pick, 1] + rng.normal(0, 0.14, size=count)
    else:
        cy, cx = rng.uniform(-0.05, 1.05, size=(2, count))
    a = rng.uniform(*major, size=count)
    b = a / rng.uniform(*aspect, size=count)
    base = rng.uniform(0, np.pi) if angle is None else angle
    theta = base + rng.uniform(-angle_spread / 2, angle_spread / 2, size=count)
    level = rng.uniform(*intensity, size=count)
    dy = yy[None] - cy[:, None, None]
    dx = xx[None] - cx[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (dx * cos + dy * sin) / a[:, None, None]
    v = (-dx * sin + dy * cos) / b[:, None, None]
    body = np.clip(1.0 - (u * u + v * v), 0.0, 1.0) ** 0.35
    return (body * level[:, None, None]).max(axis=0)


def _fibres(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray], theta: float) -> np.ndarray:
    """Wavy collagen-like stripes in [-1, 1] running at angle ``theta``."""
    yy, xx = grid
    warp = 0.6 * _smooth_noise(rng, yy.shape[0], 3)
    return np.sin(2 * np.pi * rng.uniform(5, 12) * (xx * np.cos(theta) + yy * np.sin(theta)) + warp)


def _voronoi_membranes(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray], cells: tuple[int, int],
                       thickness: tuple[float, float]) -> np.ndarray:
    """Cell walls of a random Voronoi tiling, 1 on a wall and 0 inside a cell."""
    yy, xx = grid
    seeds = rng.uniform(-0.1, 1.1, size=(int(rng.integers(*cells)), 2))
    dist = np.sqrt((yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2)
    two = np.partition(dist, 1, axis=0)[:2]
    return np.clip(1.0 - (two[1] - two[0]) / rng.uniform(*thickness), 0.0, 1.0)


def _stack(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    return np.stack([np.clip(h, 0, None), np.clip(e, 0, None), np.zeros_like(h)], axis=-1)


# Each class has three sub-types; some sub-types resemble another class's (inflamed stroma and
# sparse lymphocytes, tumour in stroma, torn fat and mucus), as in real tissue.

def _tumour(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    yy, xx = grid
    size = yy.shape[0]
    kind = rng.integers(0, 3)
    if kind == 0:  # solid sheets of large crowded nuclei
        h = _nuclei(rng, grid, int(rng.integers(14, 34)), (0.045, 0.09), (1.0, 1.7), (1.0, 2.0),
                    clusters=int(rng.integers(1, 4)))
        e = rng.uniform(0.3, 0.6) + 0.1 * _smooth_noise(rng, size, 4)
    elif kind == 1:  # gland: nuclei on a ring around a pale lumen
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.35)
        n = int(rng.integers(8, 16))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        h = np.zeros_like(yy)
        for a in ang:
            ny, nx = cy + r * np.sin(a), cx + r * np.cos(a)
            d = ((yy - ny) ** 2 + (xx - nx) ** 2) / rng.uniform(0.035, 0.06) ** 2
            h = np.maximum(h, rng.uniform(1.0, 1.8) * np.clip(1.0 - d, 0, 1) ** 0.35)
        lumen = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) < r * 0.75
        e = np.where(lumen, 0.05, rng.uniform(0.35, 0.6)) + 0.05 * _smooth_noise(rng, size, 4)
    else:  # scattered pleomorphic nuclei invading fibrous stroma
        theta = rng.uniform(0, np.pi)
        e = rng.uniform(0.4, 0.7) + rng.uniform(0.05, 0.2) * _fibres(rng, grid, theta)
        h = _nuclei(rng, grid, int(rng.integers(5, 12)), (0.055, 0.1), (1.0, 2.0), (1.1, 2.0))
    return _stack(h + 0.08, e)


def _stroma(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    size = grid[0].shape[0]
    kind = rng.integers(0, 3)
    theta = rng.uniform(0, np.pi)
    spindles = _nuclei(rng, grid, int(rng.integers(3, 12)), (0.05, 0.1), (2.5, 5.0), (0.8, 1.5),
                       angle=theta, angle_spread=0.6)
    if kind == 0:  # collagen with spindle cells
        e = rng.uniform(0.45, 0.85) + rng.uniform(0.1, 0.3) * _fibres(rng, grid, theta)
        h = spindles
    elif kind == 1:  # inflamed: faint fibres, a sprinkling of lymphocytes
        e = rng.uniform(0.4, 0.7) + rng.uniform(0.03, 0.12) * _fibres(rng, grid, theta)
        h = np.maximum(spindles, _nuclei(rng, grid, int(rng.integers(4, 16)), (0.028, 0.045), (1.0, 1.2), (1.2, 2.0)))
    else:  # dense hyalinised stroma, no visible fibres
        e = rng.uniform(0.6, 1.0) + 0.1 * _smooth_noise(rng, size, 5)
        h = spindles
    return _stack(h + 0.04, e)


def _lymphocytes(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    size = grid[0].shape[0]
    kind = rng.integers(0, 3)
    if kind == 0:  # dense sheet of small round nuclei
        h = _nuclei(rng, grid, int(rng.integers(40, 90)), (0.028, 0.048), (1.0, 1.2), (1.4, 2.4))
        e = rng.uniform(0.15, 0.4) + 0.08 * _smooth_noise(rng, size, 4)
    elif kind == 1:  # infiltrate in fibrous background
        e = rng.uniform(0.35, 0.65) + rng.uniform(0.05, 0.15) * _fibres(rng, grid, rng.uniform(0, np.pi))
        h = _nuclei(rng, grid, int(rng.integers(22, 45)), (0.028, 0.048), (1.0, 1.2), (1.3, 2.2))
    else:  # follicle: small nuclei with a few larger pale centroblasts
        h = np.maximum(
            _nuclei(rng, grid, int(rng.integers(25, 60)), (0.028, 0.045), (1.0, 1.2), (1.3, 2.2)),
            _nuclei(rng, grid, int(rng.integers(2, 6)), (0.05, 0.075), (1.0, 1.3), (0.6, 1.0)),
        )
        e = rng.uniform(0.2, 0.45) + 0.08 * _smooth_noise(rng, size, 4)
    return _stack(h + 0.1, e)


def _adipose(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:  # large empty fat cells with thin walls
        walls = _voronoi_membranes(rng, grid, (3, 9), (0.012, 0.03))
    elif kind == 1:  # smaller cells, thicker walls
        walls = _voronoi_membranes(rng, grid, (8, 16), (0.025, 0.05))
    else:  # torn section: walls only in part of the patch
        walls = _voronoi_membranes(rng, grid, (3, 9), (0.012, 0.03))
        walls = walls * (_smooth_noise(rng, grid[0].shape[0], 2) > rng.uniform(-0.5, 0.3))
    e = 0.03 + rng.uniform(0.5, 0.9) * walls
    h = 0.02 + _nuclei(rng, grid, int(rng.integers(0, 4)), (0.04, 0.07), (2.0, 4.0), (0.8, 1.3)) * walls
    return _stack(h, e)


def _mucus_debris(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    size = grid[0].shape[0]
    kind = rng.integers(0, 3)
    cloud = _smooth_noise(rng, size, int(rng.integers(2, 6)))
    debris = _nuclei(rng, grid, int(rng.integers(4, 26)), (0.015, 0.035), (1.0, 2.5), (0.7, 1.6))
    if kind == 0:  # pale blue-grey mucin
        h = rng.uniform(0.15, 0.4) + 0.08 * cloud + debris
        e = rng.uniform(0.1, 0.3) + 0.1 * _smooth_noise(rng, size, 3)
    elif kind == 1:  # pink necrotic debris
        h = rng.uniform(0.05, 0.2) + 0.05 * cloud + 1.3 * debris
        e = rng.uniform(0.35, 0.6) + 0.15 * _smooth_noise(rng, size, 3)
    else:  # mucin pools with empty vacuoles (can resemble fat)
        vacuoles = _smooth_noise(rng, size, 4) > rng.uniform(0.3, 0.9)
        h = np.where(vacuoles, 0.01, rng.uniform(0.12, 0.35) + 0.08 * cloud) + debris
        e = np.where(vacuoles, 0.02, rng.uniform(0.1, 0.3))
    return _stack(h, e)


TISSUE_RENDERERS: tuple[Callable[[np.random.Generator, tuple[np.ndarray, np.ndarray]], np.ndarray], ...] = (
    _tumour,
    _stroma,
    _lymphocytes,
    _adipose,
    _mucus_debris,
)


def _box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def render_patch(
    label: int,
    size: int,
    rng: np.random.Generator,
    profile: StainProfile,
    mix_probability: float = 0.6,
    max_mix_fraction: float = 0.5,
) -> np.ndarray:
    """One (size, size, 3) uint8 patch of class ``label`` drawn with ``rng``."""
    grid = _grid(size, zoom=float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))))
    conc = TISSUE_RENDERERS[label](rng, grid)
    if rng.uniform() < mix_probability:
        other = int(rng.choice([k for k in range(len(TISSUE_RENDERERS)) if k != label]))
        intruder = TISSUE_RENDERERS[other](rng, grid)
        field = _smooth_noise(rng, size, 2)
        fraction = rng.uniform(0.05, max_mix_fraction)
        mask = (field > np.quantile(field, 1.0 - fraction))[..., None]
        conc = np.where(mask, intruder, conc)
    conc = conc * rng.uniform(0.65, 1.35, size=3)  # section thickness / staining time
    conc[..., 2] += rng.uniform(0.0, 0.05)  # residual brown
    if rng.uniform() < 0.5:
        conc = _box_blur(conc)  # out-of-focus scan
    rgb = profile.render(np.clip(conc, 0.0, None))
    rgb = rgb + rng.normal(0.0, 0.02, size=rgb.shape)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class SyntheticHistology(PatchDataset):
    """Deterministic synthetic H&E patches of one hospital (``site``) and split.

    Labels are class-balanced up to ``class_weights`` (uniform by default), shuffled with the seed.
    ``stain_shift`` scales how far this site's stain profile departs from the reference one.
    Rendered patches are cached in memory (``size**2 * 3`` bytes each).
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 32,
        site: int = 0,
        split: str = "train",
        seed: int = 0,
        stain_shift: float = 1.0,
        class_weights: tuple[float, ...] | None = None,
        mix_probability: float = 0.6,
        cache: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if num_samples < 1 or image_size < 8:
            raise ValueError("num_samples must be >= 1 and image_size >= 8")
        self.class_names = CLASS_NAMES
        self.image_size = int(image_size)
        self.site, self.split, self.seed = int(site), split, int(seed)
        self.mix_probability = float(mix_probability)
        self.profile = site_profile(self.site, self.seed, float(stain_shift))
        weights = np.ones(len(CLASS_NAMES)) if class_weights is None else np.asarray(class_weights, float)
        if weights.shape != (len(CLASS_NAMES),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"class_weights needs {len(CLASS_NAMES)} non-negative values")
        counts = np.floor(weights / weights.sum() * num_samples).astype(int)
        counts[np.argsort(-weights)[: num_samples - counts.sum()]] += 1
        label_rng = np.random.default_rng([self.seed, self.site, SPLITS[split], 0])
        self.labels = label_rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), counts))
        self._cache = (
            np.zeros((num_samples, image_size, image_size, 3), np.uint8) if cache else None
        )
        self._cached = np.zeros(num_samples, bool)

    def load_uint8(self, index: int) -> np.ndarray:
        if self._cache is not None and self._cached[index]:
            return self._cache[index]
        rng = np.random.default_rng([self.seed, self.site, SPLITS[self.split], 1, index])
        patch = render_patch(int(self.labels[index]), self.image_size, rng, self.profile,
                             self.mix_probability)
        if self._cache is not None:
            self._cache[index] = patch
            self._cached[index] = True
        return patch
