"""The plain round's strategy: the hospital's shuffled batches, ordinary gradients, exact counts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from client.local_run import LocalRun, SavedLocal
from client.round_strategy import RoundRelease
from common.config import ConfigError
from common.data.sites import SiteData
from common.model import UnifiedViTGAN
from common.seeds import batch_seed, round_stream
from common.train import RoundMetrics
from common.train.config import TrainConfig
from common.train.streams import training_batches


class PlainRound:
    """Training without DP (``privacy.enabled: false``)."""

    def train_config(self, train: TrainConfig) -> TrainConfig:
        return train

    def before_training(self, local: LocalRun, data: SiteData, saved: SavedLocal | None, train: TrainConfig) -> None:
        if len(data.train) < 2:
            raise ConfigError(f"{local.site.name}: {len(data.train)} training patches; need at least 2")

    def gradients(self, local: LocalRun, model: UnifiedViTGAN) -> None:
        return None

    def batches(self, local: LocalRun, data: SiteData, train: TrainConfig) -> Iterable[Any]:
        seed = batch_seed(local.config.seed, round_stream(local.site.site_id, local.server_round))
        return training_batches(data.train, train, seed=seed, pin_memory=torch.device(local.site.device).type == "cuda")

    def release(self, local: LocalRun, data: SiteData, metrics: RoundMetrics) -> RoundRelease:
        return RoundRelease({k: float(v) for k, v in metrics.as_flat_dict().items()}, len(data.train),
                            int((data.train.labels >= 0).sum()), {}, data)
