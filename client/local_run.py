"""One message's worth of hospital work: rebuild model and local state, train or evaluate, reply.

Training with DP (``privacy.enabled``) goes through the hospital's policy (``client.policy``), its
privacy ledger and the count release before any step; every attempt draws fresh randomness. The
local state lives per run (``client.site_state``) and remembers this run's DP releases.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch.utils.data import DataLoader

from client.policy import check_derived_noise, check_privacy, effective_max_epsilon
from client.site import SiteIdentity
from client.site_state import SiteStateStore, run_key
from common import protocol
from common.config import ConfigError, dataclass_from_mapping
from common.data.registry import load_site_data
from common.data.sites import SiteData
from common.evaluation import predict_probabilities, summarise_predictions
from common.federation_config import FederationConfig, federation_config
from common.model import GROUPS, ModelConfig, UnifiedViTGAN, build_model, group_entries
from common.privacy.accounting import build_plan
from common.privacy.budget import (
    HospitalPrivacy,
    attempts_from_json,
    attempts_to_json,
    private_train_config,
    shared_train_metrics,
)
from common.privacy.config import PrivacyConfig, privacy_config
from common.privacy.ledger import PrivacyLedger, dataset_fingerprint
from common.privacy.wiring import DPTraining, attempt_seed, secret_seed
from common.progress import training_progress
from common.records import (
    arrayrecord_to_tensors,
    from_arrayrecord,
    tensors_to_arrayrecord,
    to_arrayrecord,
)
from common.seeds import batch_seed, round_stream, site_seed
from common.train import LocalTrainer, RoundMetrics, train_config
from common.train.config import TrainConfig
from common.train.streams import training_batches

logger = logging.getLogger("fedvitgan.client")

LOCAL_STATE = "local-state"  # context.state key: the trainer's state (ArrayRecord)
LOCAL_GROUPS = "local-groups"  # context.state key: groups kept at the hospital (ArrayRecord)
LOCAL_META = "local-meta"  # context.state key: round, run and metadata of the saved state (ConfigRecord)


@lru_cache(maxsize=8)
def _cached_site_data(key: str) -> SiteData:
    args = json.loads(key)
    return load_site_data(args["data"], args["partition"], args["site"], args["num_sites"],
                          args["image_size"], args["seed"])


def site_data(run: dict[str, Any], site: SiteIdentity) -> SiteData:
    """The hospital's data, loaded once per process for the same configuration."""
    key = json.dumps({"data": site.data, "partition": run["partition"], "site": site.site_id,
                      "num_sites": site.num_sites, "image_size": run["model"]["image_size"],
                      "seed": run["seed"]}, sort_keys=True)
    return _cached_site_data(key)


@dataclass
class SavedLocal:
    """Local state saved before this round: the trainer's, the local groups, metadata, files skipped."""

    round: int
    trainer: dict[str, torch.Tensor]
    groups: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass
