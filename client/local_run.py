"""One message's worth of hospital work: load model and local state, train or evaluate, reply.

The hospital's data set and built model are kept between messages (``client.site_cache``);
the global groups and the local state are loaded afresh for every message. A training round is
``client.training_round.train_round`` with a strategy: plain (``client.plain_round``) or DP-SGD
(``privacy.enabled``: ``client.private_round``), which goes through the hospital's policy
(``client.policy``), its privacy ledger and the count release before any step; every attempt draws
fresh randomness. The local state lives per run (``client.site_state``) and
remembers this run's DP releases.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch.utils.data import DataLoader

from client.policy import Refusal, check_evaluation, check_privacy
from client.secure_aggregation import CLIPPED_GROUPS, SECURE_VECTOR, secure_vector, under_secure_aggregation
from client.site import SiteIdentity
from client.site_cache import SITE_CACHE, CachedSite, cache_config, fingerprint
from client.site_state import SiteStateStore, run_key
from common import protocol
from common.config import ConfigError
from common.data.registry import load_site_data
from common.data.sites import SiteData
from common.evaluation.metrics import predict_probabilities, summarise_predictions
from common.federation_config import FederationConfig
from common.model import GROUPS, UnifiedViTGAN, build_model, group_entries
from common.progress import training_progress
from common.records import (
    arrayrecord_to_tensors,
    from_arrayrecord,
    tensors_to_arrayrecord,
    to_arrayrecord,
)
from common.run_config import RunConfig, run_config
from common.seeds import site_seed
from common.train import LocalTrainer, RoundMetrics
from common.train.config import TrainConfig

if TYPE_CHECKING:
    from common.privacy.wiring import DPTraining

logger = logging.getLogger("fedvitgan.client")

LOCAL_STATE = "local-state"  # context.state key: the trainer's state (ArrayRecord)
LOCAL_GROUPS = "local-groups"  # context.state key: groups kept at the hospital (ArrayRecord)
LOCAL_META = "local-meta"  # context.state key: round, run and metadata of the saved state (ConfigRecord)


@dataclass
class SavedLocal:
    """Local state saved before this round: the trainer's, the local groups, metadata, files skipped."""

    round: int
    trainer: dict[str, torch.Tensor]
    groups: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def run_local_steps(config: RunConfig, tcfg: TrainConfig) -> int:
    """The local steps this hospital takes over the whole run: the schedule's length where the run
    sets one, else rounds x local steps a round (``train.gan_signals`` counts passes over them)."""
    return int(tcfg.optim.schedule_steps or config.federation.rounds * tcfg.local_steps)


