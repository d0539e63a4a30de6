"""Generator quality of a trained run: each hospital's generator against its own held-out patches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.data.sites import SiteData
from common.evaluation.frechet import generator_quality
from common.model import UnifiedViTGAN
from common.seeds import site_seed


def _images(site: SiteData) -> tuple[torch.Tensor, torch.Tensor]:
    items = [site.test[i] for i in range(len(site.test))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@torch.no_grad()
def site_generator_quality(sites: Sequence[SiteData], models: Sequence[UnifiedViTGAN], per_class: int,
                           seed: int) -> dict[str, object]:
    """Frechet distances (``common.evaluation.frechet``) of each site's generator against the site's
    test patches, averaged over sites (per class: over the sites that have the class)."""
    reports = []
    for k, (site, model) in enumerate(zip(sites, models)):
        real, real_labels = _images(site)
        labels = torch.arange(model.num_classes).repeat_interleave(per_class)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        fake = model.generate(labels.to(device), torch.Generator().manual_seed(site_seed(seed, k))).cpu()
        model.train(was_training)
        reports.append(generator_quality(real, real_labels, fake, labels, site.class_names))
    names = sorted({name for r in reports for name in r["frechet_per_class"]})  # type: ignore[union-attr]
    return {
        "frechet_overall": float(np.mean([r["frechet_overall"] for r in reports])),
        "frechet_per_class": {n: float(np.mean([r["frechet_per_class"][n] for r in reports  # type: ignore[index]
                                                if n in r["frechet_per_class"]])) for n in names},  # type: ignore[operator]
        "stain_frechet": float(np.mean([r["stain_frechet"] for r in reports])),
        "samples_per_class": per_class,
    }
