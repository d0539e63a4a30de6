"""One message's worth of hospital work: rebuild model and local state, train or evaluate, reply."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch.utils.data import DataLoader

from client.site import SiteIdentity
from client.site_state import SiteStateStore
from common import protocol
from common.config import ConfigError, dataclass_from_mapping
from common.data.sites import SiteData, load_site_data
from common.evaluation import evaluate_classifier
from common.model import GROUPS, ModelConfig, UnifiedViTGAN, build_model
from common.privacy.accounting import History, PrivacyPlan, build_plan
from common.privacy.budget import HospitalPrivacy, private_train_config, shared_train_metrics
from common.privacy.config import PrivacyConfig, privacy_config
from common.privacy.ledger import PrivacyLedger, dataset_fingerprint
from common.privacy.wiring import DPTraining
from common.progress import training_progress
from common.records import (
    arrayrecord_to_tensors,
    from_arrayrecord,
    tensors_to_arrayrecord,
    to_arrayrecord,
)
from common.train import LocalTrainer, train_config
from common.train.streams import training_batches

logger = logging.getLogger("fedvitgan.client")

LOCAL_STATE = "local-state"  # context.state key: the trainer's state (ArrayRecord)
LOCAL_GROUPS = "local-groups"  # context.state key: groups kept at the hospital (ArrayRecord)
LOCAL_META = "local-meta"  # context.state key: round of the saved state (ConfigRecord)


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
    def local_groups(self) -> list[str]:
        return [g for g in GROUPS if self.run["federation"]["aggregation"][g]["local"]]

    def _model(self, num_classes: int, inclusive: bool = False) -> UnifiedViTGAN:
        """The model with the received global groups and this hospital's local groups loaded."""
        cfg = dataclass_from_mapping(ModelConfig, self.run["model"], "model")
        model = build_model(cfg, num_classes, seed=int(self.run["seed"]))
        state = model.state_dict()
        for group in GROUPS:
            if group in self.msg.content.array_records:
                reference = {k: v for k, v in state.items() if k.startswith(group + ".")}
                state.update(from_arrayrecord(self.msg.content.array_records[group], reference, self.transport))
        local = self._saved_local(inclusive) if self.local_groups else None
        if local is not None:
            _, _, groups = local
            state.update({k: v for k, v in groups.items() if k.split(".", 1)[0] in self.local_groups})
        model.load_state_dict(state)
        return model

    def _store(self) -> SiteStateStore:
        return SiteStateStore(self.site.state_dir)

    def _saved_local(self, inclusive: bool = False) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(round, trainer state, local groups) saved before this round (``inclusive``: or in it),
        from context.state, else from the hospital's state folder."""
        state = self.context.state
        limit = self.server_round + 1 if inclusive else self.server_round
        if LOCAL_META in state.config_records:
            saved_round = int(state.config_records[LOCAL_META]["round"])
            if saved_round < limit:
                trainer = arrayrecord_to_tensors(state.array_records[LOCAL_STATE])
                groups = arrayrecord_to_tensors(state.array_records[LOCAL_GROUPS]) if LOCAL_GROUPS in state.array_records else {}
                return saved_round, trainer, groups
        loaded = self._store().load_before(limit)
        if loaded is None:
            return None
        saved_round, tensors, _ = loaded
        trainer = {k[len("trainer/"):]: v for k, v in tensors.items() if k.startswith("trainer/")}
        groups = {k[len("group/"):]: v for k, v in tensors.items() if k.startswith("group/")}
        return saved_round, trainer, groups

    def _save_local(self, trainer: LocalTrainer, model: UnifiedViTGAN) -> None:
        trainer_state = trainer.state_dict()
        groups = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in self.local_groups}
        self.context.state[LOCAL_STATE] = tensors_to_arrayrecord(trainer_state)
        self.context.state[LOCAL_GROUPS] = tensors_to_arrayrecord(groups)
        self.context.state[LOCAL_META] = ConfigRecord({"round": self.server_round})
        tensors = {f"trainer/{k}": v for k, v in trainer_state.items()}
        tensors.update({f"group/{k}": v for k, v in groups.items()})
        self._store().save(self.server_round, tensors, {"site": self.site.name, "round": self.server_round})

    def _site_record(self, data: SiteData | None = None) -> ConfigRecord:
        record = ConfigRecord({protocol.SITE_NAME: self.site.name, protocol.STATUS: "ok"})
        if data is not None:
            record[protocol.CLASS_COUNTS_JSON] = json.dumps(data.report())
        return record

    # ------------------------------------------------------------- actions
    def train(self) -> RecordDict:
        data = site_data(self.run, self.site)
        pcfg = privacy_config(self.run.get("privacy"))
        tcfg = private_train_config(train_config(self.run["train"]), pcfg)
        if len(data.train) < 2:
            raise ConfigError(f"{self.site.name}: {len(data.train)} training patches; need at least 2")
        labelled = int((data.train.labels >= 0).sum())
        batch = min(tcfg.batch_size, len(data.train))
        plan = None
        if pcfg.enabled:
            plan = build_plan(pcfg, len(data.train), labelled, batch, tcfg.local_steps,
                              int(self.run["federation"]["rounds"]))
        model = self._model(data.train.num_classes)
        dp = None
        if plan is not None:
            seed = None if pcfg.seed is None else int(pcfg.seed) * 1000 + self.site.site_id  # tests only
            dp = DPTraining(model, plan, seed)
        trainer = LocalTrainer(model, tcfg, seed=int(self.run["seed"]) * 1000 + self.site.site_id,
                               class_names=data.class_names, device=self.site.device, privacy=dp)
        saved = self._saved_local()
        if saved is not None:
            trainer.load_state_dict(saved[1])  # with DP: this run's accountant history and RNG states
        check, privacy = None, None
        if plan is not None and dp is not None:
            privacy = self._privacy(pcfg, plan, dp.history)
            dp.history = list(privacy.run)  # the larger of the local state's and the ledger's history
            check = privacy.check_budget()  # BEFORE any training: history copy + planned steps
            if check.exhausted:
                logger.warning("%s round %d: %s", self.site.name, self.server_round, check.message)
                record = ConfigRecord({protocol.SITE_NAME: self.site.name,
                                       protocol.STATUS: protocol.STATUS_BUDGET_EXHAUSTED,
                                       protocol.STATUS_MESSAGE: check.message})
                return RecordDict({protocol.METRICS: MetricRecord(privacy.metrics(0, check)), protocol.SITE: record})
            loader = dp.poisson_loader(data.train, tcfg.local_steps)
        else:
            loader = training_batches(
                data.train, tcfg, seed=int(self.run["seed"]) * 1_000_003 + self.site.site_id * 1009 + self.server_round)
        progress = training_progress(self.run.get("console"), f"{self.site.name} round {self.server_round}",
                                     tcfg.local_steps)
        if progress is not None:
            loader = progress.count(loader)
        metrics = trainer.train_round(loader, tcfg.local_steps, progress=progress)
        flat = {k: float(v) for k, v in metrics.as_flat_dict().items()}
        if privacy is not None and dp is not None:
            # Into the ledger before anything trained this round can leave the hospital.
            privacy.record_round(dp.history, dp.round_steps)
            flat = shared_train_metrics(flat, pcfg)
            flat.update(privacy.metrics(dp.round_steps, check))
        self._save_local(trainer, model)
        flat.update({protocol.REAL_EXAMPLES: len(data.train), protocol.LABELLED_EXAMPLES: labelled,
                     protocol.GENERATOR_STEPS: metrics.steps})
        # scope=discriminator: class counts are real-data statistics outside the DP-SGD; not sent.
        share_counts = not (pcfg.enabled and pcfg.scope == "discriminator")
        content = RecordDict({protocol.METRICS: MetricRecord(flat),
                              protocol.SITE: self._site_record(data if share_counts else None)})
        state = model.state_dict()
        for group in GROUPS:
            if group not in self.local_groups:
                content[group] = to_arrayrecord({k: v for k, v in state.items() if k.startswith(group + ".")},
                                                self.transport)
        logger.info("%s round %d: %d steps, %.1f images/s", self.site.name, self.server_round, metrics.steps,
                    metrics.images_per_second)
        return content

    def _privacy(self, pcfg: PrivacyConfig, plan: PrivacyPlan, state_history: History) -> HospitalPrivacy:
        """The hospital's ledger (its state folder, or privacy.ledger_dir/<site>) and this run's
        history restored from the local state and the ledger."""
        folder = Path(pcfg.ledger_dir).expanduser() / self.site.name if pcfg.ledger_dir else self.site.state_dir
        dataset, description = dataset_fingerprint(self.site.data, self.site.site_id, int(self.run["seed"]))
        return HospitalPrivacy.open(plan, PrivacyLedger.in_folder(folder), dataset, description,
                                    str(self.run.get("output_dir") or "run"), self.server_round, state_history)

    def evaluate(self) -> RecordDict:
        data = site_data(self.run, self.site)
        model = self._model(data.test.num_classes, inclusive=True).to(self.site.device)
        loader = DataLoader(data.test, batch_size=256, shuffle=False, num_workers=0)
        result = evaluate_classifier(model, loader, self.site.device)
        metrics = {k: float(v) for k, v in result.items() if k != "examples"}
        metrics[protocol.REAL_EXAMPLES] = int(result["examples"])
        return RecordDict({protocol.METRICS: MetricRecord(metrics), protocol.SITE: self._site_record()})