@dataclass
class LocalRun:
    """What one instruction needs: the run's config, the site, the round and the message."""

    msg: Message
    context: Context
    run: dict[str, Any]
    site: SiteIdentity
    server_round: int
    transport: str
    _cached: CachedSite | None = field(default=None, init=False, repr=False)

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

    @functools.cached_property
    def config(self) -> RunConfig:
        """The run's configuration, typed and checked once per instruction (``ConfigError`` naming the key)."""
        return run_config(self.run)

    @property
    def federation(self) -> FederationConfig:
        """The run's ``federation`` section, typed and checked."""
        return self.config.federation

    @property
    def local_groups(self) -> list[str]:
        return [g for g in GROUPS if self.federation.aggregation[g]["local"]]

    @property
    def cache_key(self) -> tuple[str, str]:
        """This hospital's key in the process's cache of built hospitals."""
        return (self.run_id, f"{self.site.site_id}:{self.site.name}")

    def _load_data(self) -> SiteData:
        return load_site_data(self.site.data, self.config.partition, self.site.site_id, self.site.num_sites,
                              self.config.model.image_size, self.config.seed)

    def _build_site(self) -> CachedSite:
        return CachedSite(self._load_data(), self._build_model)

    def _build_model(self, num_classes: int) -> UnifiedViTGAN:
        return build_model(self.config.model, num_classes, seed=self.config.seed)

    @property
    def cached_site(self) -> CachedSite | None:
        """This hospital's data set and model kept from earlier messages (None: ``client.cache`` off)."""
        if self._cached is None:
            config = cache_config(self.run.get("client"))
            SITE_CACHE.config = config
            if not config.cache:
                return None
            self._cached = SITE_CACHE.get(self.cache_key, fingerprint(self.run, self.site), self._build_site)
        return self._cached

    def data(self) -> SiteData:
        """The hospital's data set: kept between messages, or read afresh with ``client.cache=false``."""
        hospital = self.cached_site
        return hospital.data if hospital is not None else self._load_data()

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Around one action: a failure drops the kept hospital (nothing half-done is reused);
        afterwards the cache is brought back within its bounds."""
        try:
            yield
        except BaseException:
            SITE_CACHE.discard(self.cache_key)
            raise
        finally:
            if self._cached is not None:
                self._cached.release()
        if self._cached is not None:
            SITE_CACHE.done(self.cache_key)

    def loaded_model(self, num_classes: int, inclusive: bool = False) -> UnifiedViTGAN:
        """The model with the received global groups and this hospital's local groups loaded (the
        kept model starts from its freshly built weights every time, as a new one would)."""
        hospital = self.cached_site
        if hospital is not None:
            model, state = hospital.checkout(num_classes)
        else:
            model = self._build_model(num_classes)
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

    def load_local(self, inclusive: bool = False) -> SavedLocal | None:
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
        saved = self.load_local(inclusive)
        return None if saved is None else (saved.round, saved.trainer, saved.groups)

    def save_local(self, trainer: LocalTrainer, model: UnifiedViTGAN, meta: dict[str, Any]) -> None:
        trainer_state = trainer.state_dict()
        groups = group_entries(model.state_dict(), self.local_groups)
        meta = {"site": self.site.name, "round": self.server_round, "run": self.run_id, "data": self.data_fingerprint,
                **meta}
        tensors = {f"trainer/{k}": v for k, v in trainer_state.items()}
        tensors.update({f"group/{k}": v for k, v in groups.items()})
        # The hospital's disk first: context.state never outlives the process.
        self._store().save(self.server_round, tensors, meta)
        self.context.state[LOCAL_STATE] = tensors_to_arrayrecord(trainer_state)
        self.context.state[LOCAL_GROUPS] = tensors_to_arrayrecord(groups)
        self.context.state[LOCAL_META] = ConfigRecord({"round": self.server_round, "run": run_key(self.run_id),
                                                       "meta-json": json.dumps(meta)})

    def _site_record(self, data: SiteData | None = None) -> ConfigRecord:
        record = ConfigRecord({protocol.SITE_NAME: self.site.name, protocol.STATUS: protocol.STATUS_OK})
        if data is not None:
            record[protocol.CLASS_COUNTS_JSON] = json.dumps(data.report())
        return record

    def reply(self, model: UnifiedViTGAN, flat: dict[str, Any], data: SiteData | None) -> RecordDict:
        """The train reply: metrics, the site record and the shared groups, or, in a round with secure
        aggregation, the vector that Flower's SecAgg+ mod masks instead of the groups."""
        state = model.state_dict()
        if under_secure_aggregation(self.msg):
            vector, clipped = secure_vector(self.msg, self.run, state, self.transport, flat)
            flat[CLIPPED_GROUPS] = clipped
            return RecordDict({protocol.METRICS: MetricRecord(flat), protocol.SITE: self._site_record(data),
                               SECURE_VECTOR: vector})
        content = RecordDict({protocol.METRICS: MetricRecord(flat), protocol.SITE: self._site_record(data)})
        for group in GROUPS:
            if group not in self.local_groups:
                content[group] = to_arrayrecord(group_entries(state, [group]), self.transport)
        return content

    @staticmethod
    def state_metrics(saved: SavedLocal | None) -> dict[str, float]:
        return {protocol.STATE_FILES_SKIPPED: float(len(saved.skipped) if saved else 0),
                protocol.STATE_RESTORED_ROUND: float(saved.round if saved else -1)}

    def finish_round(self, trainer: LocalTrainer, model: UnifiedViTGAN, saved: SavedLocal | None,
                     metrics: RoundMetrics, flat: dict[str, float], examples: int, labelled: int,
                     meta: dict[str, Any], class_counts_from: SiteData | None) -> RecordDict:
        """The end of a training round, plain or private: save the local state, then the reply with
        the round's metrics, the example counts it may release and (``class_counts_from``) the class counts."""
        self.save_local(trainer, model, meta)
        flat.update({protocol.REAL_EXAMPLES: examples, protocol.LABELLED_EXAMPLES: labelled,
                     protocol.GENERATOR_STEPS: metrics.steps, **self.state_metrics(saved)})
        self.log_round(metrics.steps, metrics.images_per_second)
        return self.reply(model, flat, class_counts_from)

    # ------------------------------------------------------------- actions
    def build_trainer(self, model: UnifiedViTGAN, tcfg: TrainConfig, data: SiteData, saved: SavedLocal | None,
                      dp: DPTraining | None) -> LocalTrainer:
        trainer = LocalTrainer(model, tcfg, seed=site_seed(self.config.seed, self.site.site_id),
                               class_names=data.class_names, device=self.site.device, privacy=dp,
                               validation=data.val, labelled_examples=data.labelled_examples,
                               run_steps=run_local_steps(self.config, tcfg))
        if saved is not None:
            trainer.load_state_dict(saved.trainer)
        return trainer

    def run_steps(self, trainer: LocalTrainer, loader: Iterable[Any], steps: int) -> RoundMetrics:
        """One round of local training, with a progress line when the run's console asks for one."""
        progress = training_progress(self.run.get("console"), f"{self.site.name} round {self.server_round}", steps)
        if progress is not None:
            loader = progress.count(loader)
        return trainer.train_round(loader, steps, progress=progress)

    def log_round(self, steps: int, images_per_second: float) -> None:
        logger.info("%s round %d: %d steps, %.1f images/s", self.site.name, self.server_round, steps, images_per_second)

    def evaluate(self) -> RecordDict:
        """Counts on the held-out split (confusion matrix, binned class scores): no single patch's
        prediction. The same policy as training applies first, the histograms are no finer than the
        hospital allows, and the data configuration must be the one it trained with in this run."""
        check_privacy(self.config.privacy, self.site.policy)
        check_evaluation(self.federation.score_bins, self.site.policy)
        saved = self.load_local(inclusive=True)
        trained_on = (saved.meta if saved is not None else {}).get("data")
        if trained_on is not None and trained_on != self.data_fingerprint:
            raise Refusal("data", "the evaluation's data configuration differs from the one this hospital trained "
                                  "with in this run (a changed split, seed or fraction could put training patches "
                                  "in the held-out set)")
        with self.kept():
            return self._evaluate()

    @property
    def data_fingerprint(self) -> str:
        """A hash of the hospital's resolved data configuration (what it trains and evaluates on)."""
        return hashlib.sha256(json.dumps(self.site.data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _evaluate(self) -> RecordDict:
        data = self.data()
        model = self.loaded_model(data.test.num_classes, inclusive=True).to(self.site.device)
        loader = DataLoader(data.test, batch_size=self.federation.evaluate_batch_size, shuffle=False, num_workers=0)
        labels, probs = predict_probabilities(model, loader, self.site.device)
        keep = labels >= 0
        summary = summarise_predictions(labels[keep], probs[keep], self.federation.score_bins)
        metrics = {protocol.REAL_EXAMPLES: summary.examples,
                   protocol.EVAL_CONFUSION: summary.confusion.ravel().tolist(),
                   protocol.EVAL_POSITIVE_SCORES: summary.positive_scores.ravel().tolist(),
                   protocol.EVAL_NEGATIVE_SCORES: summary.negative_scores.ravel().tolist()}
        return RecordDict({protocol.METRICS: MetricRecord(metrics), protocol.SITE: self._site_record()})
