"""The DP-SGD round's strategy (``client.round_strategy``): released counts, plan, budget stop, one
recorded attempt, Poisson batches and private gradients.

Imported only when a message asks for ``privacy.enabled``: Opacus and the accountants stay out of
the hospital's process otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.local_run import LocalRun, SavedLocal
from client.policy import check_derived_noise, effective_max_epsilon, judged_delta, pre_release_delta
from client.round_strategy import RoundEnds, RoundRelease
from common import protocol
from common.data.sites import SiteData
from common.model import UnifiedViTGAN
from common.privacy.accounting import build_plan
from common.privacy.budget import (
    BudgetCheck,
    BudgetExhausted,
    SitePrivacy,
    attempts_from_json,
    attempts_to_json,
    private_train_config,
    releases_before_training,
    shared_train_metrics,
)
from common.privacy.centre import centre_entry, centre_pending, centre_radius, clipped_feature_sum, noisy_centre, set_centre
from common.privacy.config import PrivacyConfig, check_private_centre, check_private_training
from common.privacy.ledger import Attempt, PrivacyLedger, ReleasedCounts, dataset_fingerprint
from common.privacy.wiring import DPTraining, attempt_seed, secret_seed
from common.train import RoundMetrics
from common.train.config import TrainConfig

logger = logging.getLogger("fedvitgan.client")


class PrivateRound:
    """DP-SGD at a hospital under ``pcfg``: every attempt draws fresh randomness and is in the
    hospital's ledger before anything leaves."""

    def __init__(self, pcfg: PrivacyConfig) -> None:
        self.pcfg = pcfg
        self.privacy: SitePrivacy | None = None
        self.counts: ReleasedCounts | None = None
        self.check: BudgetCheck | None = None
        self.attempt: Attempt | None = None
        self.dp: DPTraining | None = None
        self.data: SiteData | None = None
        self.seed_for: Callable[[int], int] = lambda _attempt: secret_seed()

    def train_config(self, train: TrainConfig) -> TrainConfig:
        private = private_train_config(train, self.pcfg)
        check_private_training(private, self.pcfg)  # before anything is read or released
        return private

    def before_training(self, local: LocalRun, data: SiteData, saved: SavedLocal | None, train: TrainConfig) -> None:
        pcfg = self.pcfg
        centred = local.config.model.classifier_centre
        check_private_centre(centred, pcfg)  # before anything is read or released
        self.data = data
        self.privacy = privacy = _site_privacy(local, saved)
        if pcfg.seed is not None:
            self.seed_for = lambda attempt: attempt_seed(int(pcfg.seed), privacy.dataset, attempt, local.site.name)
        labelled = int((data.train.labels >= 0).sum())
        policy = local.site.policy
        max_epsilon, source = effective_max_epsilon(pcfg, policy)
        try:  # checked under the ledger's lock BEFORE the count release: nothing the budget cannot pay for
            self.counts = counts = privacy.release_counts(pcfg, len(data.train), labelled, self.seed_for,
                                                          (max_epsilon, pre_release_delta(pcfg.delta, policy), source))
        except BudgetExhausted as stop:
            metrics = {protocol.DP_BUDGET_EXHAUSTED: 1.0, protocol.DP_MAX_EPSILON: float(max_epsilon or 0.0)}
            if stop.check.would_be_epsilon is not None and math.isfinite(stop.check.would_be_epsilon):
                metrics[protocol.DP_WOULD_BE_EPSILON] = stop.check.would_be_epsilon
            raise RoundEnds(_budget_exhausted(local, stop.check.message, metrics)) from None
        plan = build_plan(pcfg, counts.examples, counts.labelled, train.batch_size, train.local_steps,
                          local.config.federation.rounds, max_epsilon, before=releases_before_training(pcfg, centred))
        check_derived_noise(plan.noise_multiplier, pcfg, policy)
        plan = dataclasses.replace(plan, delta=judged_delta(plan.delta, counts.examples, policy))
        privacy.plan, privacy.budget_source = plan, source
        self.check = check = privacy.check_budget()  # BEFORE any training: the lifetime history + planned steps
        if check.exhausted:
            raise RoundEnds(_budget_exhausted(local, check.message, privacy.metrics(0, check)))

    def gradients(self, local: LocalRun, model: UnifiedViTGAN) -> DPTraining:
        privacy = self.privacy
        assert privacy is not None and privacy.plan is not None, "before_training opens the round's privacy"
        try:
            if centre_pending(model):
                self._release_centre(local, model)
            self.attempt = attempt = privacy.begin_training()  # the budget checked again, under the ledger's lock
        except BudgetExhausted as stop:
            raise RoundEnds(_budget_exhausted(local, stop.check.message, privacy.metrics(0, stop.check))) from None
        self.dp = DPTraining(model, privacy.plan, self.seed_for(attempt.number),
                             on_step=lambda step: privacy.ledger.step(attempt, step))
        return self.dp

    def _release_centre(self, local: LocalRun, model: UnifiedViTGAN) -> None:
        """The head centre no hospital has set yet, from this hospital's patches (a Gaussian release in
        the ledger before its noise is drawn; common/privacy/centre.py); FedAvg averages it."""
        privacy, data, counts = self.privacy, self.data, self.counts
        assert privacy is not None and data is not None and counts is not None
        radius = centre_radius(self.pcfg, model.cfg.classifier_features)
        summed = clipped_feature_sum(model, data.train, radius)

        def draw(attempt: int) -> torch.Tensor:
            generator = torch.Generator().manual_seed(self.seed_for(attempt))
            return noisy_centre(summed, radius, self.pcfg.centre_noise_multiplier, counts.examples, generator)

        set_centre(model, privacy.release_centre(centre_entry(self.pcfg), draw))
        logger.info("%s round %d: head centre released (radius %.3g, noise multiplier %.3g)", local.site.name,
                    local.server_round, radius, self.pcfg.centre_noise_multiplier)

    def batches(self, local: LocalRun, data: SiteData, train: TrainConfig) -> Iterable[Any]:
        assert self.dp is not None
        return self.dp.poisson_loader(data.train, train.local_steps)

    def release(self, local: LocalRun, data: SiteData, metrics: RoundMetrics) -> RoundRelease:
        privacy, dp, counts = self.privacy, self.dp, self.counts
        assert privacy is not None and dp is not None and counts is not None and self.attempt is not None
        assert self.check is not None
        privacy.finish_training(self.attempt, dp.round_steps)  # in the ledger before anything can leave
        flat = shared_train_metrics({k: float(v) for k, v in metrics.as_flat_dict().items()}, self.pcfg)
        flat.update(privacy.metrics(dp.round_steps, self.check))
        # The released noisy counts, never the exact ones (they would single out an added patch).
        # scope=discriminator: class counts are real-data statistics outside the DP-SGD; not sent.
        return RoundRelease(flat, counts.examples, counts.labelled, {"dp_attempts": attempts_to_json(privacy.run)},
                            data if self.pcfg.scope != "discriminator" else None)


