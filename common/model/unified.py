"""The unified ViT cGAN-classifier and its three parameter groups.

State-dict keys start with the group they belong to: ``generator.``, ``discriminator.`` (trunk,
adversarial head, projection embedding) or ``classifier.`` (classification head). The server
aggregates each group on its own; every entry, buffers included, is in exactly one group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from common.model.config import ModelConfig
from common.model.discriminator import ClassifierHead, ProjectionDiscriminator, TrunkOutput
from common.model.generator import ViTGenerator
from common.model.prior.store import load_trunk_prior

GROUPS: tuple[str, ...] = ("generator", "discriminator", "classifier")

V = TypeVar("V")

#: Buffers every hospital derives by a fixed rule instead of learning them: the head's released
#: centre, its readiness flag and its input whitening. Their change in a round is (near) the same
#: at every hospital, so update clipping bounds them apart from the learnt weights: counted with
#: the weights they would set the clipping threshold and hide a learnt outlier, and a clipped
#: hospital's whitening would be scaled with its weights.
DERIVED_STATE: frozenset[str] = frozenset({"classifier.input_centre", "classifier.centre_ready",
                                           "classifier.input_whitening"})


def is_derived_state(key: str) -> bool:
    """Whether a state-dict key is a derived buffer (``DERIVED_STATE``), not a learnt weight."""
    return key in DERIVED_STATE


def group_of(key: str) -> str:
    """The group of a state-dict key; raises KeyError for a key outside every group."""
    group = key.split(".", 1)[0]
    if group not in GROUPS:
        raise KeyError(f"state-dict key {key!r} belongs to no group {GROUPS}")
    return group


def group_entries(state: Mapping[str, V], groups: Iterable[str]) -> dict[str, V]:
    """The entries of ``state`` (a state dict, or arrays under its keys) in the given groups, keys
    unchanged and in ``state``'s order; entries of other groups are left out."""
    wanted = tuple(f"{g}." for g in groups)
    return {k: v for k, v in state.items() if k.startswith(wanted)}


def split_groups(state: Mapping[str, V]) -> dict[str, dict[str, V]]:
    """``state`` split into its groups (every group present, keys unchanged, ``state``'s order).

    The one place a state dict is split by group prefix: the server's per-group records, the
    hospital's reply and its local groups all go through here or ``group_entries``.
    """
    for key in state:
        group_of(key)
    return {g: group_entries(state, (g,)) for g in GROUPS}


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x * scale + x.detach() * (1.0 - scale)


@dataclass
class DiscriminatorOutput:
    """One pass of images through the trunk and both heads."""

    score: torch.Tensor  # (B,) adversarial score with class projection
    logits: torch.Tensor  # (B, num_classes) classification head
    features: torch.Tensor  # (B, D) phi(x)


class UnifiedViTGAN(nn.Module):
    """Generator, projection discriminator and classification head in one module."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.generator = ViTGenerator(cfg, num_classes)
        self.discriminator = ProjectionDiscriminator(cfg, num_classes)
        self.classifier = ClassifierHead(cfg, num_classes)

    def trunk(self, images: torch.Tensor) -> TrunkOutput:
        return self.discriminator.trunk(images)

    def discriminate(self, images: torch.Tensor, labels: torch.Tensor, classifier_score: bool = False,
                     trunk_gradient_scale: float = 1.0) -> DiscriminatorOutput:
        """Adversarial score D(x, y), class logits C(phi(x)) and phi(x) from one trunk pass.

        With ``classifier_score`` the unconditional part of the score is ``log sum_k exp C_k(x)``
        instead of psi(phi(x)) (the semi-supervised GAN of Salimans et al. 2016: the classifier's
        K classes are the "real" classes, so every unlabelled patch teaches the classifier too).
        ``trunk_gradient_scale`` scales the gradient that flows from psi and the class projection
        back into the shared trunk (the forward values, and the gradients of psi, E and the head,
        are unchanged): 0 keeps the adversarial loss out of the trunk the classifier reads.
        """
        trunk = self.trunk(images)
        logits = self.classifier(trunk)
        unconditional = torch.logsumexp(logits, dim=1) if classifier_score else None
        features = scale_gradient(self.classifier.centred_features(trunk.features), trunk_gradient_scale)
        return DiscriminatorOutput(self.discriminator.score(features, labels, unconditional), logits,
                                   trunk.features)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of the deployed classifier C(phi(x))."""
        return self.classifier(self.trunk(images))

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images of the given classes in [-1, 1], with noise drawn from ``generator``."""
        z = torch.randn(len(labels), self.cfg.z_dim, generator=generator).to(labels.device)
        return self.generator(z, labels)

    def group_module(self, group: str) -> nn.Module:
        if group not in GROUPS:
            raise KeyError(f"unknown group {group!r}; groups: {GROUPS}")
        return getattr(self, group)


def build_model(cfg: ModelConfig, num_classes: int, seed: int | None = None) -> UnifiedViTGAN:
    """A freshly initialised model; with ``seed`` the initial weights are reproducible."""
    if seed is None:
        return UnifiedViTGAN(cfg, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UnifiedViTGAN(cfg, num_classes)


def initial_model(cfg: ModelConfig, num_classes: int, seed: int | None = None) -> UnifiedViTGAN:
    """The model a training run starts from: ``build_model``'s, its trunk replaced by the weights in
    ``cfg.trunk_prior`` when set. Only whoever makes the run's first weights calls this (the
    coordinator, an in-process run); a hospital receives them, so it needs no prior file."""
    model = build_model(cfg, num_classes, seed)
    if cfg.trunk_prior:
        trunk = model.discriminator.trunk
        trunk.load_state_dict(load_trunk_prior(cfg.trunk_prior, trunk))
    return model
