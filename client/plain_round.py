"""A training round without DP: the hospital's shuffled batches, the plain unified step."""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from client.local_run import LocalRun
from common.config import ConfigError
from common.seeds import batch_seed, round_stream
from common.train.streams import training_batches


def train_plain(local: LocalRun) -> RecordDict:
    """Local training on this round's global groups; the reply holds the shared groups and metrics."""
    data = local.data()
    tcfg = local.config.train
    saved = local.load_local()
    if len(data.train) < 2:
        raise ConfigError(f"{local.site.name}: {len(data.train)} training patches; need at least 2")
    model = local.loaded_model(data.train.num_classes)
    trainer = local.build_trainer(model, tcfg, data, saved, None)
    loader = training_batches(
        data.train, tcfg, seed=batch_seed(local.config.seed, round_stream(local.site.site_id, local.server_round)),
        pin_memory=torch.device(local.site.device).type == "cuda")
    metrics = local.run_steps(trainer, loader, tcfg.local_steps)
    flat = {k: float(v) for k, v in metrics.as_flat_dict().items()}
    return local.finish_round(trainer, model, saved, metrics, flat, len(data.train),
                              int((data.train.labels >= 0).sum()), {}, data)
