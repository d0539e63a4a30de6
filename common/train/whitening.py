"""The classification head's input whitening from free images (``model.classifier_whitening``).

A frozen trunk's features are strongly correlated: a few directions carry most of their variance.
Under DP-SGD the head is a linear probe whose per-patch gradient ``(p - y) x^T`` is clipped as a
whole and noised in every coordinate, so the few large directions take most of the clipping bound
and the noise drowns the rest. Whitening the head's input by the features' covariance spreads the
bound evenly (measured on the digits at epsilon 8: docs/results.md).

The covariance comes from images that cost nothing to the privacy budget, never from a hospital's
patches:

- the unified model (``train.method`` trains the generator): half the received global generator's
  own images, balanced over the classes, and half random-process images, their covariances averaged
  at equal trace. The generator learns from real patches only through the private discriminator,
  so its images are post-processing of DP outputs;
- otherwise (the plain classifier has no trained generator): random-process images, the public
  images the trunk prior learnt from (common/model/prior/random_images.py).

``train.whitening.source`` is ``auto`` (the rule above) by default; ``generator``, ``random_process``
or ``mixed`` pick a source whatever the method.

The matrix is refreshed each time a trainer is built (every federated round; once in a centralised
run), from ``train.whitening.seed``. Its eigenvalue floor is a share of the largest eigenvalue; under
DP-SGD it grows with the hospital's noise multiplier (``WhiteningConfig.floor``). Hospitals of
different sizes calibrate different noise for one epsilon, so each trains in its own matrix
(``HeadWhitenings.local``) and expresses its head, before it leaves, in the matrix at the fixed floor
(``shared``), which every hospital holding the same global model computes alike: FedAvg averages heads
expressed in the same coordinates. Each change of matrix rewrites the head's weight so that the
model's function does not change (``W A = W' A'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.config import defaults_from_conf
from common.model.prior.random_images import random_process_images

if TYPE_CHECKING:
    from common.model.unified import UnifiedViTGAN


#: ``train.whitening.source``: auto (mixed when the training method trains the generator,
#: random-process images otherwise), generator or random_process alone, or mixed (half of each,
#: their covariances averaged at equal trace).
WHITENING_SOURCES = ("auto", "generator", "random_process", "mixed")


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "whitening")
class WhiteningConfig:
    """``conf/train/*.yaml``: ``whitening`` (read only with ``model.classifier_whitening``)."""

    images: int  # free images per refresh
    shrinkage: float  # eigenvalue floor without DP-SGD (a fraction of the largest eigenvalue), and the shared matrix's
    noise_shrinkage: float  # under DP-SGD: floor = clamp(noise_shrinkage * sigma^3, noise_shrinkage_min, 1); 0: off
    noise_shrinkage_min: float  # the lowest floor the noise rule gives
    seed: int  # of the free images: public randomness, the same at every hospital
    source: str  # auto | generator | random_process | mixed (see WHITENING_SOURCES)

    def __post_init__(self) -> None:
        if self.source not in WHITENING_SOURCES:
            raise ValueError(f"train.whitening.source must be one of {WHITENING_SOURCES}, got {self.source!r}")
        if self.images < 2:
            raise ValueError(f"train.whitening.images must be >= 2, got {self.images}")
        if not 0.0 < float(self.shrinkage) <= 1.0:
            raise ValueError(f"train.whitening.shrinkage must be in (0, 1], got {self.shrinkage}")
        if not float(self.noise_shrinkage) >= 0.0:
            raise ValueError(f"train.whitening.noise_shrinkage must be >= 0 (0: off), got {self.noise_shrinkage}")
        if not 0.0 < float(self.noise_shrinkage_min) <= 1.0:
            raise ValueError(f"train.whitening.noise_shrinkage_min must be in (0, 1], got {self.noise_shrinkage_min}")

    def floor(self, noise_multiplier: float | None) -> float:
        """The eigenvalue floor, a fraction of the largest eigenvalue. Without DP-SGD (``noise_multiplier``
        None) or with the noise rule off, ``shrinkage``. Under DP-SGD it grows with the noise: the noise
        is the same in every whitened direction, so the weak directions the whitening stretches carry the
        most noise for their signal, and the floor caps that stretch the way a ridge penalty grows with the
        noise variance. ``clamp(noise_shrinkage * sigma^3, noise_shrinkage_min, 1)``: measured on validation
        at noise multipliers 0.8 to 6.3, on fresh seeds wherever it differs from the fixed floor (docs/results.md)."""
        if noise_multiplier is None or float(self.noise_shrinkage) == 0.0:
            return float(self.shrinkage)
        if not float(noise_multiplier) >= 0.0:
            raise ValueError(f"the whitening floor needs a noise multiplier >= 0, got {noise_multiplier}")
        rule = float(self.noise_shrinkage) * float(noise_multiplier) ** 3
        return min(1.0, max(float(self.noise_shrinkage_min), rule))

    def floor_rule(self) -> str:
        """The floor rule in one line, the same for equal settings: what a reference cost's recipe and the
        privacy report name (the shared matrix's floor is ``shrinkage`` either way)."""
        if float(self.noise_shrinkage) == 0.0:
            return f"{float(self.shrinkage):g}"
        return (f"clamp({float(self.noise_shrinkage):g} sigma^3, {float(self.noise_shrinkage_min):g}, 1) under DP-SGD, "
                f"shared {float(self.shrinkage):g}")

    def sources(self, trains_generator: bool) -> tuple[str, ...]:
        """The free images' sources, ``generator`` and/or ``random_process`` (``auto``: both when the
        training method trains the generator: its images alone, recomputed each round from a generator
        still poor in the early rounds, cost the synthetic patches 2 points under DP; docs/results.md).
        A generator that is never trained has nothing to give, and fewer than 2 images per source
        make no covariance: both refused (``ValueError``)."""
        if self.source in ("generator", "mixed") and not trains_generator:
            raise ValueError(f"train.whitening.source={self.source} needs a train.method that trains the generator "
                             "(an untrained generator's images carry nothing): use auto or random_process")
        if self.source == "mixed" or (self.source == "auto" and trains_generator):
            sources: tuple[str, ...] = ("generator", "random_process")
        elif self.source == "generator":
            sources = ("generator",)
        else:
            sources = ("random_process",)
        if self.images_each(sources) < 2:
            raise ValueError(f"train.whitening.images={self.images} gives each of its {len(sources)} sources "
                             f"({', '.join(sources)}) {self.images_each(sources)} image: a covariance needs at "
                             f"least 2 per source; set train.whitening.images >= {2 * len(sources)}")
        return sources

    def images_each(self, sources: Sequence[str]) -> int:
        """How many images each of ``sources`` gives: ``images`` shared equally."""
        return self.images // len(sources)


def free_images(model: UnifiedViTGAN, source: str, count: int, generator: torch.Generator,
                chunk: int = 250) -> torch.Tensor:
    """``count`` images that cost no privacy budget, on the model's device: the generator's (classes
    in turn; ``source="generator"``) or random-process images (``"random_process"``)."""
    device = next(model.parameters()).device
    if source == "random_process":
        return random_process_images(count, model.cfg.image_size, generator).to(device)
    labels = torch.arange(count, device=device) % model.num_classes
    return torch.cat([model.generate(labels[i:i + chunk], generator) for i in range(0, count, chunk)])


def whitening_matrix(features: torch.Tensor | Sequence[torch.Tensor], shrinkage: float) -> torch.Tensor:
    """The symmetric ``(Sigma + s lambda_max I)^(-1/2)`` of ``features`` (rows), scaled so that the
    mean norm of the centred rows is unchanged (the clipping bound keeps its meaning). Several sets:
    each centred on its own mean, Sigma the mean of their covariances scaled to equal trace."""
    (matrix,) = whitening_matrices(features, (shrinkage,))
    return matrix


def whitening_matrices(features: torch.Tensor | Sequence[torch.Tensor], shrinkages: Sequence[float]) -> list[torch.Tensor]:
    """:func:`whitening_matrix` at each of ``shrinkages``, from one covariance and one eigendecomposition."""
    sets = [features] if isinstance(features, torch.Tensor) else list(features)
    centred = [f.double() - f.double().mean(0) for f in sets]
    covariances = [c.T @ c / len(c) for c in centred]
    covariance = sum(c / c.trace().clamp(min=1e-300) for c in covariances) / len(covariances)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp(min=0.0)
    rows = torch.cat(centred)
    matrices = []
    for shrinkage in shrinkages:
        floor = shrinkage * float(eigenvalues.max())
        if floor <= 0.0:
            raise ValueError("the free images' features do not vary: no whitening can be derived from them")
        inverse_root = eigenvectors @ torch.diag((eigenvalues + floor).rsqrt()) @ eigenvectors.T
        scale = rows.norm(dim=1).mean() / (rows @ inverse_root).norm(dim=1).mean()
        matrices.append((inverse_root * scale).float())
    return matrices


@dataclass(frozen=True)
class HeadWhitenings:
    """The two matrices of one refresh. ``shared``: at the fixed floor (``shrinkage``), the same at every
    hospital holding the same global model; the head is expressed in it whenever it may leave the
    hospital, so FedAvg averages heads in the same coordinates. ``local``: at the floor the hospital's
    own noise multiplier sets (``WhiteningConfig.floor``); its training steps use it. Hospitals of
    different sizes calibrate different noise for one epsilon, so their ``local`` matrices differ.
    Without DP, or where the two floors agree, ``local`` is ``shared`` (the same tensor) and nothing switches."""

    shared: torch.Tensor
    local: torch.Tensor


@torch.no_grad()
def express_head_in(model: UnifiedViTGAN, whitening: torch.Tensor) -> None:
    """Set the head's ``input_whitening`` to ``whitening``, rewriting the head's weight so that the
    model computes the same function as before (``W A = W' A'``, both matrices symmetric)."""
    head = model.classifier
    old = head.input_whitening
    new = whitening.to(old.device)
    weight = head.head.weight
    weight.copy_(torch.linalg.solve(new.double(), (weight.double() @ old.double()).T).T.to(weight.dtype))
    old.copy_(new)


@torch.no_grad()
def refresh_whitening(model: UnifiedViTGAN, sources: Sequence[str], cfg: WhiteningConfig, chunk: int = 250,
                      noise_multiplier: float | None = None) -> HeadWhitenings:
    """Compute the head's whitening from free images (``cfg.images``, shared equally by the ``sources``)
    and express the head in the ``shared`` matrix (the model's function does not change). ``noise_multiplier``:
    the hospital's DP-SGD sigma, which sets the ``local`` matrix's floor (``cfg.floor``)."""
    head = model.classifier
    generator = torch.Generator().manual_seed(int(cfg.seed))
    features = []
    for source in sources:
        images = free_images(model, source, cfg.images_each(sources), generator, chunk)
        features.append(torch.cat([head.inputs(model.discriminator.trunk(images[i:i + chunk]))
                                   for i in range(0, len(images), chunk)]))
    floor = cfg.floor(noise_multiplier)
    floors = (float(cfg.shrinkage),) if floor == float(cfg.shrinkage) else (float(cfg.shrinkage), floor)
    matrices = [m.to(head.input_whitening.device) for m in whitening_matrices(features, floors)]
    shared, local = matrices[0], matrices[-1]  # one tensor where the two floors agree
    express_head_in(model, shared)
    return HeadWhitenings(shared=shared, local=local)
