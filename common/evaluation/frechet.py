"""Generator quality: Frechet distances between real and generated patches.

- In a fixed feature space: the CLS features of a reference classifier (a tiny ViT trained once on the
  fully labelled synthetic histology set and shipped with the code, ``reference_classifier.safetensors``;
  nothing is downloaded). Images of another size are resized to the reference's 32 px, so on real
  data sets the figure is a coarse, not a calibrated, distance.
- In stain space: each patch's mean and standard deviation of haematoxylin, eosin and DAB optical
  density (colour deconvolution with the Ruifrok-Johnston matrix), a 6-number summary per patch.

``frechet_distance`` is ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` of the two sets' means
and covariances (Heusel et al. 2017, the FID formula), computed with symmetric eigen-decompositions.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from common.config import dataclass_from_mapping
from common.data.stain import REFERENCE_STAINS
from common.model import ModelConfig, UnifiedViTGAN, build_model

#: Trunk + head weights; the safetensors metadata holds their model config and class count.
REFERENCE_WEIGHTS = Path(__file__).resolve().parent / "reference_classifier.safetensors"


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _moments(x: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if weights is None:
        return x.mean(0), np.cov(x, rowvar=False)
    w = np.asarray(weights, np.float64) / np.sum(weights)
    mean = w @ x
    centred = x - mean
    return mean, (centred * w[:, None]).T @ centred / (1.0 - np.sum(w * w))


def frechet_distance(a: np.ndarray, b: np.ndarray, weights_a: np.ndarray | None = None) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b`` (N, D); each set needs >= 2 rows.

    ``weights_a`` weighs the rows of ``a`` (e.g. to balance its classes); None weighs them equally.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) arrays of equal D, got {a.shape} and {b.shape}")
    (mu_a, cov_a), (mu_b, cov_b) = _moments(a, weights_a), _moments(b, None)
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)
    return max(value, 0.0)


def stain_statistics(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> (N, 6): mean and std of each HED optical-density channel."""
    rgb = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).clamp(min=1.0 / 255.0)
    od = -torch.log(rgb).permute(0, 2, 3, 1).reshape(len(images), -1, 3)  # (N, pixels, RGB)
    stains = torch.as_tensor(REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=1, keepdims=True),
                             dtype=torch.float32)
    hed = od @ torch.linalg.inv(stains)  # OD = c @ M  =>  c = OD @ M^-1
    return torch.cat([hed.mean(dim=1), hed.std(dim=1)], dim=1).numpy()


@lru_cache(maxsize=1)
def reference_classifier(path: str = str(REFERENCE_WEIGHTS)) -> UnifiedViTGAN:
    """The frozen reference classifier (trunk + head), loaded once per process."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference classifier weights not found: {path}; rebuild them with "
                                f"python -m simulations.experiments.reference")
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
    cfg = dataclass_from_mapping(ModelConfig, json.loads(meta["model"]), f"{path} metadata 'model'")
    model = build_model(cfg, int(meta["num_classes"]), seed=0)
    state = load_file(path)
    model.discriminator.trunk.load_state_dict(
        {k[len("discriminator.trunk."):]: v for k, v in state.items() if k.startswith("discriminator.trunk.")})
    model.classifier.load_state_dict({k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")})
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@torch.no_grad()
def reference_features(images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> (N, D) reference-classifier features."""
    model = reference_classifier()
    size = model.cfg.image_size
    out = []
    for chunk in images.split(batch_size):
        chunk = chunk.detach().float().cpu()
        if chunk.shape[-1] != size:
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(model.trunk(chunk).features.numpy())
    return np.concatenate(out)


def class_balancing_weights(labels: np.ndarray) -> np.ndarray:
    """Row weights that give every class present in ``labels`` the same total weight."""
    labels = np.asarray(labels)
    counts = {c: int(np.sum(labels == c)) for c in np.unique(labels)}
    return np.array([1.0 / counts[c] for c in labels])


def generator_quality(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
                      class_names: tuple[str, ...]) -> dict[str, object]:
    """Frechet distances of real and generated patches, over the classes both sets have (>= 2 of each):
    per class, overall (real patches class-balanced, like the generated ones) and of stain statistics."""
    real_labels, fake_labels = real_labels.cpu().numpy(), fake_labels.cpu().numpy()
    shared = [c for c in range(len(class_names)) if (real_labels == c).sum() >= 2 and (fake_labels == c).sum() >= 2]
    if not shared:
        raise ValueError("real and generated patches share no class with at least 2 patches each")
    real_rows, fake_rows = np.isin(real_labels, shared), np.isin(fake_labels, shared)
    real_features, fake_features = reference_features(real[real_rows]), reference_features(fake[fake_rows])
    real_labels, fake_labels = real_labels[real_rows], fake_labels[fake_rows]
    balance = class_balancing_weights(real_labels)
    per_class = {class_names[c]: frechet_distance(real_features[real_labels == c], fake_features[fake_labels == c])
                 for c in shared}
    stains_real, stains_fake = stain_statistics(real[real_rows]), stain_statistics(fake[fake_rows])
    return {
        "frechet_overall": frechet_distance(real_features, fake_features, balance),
        "frechet_per_class": per_class,
        "stain_frechet": frechet_distance(stains_real, stains_fake, balance),
    }