def _budget_exhausted(local: LocalRun, message: str, metrics: dict[str, float]) -> RecordDict:
    """The reply of a hospital that stops for its privacy budget: its status, message and DP metrics."""
    logger.warning("%s round %d: %s", local.site.name, local.server_round, message)
    record = ConfigRecord({protocol.SITE_NAME: local.site.name, protocol.STATUS: protocol.STATUS_BUDGET_EXHAUSTED,
                           protocol.STATUS_MESSAGE: message})
    return RecordDict({protocol.METRICS: MetricRecord(metrics), protocol.SITE: record})


def _site_privacy(local: LocalRun, saved: SavedLocal | None) -> SitePrivacy:
    """The hospital's ledger (its state folder, or privacy.ledger_dir/<site> in a simulation) and
    this run's releases from the ledger and the local state."""
    ledger_dir = local.config.privacy.ledger_dir
    folder = Path(str(ledger_dir)).expanduser() / local.site.name if ledger_dir and not local.site.deployed else local.site.state_dir
    ledger = PrivacyLedger.in_folder(folder, marker_folder=local.site.state_dir)
    dataset, description = dataset_fingerprint(local.site.data, local.site.site_id, local.config.seed)
    remembered = attempts_from_json((saved.meta if saved else {}).get("dp_attempts"))
    return SitePrivacy.open(ledger, dataset, description, local.run_id, local.server_round, remembered)
