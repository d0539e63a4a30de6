"""The frozen trunk adapted on the generator's images (``train.trunk_adaptation``, DP with a frozen trunk).

Under DP-SGD with ``privacy.freeze_trunk`` the trunk stays at its public prior (random-process
images) and the private head is a linear probe of it; at epsilon 8 that probe is close to what its
features allow, so a generator can only help by giving it better features. The generator's images
are free: it learns from patches only through the private discriminator, so they are post-processing
of DP outputs. Each time a trainer is built (every federated round), before any step, the trunk
takes ``steps`` more SimCLR steps (the prior's loss and views; common/model/prior/pretrain.py) on
images of the received global generator. Everything it reads is the received global model and
public randomness (``seed``), so every hospital holding the same global model computes the same
trunk, and the epsilon does not change.

The hospitals' released head centre (``model.classifier_centre``) was measured through the trunk
before; it moves by the change of the mean feature of the same generated images through the trunk
before and after (a free estimate: no patch is read again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from common.config import defaults_from_conf
from common.model.discriminator import ViTTrunk
from common.model.prior.pretrain import augmented_view, nt_xent
from common.train.whitening import free_images

if TYPE_CHECKING:
    from common.model.unified import UnifiedViTGAN


@dataclass(frozen=True)
@defaults_from_conf("train/default.yaml", "trunk_adaptation")
class TrunkAdaptationConfig:
    """``conf/train/*.yaml``: ``trunk_adaptation`` (read only under DP with ``privacy.freeze_trunk``)."""

    steps: int  # SimCLR steps each time a trainer is built (0: off)
    batch_size: int  # images per step (two views each)
    images: int  # generated images per refresh, the pool each step samples from
    learning_rate: float  # AdamW, constant
    weight_decay: float
    temperature: float  # NT-Xent's softmax temperature
    seed: int  # of the images, views and projection: public randomness, the same at every hospital

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "images"):
            if int(getattr(self, key)) < 0 or (key != "steps" and int(getattr(self, key)) < 2):
                raise ValueError(f"train.trunk_adaptation.{key} must be >= {0 if key == 'steps' else 2}, "
                                 f"got {getattr(self, key)}")
        if not float(self.learning_rate) > 0.0:
            raise ValueError(f"train.trunk_adaptation.learning_rate must be > 0, got {self.learning_rate}")
        if not float(self.temperature) > 0.0:
            raise ValueError(f"train.trunk_adaptation.temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return int(self.steps) > 0


@torch.no_grad()
def _mean_inputs(model: UnifiedViTGAN, trunk: nn.Module, images: torch.Tensor, chunk: int = 250) -> torch.Tensor:
    """The mean of what the head reads (before its centre) over ``images``, through ``trunk``."""
    head = model.classifier
    total = torch.zeros(model.cfg.classifier_features, dtype=torch.float64, device=images.device)
    for i in range(0, len(images), chunk):
        total += head.inputs(trunk(images[i:i + chunk])).double().sum(0)
    return total / len(images)


def adapt_trunk(model: UnifiedViTGAN, cfg: TrunkAdaptationConfig) -> float:
    """``cfg.steps`` SimCLR steps of the trunk on the model's generator's images, in place; the head
    centre, if set, moved with the generated images' mean feature. Returns the last step's loss."""
    if not cfg.enabled:
        raise ValueError("train.trunk_adaptation.steps is 0: nothing to adapt")
    trunk = model.discriminator.trunk
    device = next(trunk.parameters()).device
    generator = torch.Generator().manual_seed(int(cfg.seed))
    with torch.no_grad():
        images = free_images(model, "generator", int(cfg.images), generator)
    # A separate copy trains: the model's trunk may carry DP-SGD's per-sample hooks and frozen parameters.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        copy = ViTTrunk(model.cfg).to(device)
        dim = model.cfg.embed_dim
        projection = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim)).to(device)
    copy.load_state_dict(trunk.state_dict())
    copy.train()
    optimiser = torch.optim.AdamW([*copy.parameters(), *projection.parameters()], lr=float(cfg.learning_rate),
                                  weight_decay=float(cfg.weight_decay))
    batch = int(cfg.batch_size)
    loss = torch.zeros(())
    for _ in range(int(cfg.steps)):
        chosen = images[torch.randint(0, len(images), (batch,), generator=generator).to(device)]
        views = torch.cat([augmented_view(chosen.cpu(), generator), augmented_view(chosen.cpu(), generator)]).to(device)
        embedded = projection(copy(views).features)
        loss = nt_xent(embedded[:batch], embedded[batch:], float(cfg.temperature))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    copy.eval()
    was_training = trunk.training
    trunk.eval()
    head = model.classifier
    centred = bool(getattr(head, "centred", False)) and float(head.centre_ready.max()) >= 0.5
    before = _mean_inputs(model, trunk, images) if centred else None
    with torch.no_grad():
        for name, value in copy.state_dict().items():
            trunk.state_dict()[name].copy_(value)
    if before is not None:
        shift = _mean_inputs(model, trunk, images) - before
        with torch.no_grad():
            head.input_centre.add_(shift.to(head.input_centre.dtype))
    trunk.train(was_training)
    return float(loss.detach())
