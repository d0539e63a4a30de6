"""Haematoxylin-eosin-DAB (HED) colour space: Beer-Lambert rendering and per-site stain shifts.

Optical density of a pixel is ``OD = c @ M`` where ``c`` holds the three stain concentrations and
``M`` the stains' unit absorbance vectors (rows H, E, D; Ruifrok & Johnston 2001, the matrix
scikit-image uses). Transmitted light is ``I = I0 * exp(-OD)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Reference absorbance vectors (rows: haematoxylin, eosin, DAB; columns: R, G, B).
REFERENCE_STAINS = np.array(
    [
        [0.65, 0.70, 0.29],
        [0.07, 0.99, 0.11],
        [0.27, 0.57, 0.78],
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class StainProfile:
    """How one hospital's scanner and staining protocol turn concentrations into colour."""

    stains: np.ndarray  # (3, 3) absorbance rows, each of unit norm
    concentration_scale: np.ndarray  # (3,) multiplies H, E, D concentrations
    illumination: np.ndarray  # (3,) white level per RGB channel, in (0, 1]

    def render(self, concentrations: np.ndarray) -> np.ndarray:
        """Concentrations ``(..., 3)`` -> RGB floats in [0, 1] with the same leading shape."""
        od = (concentrations * self.concentration_scale) @ self.stains
        return np.clip(self.illumination * np.exp(-od), 0.0, 1.0)


def reference_profile() -> StainProfile:
    """The unperturbed stain profile."""
    stains = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=1, keepdims=True)
    return StainProfile(stains, np.ones(3), np.ones(3))


def site_profile(site: int, seed: int, strength: float) -> StainProfile:
    """A hospital's stain profile: the reference one perturbed, deterministically per (site, seed).

    ``strength`` 0 gives the reference profile for every site; 1 gives shifts of the size seen
    between labs (stain vectors turned by a few degrees, +-20 % stain intensity, a tinted white).
    """
    if strength == 0.0:
        return reference_profile()
    rng = np.random.default_rng([seed, 7919, site])
    stains = REFERENCE_STAINS + strength * rng.normal(0.0, 0.06, size=(3, 3))
    stains = np.abs(stains)
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    scale = 1.0 + strength * rng.uniform(-0.2, 0.2, size=3)
    illumination = 1.0 - strength * rng.uniform(0.0, 0.08, size=3)
    return StainProfile(stains, scale, illumination)
