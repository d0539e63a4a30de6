"""Selective augmentation: which images may teach the classifier a label it was not given.

One rule serves two kinds of candidates: generated images (their label is the class G was asked
for) and unlabelled real patches (their label is the classifier's own prediction, a pseudo-label).
After a warm-up of ``warmup_steps`` local steps, a candidate of class ``y`` is kept when

1. the classifier's confidence in ``y`` is at least the class's threshold: ``confidence_threshold``,
   or with ``adaptive`` a per-class threshold that is lower for classes the classifier is still
   learning (FlexMatch, Zhang et al. 2021: ``tau * M(beta_c)`` with ``M(x) = x / (2 - x)`` and
   ``beta_c`` the class's recent pass rate over the best class's, never below
   ``adaptive_floor * tau``), and
2. with ``centroid_distance``, its trunk feature lies within the ``distance_quantile`` of the
   distances of recent labelled real patches of class ``y`` to their class centroid (a running
   exponential mean of real features; the last ``history`` distances per class are kept).

``mode`` switches the rule: ``rule`` (the above), ``all`` (every candidate after the warm-up) or
``none`` (no candidate ever). All of it is the hospital's local state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import defaults_from_conf

SELECTION_MODES = ("rule", "all", "none")
#: What a selected loss is averaged over (``SelectionConfig.loss_over``).
LOSS_NORMALISATIONS = ("kept", "candidates")


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "selection")
class SelectionConfig:
    """``conf/train/*.yaml``: ``selection`` (generated images) and ``pseudo_label`` (unlabelled reals)."""

    mode: str
    warmup_steps: int
    confidence_threshold: float
    adaptive: bool
    adaptive_floor: float  # an adaptive threshold never falls below this fraction of the fixed one
    adaptive_momentum: float  # exponential mean of each class's pass rate
    centroid_distance: bool
    distance_quantile: float
    centroid_momentum: float
    history: int
    min_history: int  # real distances a class needs before its candidates can be kept
    # What the kept candidates' cross-entropy is averaged over: the kept rows alone, or every
    # candidate of the step (FixMatch's normalisation: the loss grows as more candidates pass).
    loss_over: str

    def __post_init__(self) -> None:
        if self.loss_over not in LOSS_NORMALISATIONS:
            raise ValueError(f"loss_over must be one of {LOSS_NORMALISATIONS}, got {self.loss_over!r}")
        if self.mode not in SELECTION_MODES:
            raise ValueError(f"mode must be one of {SELECTION_MODES}, got {self.mode!r}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        if not 0.0 < self.distance_quantile <= 1.0:
            raise ValueError(f"distance_quantile must be in (0, 1], got {self.distance_quantile}")
        if not 0.0 <= self.centroid_momentum < 1.0:
            raise ValueError(f"centroid_momentum must be in [0, 1), got {self.centroid_momentum}")
        if not 0.0 <= self.adaptive_momentum < 1.0:
            raise ValueError(f"adaptive_momentum must be in [0, 1), got {self.adaptive_momentum}")
        if not 0.0 <= self.adaptive_floor <= 1.0:
            raise ValueError(f"adaptive_floor must be in [0, 1], got {self.adaptive_floor}")
        if self.history < 1 or self.min_history < 1 or self.min_history > self.history:
            raise ValueError("need 1 <= min_history <= history")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")

    @property
    def enabled(self) -> bool:
        """Whether any candidate can ever be kept."""
        return self.mode != "none"


class SampleSelector:
    """Class centroids of real features, per-class pass rates, and the keep/reject rule."""

    def __init__(self, num_classes: int, feature_dim: int, cfg: SelectionConfig) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.centroids = torch.zeros(num_classes, feature_dim)
        self.initialised = torch.zeros(num_classes, dtype=torch.bool)
        self.distances = torch.zeros(num_classes, cfg.history)
        self.filled = torch.zeros(num_classes, dtype=torch.long)  # total distances written per class
        self.pass_rate = torch.zeros(num_classes)  # exponential mean of each class's confident fraction
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

    def thresholds(self) -> torch.Tensor:
        """Each class's confidence threshold (fixed, or adaptive from the recent pass rates)."""
        tau = self.cfg.confidence_threshold
        best = float(self.pass_rate.max())
        if not self.cfg.adaptive or best <= 0.0:
            return torch.full((self.num_classes,), tau)
        beta = self.pass_rate / best
        return tau * torch.clamp(beta / (2.0 - beta), min=self.cfg.adaptive_floor)

    @torch.no_grad()
    def _update_pass_rate(self, confidence: torch.Tensor, labels: torch.Tensor) -> None:
        m = self.cfg.adaptive_momentum
        passed = (confidence >= self.cfg.confidence_threshold).float()
        for c in labels.unique().tolist():
            rows = labels == c
            self.pass_rate[c] = m * self.pass_rate[c] + (1.0 - m) * passed[rows].mean()

    @torch.no_grad()
    def select(self, features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        """Boolean mask of the candidates to keep; counts them per class.

        ``labels`` is each candidate's class: the conditioning label of a generated image, or the
        predicted class of an unlabelled patch.
        """
        features, probs, labels = features.detach().float().cpu(), probs.detach().float().cpu(), labels.cpu()
        keep = torch.zeros(len(labels), dtype=torch.bool)
        self.proposed += torch.bincount(labels, minlength=self.num_classes)
        confidence = probs.gather(1, labels.view(-1, 1)).squeeze(1)
        if self.cfg.adaptive:
            self._update_pass_rate(confidence, labels)
        if self.cfg.mode == "none" or step < self.cfg.warmup_steps:
            return keep
        if self.cfg.mode == "all":
            keep[:] = True
        else:
            keep = confidence >= self.thresholds()[labels]
            if self.cfg.centroid_distance:
                near = torch.zeros_like(keep)
                for c in labels.unique().tolist():
                    limit = self.distance_threshold(c)
                    if limit is None:
                        continue
                    rows = labels == c
                    near[rows] = (features[rows] - self.centroids[c]).norm(dim=1) <= limit
                keep &= near
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
            "pass_rate": self.pass_rate.clone(),
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
        self.pass_rate = state["pass_rate"].clone().float()
