"""Selective augmentation: which generated images may teach the classifier.

After a warm-up of ``warmup_steps`` local steps, a generated image of class ``y`` is kept when
(1) the classifier's confidence in ``y`` is at least ``confidence_threshold`` and (2) its trunk
feature lies within the ``distance_quantile`` of the distances of recent real images of class ``y``
to their class centroid. The centroid is a running (exponential) mean of real features, and the
distances of the last ``history`` real images per class are kept in a ring buffer. All of it is
the hospital's local state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SelectionConfig:
    """``conf/train/*.yaml``: ``selection``."""

    enabled: bool = True
    warmup_steps: int = 100
    confidence_threshold: float = 0.8
    distance_quantile: float = 0.9
    centroid_momentum: float = 0.95
    history: int = 256
    min_history: int = 8  # real distances a class needs before its fakes can be kept

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        if not 0.0 < self.distance_quantile <= 1.0:
            raise ValueError(f"distance_quantile must be in (0, 1], got {self.distance_quantile}")
        if not 0.0 <= self.centroid_momentum < 1.0:
            raise ValueError(f"centroid_momentum must be in [0, 1), got {self.centroid_momentum}")
        if self.history < 1 or self.min_history < 1 or self.min_history > self.history:
            raise ValueError("need 1 <= min_history <= history")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")


class SampleSelector:
    """Class centroids of real features and the keep/reject rule for generated images."""

    def __init__(self, num_classes: int, feature_dim: int, cfg: SelectionConfig) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.centroids = torch.zeros(num_classes, feature_dim)
        self.initialised = torch.zeros(num_classes, dtype=torch.bool)
        self.distances = torch.zeros(num_classes, cfg.history)
        self.filled = torch.zeros(num_classes, dtype=torch.long)  # total distances written per class
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the per-class proposed/accepted counts (called at the start of each round)."""
        self.proposed = torch.zeros(self.num_classes, dtype=torch.long)
        self.accepted = torch.zeros(self.num_classes, dtype=torch.long)

    @torch.no_grad()
    def update_real(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold labelled real features into the centroids and the distance history."""
        features, labels = features.detach().float().cpu(), labels.detach().cpu()
        m = self.cfg.centroid_momentum
        for c in labels.unique().tolist():
            if c < 0:
                continue
            feats = features[labels == c]
            mean = feats.mean(dim=0)
            if self.initialised[c]:
                self.centroids[c] = m * self.centroids[c] + (1.0 - m) * mean
            else:
                self.centroids[c] = mean
                self.initialised[c] = True
            dist = (feats - self.centroids[c]).norm(dim=1)
            slots = (self.filled[c] + torch.arange(len(dist))) % self.cfg.history
            self.distances[c, slots] = dist
            self.filled[c] += len(dist)

    def distance_threshold(self, c: int) -> float | None:
        """The class's quantile of real distances, or None without enough history."""
        count = int(min(self.filled[c].item(), self.cfg.history))
        if count < self.cfg.min_history or not self.initialised[c]:
            return None
        return float(torch.quantile(self.distances[c, :count], self.cfg.distance_quantile))

    @torch.no_grad()
    def select(self, features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        """Boolean mask of the generated images to keep; counts them per class."""
        features, probs, labels = features.detach().float().cpu(), probs.detach().float().cpu(), labels.cpu()
        keep = torch.zeros(len(labels), dtype=torch.bool)
        self.proposed += torch.bincount(labels, minlength=self.num_classes)
        if not self.cfg.enabled or step < self.cfg.warmup_steps:
            return keep
        confident = probs.gather(1, labels.view(-1, 1)).squeeze(1) >= self.cfg.confidence_threshold
        for c in labels.unique().tolist():
            limit = self.distance_threshold(c)
            if limit is None:
                continue
            rows = labels == c
            near = (features - self.centroids[c]).norm(dim=1) <= limit
            keep |= rows & near & confident
        self.accepted += torch.bincount(labels[keep], minlength=self.num_classes)
        return keep

    def acceptance(self) -> list[float]:
        """Accepted / proposed per class since the last ``reset_counters`` (0 where none proposed)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted.tolist(), self.proposed.tolist())]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "centroids": self.centroids.clone(),
            "initialised": self.initialised.clone(),
            "distances": self.distances.clone(),
            "filled": self.filled.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        for key, value in expected.items():
            if key not in state:
                raise KeyError(f"selection state lacks {key!r}")
            if tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(f"selection state {key!r}: shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
        self.centroids = state["centroids"].clone().float()
        self.initialised = state["initialised"].clone().bool()
        self.distances = state["distances"].clone().float()
        self.filled = state["filled"].clone().long()