class LocalRun:
    """What one instruction needs: the run's config, the site, the round and the message."""

    msg: Message
    context: Context
    run: dict[str, Any]
    site: SiteIdentity
    server_round: int
    transport: str

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> LocalRun:
        config = msg.content.config_records.get(protocol.CONFIG)
        if config is None or protocol.RUN_CONFIG_JSON not in config:
            raise ConfigError("instruction carries no run configuration (record 'config' / 'run-config-json')")
        run = json.loads(str(config[protocol.RUN_CONFIG_JSON]))
        site = SiteIdentity.from_node_config(context.node_config, run, run.get("output_dir"))
        return cls(msg, context, run, site, int(config[protocol.SERVER_ROUND]), str(config[protocol.TRANSPORT_DTYPE]))

    # ------------------------------------------------------------- building blocks
    @property
    def run_id(self) -> str:
        """The federated run this message belongs to (the coordinator's run folder; the same across
        resumed sessions and restarts)."""
        return str(self.run.get("output_dir") or "run")

    @property
    def federation(self) -> FederationConfig:
        """The run's ``federation`` section, typed and checked."""
        return federation_config(self.run["federation"])

    @property
    def local_groups(self) -> list[str]:
        return [g for g in GROUPS if self.run["federation"]["aggregation"][g]["local"]]

    def _model(self, num_classes: int, inclusive: bool = False) -> UnifiedViTGAN:
        """The model with the received global groups and this hospital's local groups loaded."""
        cfg = dataclass_from_mapping(ModelConfig, self.run["model"], "model")
        model = build_model(cfg, num_classes, seed=int(self.run["seed"]))
        state = model.state_dict()
        for group in GROUPS:
            if group in self.msg.content.array_records:
                reference = group_entries(state, [group])
                state.update(from_arrayrecord(self.msg.content.array_records[group], reference, self.transport))
        local = self._saved_local(inclusive) if self.local_groups else None
        if local is not None:
            _, _, groups = local
            state.update(group_entries(groups, self.local_groups))
        model.load_state_dict(state)
        return model

    def _store(self) -> SiteStateStore:
        return SiteStateStore.for_run(self.site.state_dir, self.run_id, self.federation.local_state_keep_last)

    def _load_local(self, inclusive: bool = False) -> SavedLocal | None:
        """The local state saved before this round (``inclusive``: or in it), from context.state if
        it belongs to this run, else from the hospital's state folder for this run."""
        state = self.context.state
        limit = self.server_round + 1 if inclusive else self.server_round
        if LOCAL_META in state.config_records:
            meta_record = state.config_records[LOCAL_META]
            saved_round = int(meta_record["round"])
            if str(meta_record.get("run", "")) == run_key(self.run_id) and saved_round < limit:
                trainer = arrayrecord_to_tensors(state.array_records[LOCAL_STATE])
                groups = arrayrecord_to_tensors(state.array_records[LOCAL_GROUPS]) if LOCAL_GROUPS in state.array_records else {}
                return SavedLocal(saved_round, trainer, groups, json.loads(str(meta_record.get("meta-json", "{}"))))
        loaded = self._store().load_before(limit)
        if loaded is None:
            return None
        trainer = {k[len("trainer/"):]: v for k, v in loaded.tensors.items() if k.startswith("trainer/")}
        groups = {k[len("group/"):]: v for k, v in loaded.tensors.items() if k.startswith("group/")}
        return SavedLocal(loaded.round, trainer, groups, loaded.meta, loaded.skipped)

    def _saved_local(self, inclusive: bool = False) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(round, trainer state, local groups) saved before this round (``inclusive``: or in it)."""
        saved = self._load_local(inclusive)
        return None if saved is None else (saved.round, saved.trainer, saved.groups)

    def _save_local(self, trainer: LocalTrainer, model: UnifiedViTGAN, meta: dict[str, Any]) -> None:
        trainer_state = trainer.state_dict()
        groups = group_entries(model.state_dict(), self.local_groups)
        meta = {"site": self.site.name, "round": self.server_round, "run": self.run_id, **meta}
        tensors = {f"trainer/{k}": v for k, v in trainer_state.items()}
        tensors.update({f"group/{k}": v for k, v in groups.items()})
        # The hospital's disk first: context.state never outlives the process.
        self._store().save(self.server_round, tensors, meta)
        self.context.state[LOCAL_STATE] = tensors_to_arrayrecord(trainer_state)
        self.context.state[LOCAL_GROUPS] = tensors_to_arrayrecord(groups)
        self.context.state[LOCAL_META] = ConfigRecord({"round": self.server_round, "run": run_key(self.run_id),
                                                       "meta-json": json.dumps(meta)})

    def _site_record(self, data: SiteData | None = None) -> ConfigRecord:
        record = ConfigRecord({protocol.SITE_NAME: self.site.name, protocol.STATUS: "ok"})
        if data is not None:
            record[protocol.CLASS_COUNTS_JSON] = json.dumps(data.report())
        return record

    def _reply(self, model: UnifiedViTGAN, flat: dict[str, Any], data: SiteData | None) -> RecordDict:
        content = RecordDict({protocol.METRICS: MetricRecord(flat), protocol.SITE: self._site_record(data)})
        state = model.state_dict()
        for group in GROUPS:
            if group not in self.local_groups:
                content[group] = to_arrayrecord(group_entries(state, [group]), self.transport)
        return content

    @staticmethod
    def _state_metrics(saved: SavedLocal | None) -> dict[str, float]:
        return {protocol.STATE_FILES_SKIPPED: float(len(saved.skipped) if saved else 0),
                protocol.STATE_RESTORED_ROUND: float(saved.round if saved else -1)}

    # ------------------------------------------------------------- actions
    def train(self) -> RecordDict:
        pcfg = privacy_config(self.run.get("privacy"))
        check_privacy(pcfg, self.site.policy)  # before any patch is read
        data = site_data(self.run, self.site)
        tcfg = private_train_config(train_config(self.run["train"]), pcfg)
        saved = self._load_local()
        if pcfg.enabled:
            return self._train_private(data, tcfg, pcfg, saved)
        if len(data.train) < 2:
            raise ConfigError(f"{self.site.name}: {len(data.train)} training patches; need at least 2")
        model = self._model(data.train.num_classes)
        trainer = self._trainer(model, tcfg, data, saved, None)
        loader = training_batches(
            data.train, tcfg, seed=batch_seed(int(self.run["seed"]), round_stream(self.site.site_id, self.server_round)),
            pin_memory=torch.device(self.site.device).type == "cuda")
        metrics = self._train_round(trainer, loader, tcfg.local_steps)
        self._save_local(trainer, model, {})
        flat = {k: float(v) for k, v in metrics.as_flat_dict().items()}
        flat.update({protocol.REAL_EXAMPLES: len(data.train), protocol.LABELLED_EXAMPLES: int((data.train.labels >= 0).sum()),
                     protocol.GENERATOR_STEPS: metrics.steps, **self._state_metrics(saved)})
        self._log_round(metrics.steps, metrics.images_per_second)
        return self._reply(model, flat, data)

    def _trainer(self, model: UnifiedViTGAN, tcfg: TrainConfig, data: SiteData, saved: SavedLocal | None,
                 dp: DPTraining | None) -> LocalTrainer:
        trainer = LocalTrainer(model, tcfg, seed=site_seed(int(self.run["seed"]), self.site.site_id),
                               class_names=data.class_names, device=self.site.device, privacy=dp)
        if saved is not None:
            trainer.load_state_dict(saved.trainer)
        return trainer

    def _train_round(self, trainer: LocalTrainer, loader: Iterable[Any], steps: int) -> RoundMetrics:
        """One round of local training, with a progress line when the run's console asks for one."""
        progress = training_progress(self.run.get("console"), f"{self.site.name} round {self.server_round}", steps)
        if progress is not None:
            loader = progress.count(loader)
        return trainer.train_round(loader, steps, progress=progress)

    def _log_round(self, steps: int, images_per_second: float) -> None:
        logger.info("%s round %d: %d steps, %.1f images/s", self.site.name, self.server_round, steps, images_per_second)

    def _train_private(self, data: SiteData, tcfg: TrainConfig, pcfg: PrivacyConfig, saved: SavedLocal | None) -> RecordDict:
        """DP-SGD: released counts, plan, budget stop, one recorded attempt with fresh randomness."""
        privacy = self._privacy(saved)
        seed_for = (lambda _attempt: secret_seed()) if pcfg.seed is None else \
            (lambda attempt: attempt_seed(int(pcfg.seed), privacy.dataset, attempt))
        labelled = int((data.train.labels >= 0).sum())
        counts = privacy.release_counts(pcfg, len(data.train), labelled, seed_for)
        max_epsilon, source = effective_max_epsilon(pcfg, self.site.policy)
        plan = build_plan(pcfg, counts.examples, counts.labelled, tcfg.batch_size, tcfg.local_steps,
                          int(self.run["federation"]["rounds"]), max_epsilon)
        check_derived_noise(plan.noise_multiplier, pcfg, self.site.policy)
        privacy.plan, privacy.budget_source = plan, source
        check = privacy.check_budget()  # BEFORE any training: the lifetime history + planned steps
        if check.exhausted:
            logger.warning("%s round %d: %s", self.site.name, self.server_round, check.message)
            record = ConfigRecord({protocol.SITE_NAME: self.site.name, protocol.STATUS: protocol.STATUS_BUDGET_EXHAUSTED,
                                   protocol.STATUS_MESSAGE: check.message})
            return RecordDict({protocol.METRICS: MetricRecord(privacy.metrics(0, check)), protocol.SITE: record})
        model = self._model(data.train.num_classes)
        attempt = privacy.begin_training()
        dp = DPTraining(model, plan, seed_for(attempt.number), on_step=lambda step: privacy.ledger.step(attempt, step))
        trainer = self._trainer(model, tcfg, data, saved, dp)
        metrics = self._train_round(trainer, dp.poisson_loader(data.train, tcfg.local_steps), tcfg.local_steps)
        privacy.finish_training(attempt, dp.round_steps)  # in the ledger before anything can leave
        flat = shared_train_metrics({k: float(v) for k, v in metrics.as_flat_dict().items()}, pcfg)
        flat.update(privacy.metrics(dp.round_steps, check))
        self._save_local(trainer, model, {"dp_attempts": attempts_to_json(privacy.run)})
        # The released noisy counts, never the exact ones (they would single out an added patch).
        flat.update({protocol.REAL_EXAMPLES: counts.examples, protocol.LABELLED_EXAMPLES: counts.labelled,
                     protocol.GENERATOR_STEPS: metrics.steps, **self._state_metrics(saved)})
        self._log_round(metrics.steps, metrics.images_per_second)
        # scope=discriminator: class counts are real-data statistics outside the DP-SGD; not sent.
        return self._reply(model, flat, data if pcfg.scope != "discriminator" else None)

    def _privacy(self, saved: SavedLocal | None) -> HospitalPrivacy:
        """The hospital's ledger (its state folder, or privacy.ledger_dir/<site> in a simulation) and
        this run's releases from the ledger and the local state."""
        ledger_dir = (self.run.get("privacy") or {}).get("ledger_dir")
        folder = Path(str(ledger_dir)).expanduser() / self.site.name if ledger_dir and not self.site.deployed else self.site.state_dir
        ledger = PrivacyLedger.in_folder(folder, marker_folder=self.site.state_dir)
        dataset, description = dataset_fingerprint(self.site.data, self.site.site_id, int(self.run["seed"]))
        remembered = attempts_from_json((saved.meta if saved else {}).get("dp_attempts"))
        return HospitalPrivacy.open(ledger, dataset, description, self.run_id, self.server_round, remembered)

    def evaluate(self) -> RecordDict:
        """Counts on the held-out split (confusion matrix, binned class scores): no single patch's prediction."""
        data = site_data(self.run, self.site)
        model = self._model(data.test.num_classes, inclusive=True).to(self.site.device)
        loader = DataLoader(data.test, batch_size=self.federation.evaluate_batch_size, shuffle=False, num_workers=0)
        labels, probs = predict_probabilities(model, loader, self.site.device)
        keep = labels >= 0
        summary = summarise_predictions(labels[keep], probs[keep], self.federation.score_bins)
        metrics = {protocol.REAL_EXAMPLES: summary.examples,
                   protocol.EVAL_CONFUSION: summary.confusion.ravel().tolist(),
                   protocol.EVAL_POSITIVE_SCORES: summary.positive_scores.ravel().tolist(),
                   protocol.EVAL_NEGATIVE_SCORES: summary.negative_scores.ravel().tolist()}
        return RecordDict({protocol.METRICS: MetricRecord(metrics), protocol.SITE: self._site_record()})
