"""Per-group aggregation on Flower's public Strategy API, held against broken and hostile hospitals.

Each of the generator, discriminator and classifier groups is aggregated with its own weighting
and rule (``fedavg``, ``median`` or ``trimmed_mean``; see ``server.aggregate``), or left local to
the hospitals. Every reply is first tied to its authenticated node (``server.identity``) and
checked (``server.replies``); any exception while checking or using one reply leaves that reply
out, names the hospital in the log and in the round's record, and the round goes on. A round with
fewer than ``min_sites`` valid train replies keeps the global model and is recorded as failed.
Global evaluation metrics are pooled from the hospitals' confusion matrices and score histograms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.config import ConfigError, dataclass_from_mapping
from common.evaluation import pooled_metrics, summary_metrics
from common.model import GROUPS, split_groups
from common.records import payload_bytes, to_arrayrecord, wire_array
from server.aggregate import AUTO_SHARE, GroupOutcome, GroupPolicy, aggregate_group_outcomes, as_reference_dtype
from server.identity import SiteRegistry, Verdict
from server.replies import (
    ReplyError,
    ReplyLimits,
    SiteReply,
    budget_exhausted_metrics,
    check_evaluate_reply,
    check_secure_train_reply,
    check_train_reply,
    claimed_name,
    within_magnitude,
)

logger = logging.getLogger("fedvitgan.server")

#: The ``federation.aggregation`` keys that bound every group alike (not set per group).
FEDERATION_WIDE = ("max_weight_share", "clip_update_norm")


@dataclass(frozen=True)
class AggregationConfig:
    """``federation.aggregation``: one rule per group and the federation-wide influence bounds."""

    rules: Mapping[str, GroupPolicy]  # each group's policy, the federation-wide bounds included
    max_weight_share: float | str  # a share in (0, 1], or "auto": max(2/n, 0.5) of n hospitals
    clip_update_norm: float | None  # k: each update clipped to k x the round's median norm; None: off

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> AggregationConfig:
        where = "federation.aggregation"
        unknown = sorted(set(section) - {*GROUPS, "max_weight_share", "clip_update_norm"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {[*GROUPS, 'max_weight_share', 'clip_update_norm']}")
        missing = [g for g in GROUPS if g not in section]
        if missing:
            raise ConfigError(f"{where}: rules missing for groups {missing}")
        bounds = [key for key in FEDERATION_WIDE if key not in section]
        if bounds:
            raise ConfigError(f"{where}: missing required key(s) {bounds} (conf/federation/default.yaml sets them)")
        clip = section["clip_update_norm"]
        share = section["max_weight_share"]
        if not isinstance(share, str):
            share = float(share)
        clip = None if clip is None else float(clip)
        rules = {}
        for group in GROUPS:
            own = section[group]
            shared = sorted(set(own) & set(FEDERATION_WIDE))
            if shared:
                raise ConfigError(f"{where}.{group}: {shared} apply to every group; set them on {where}")
            rules[group] = dataclass_from_mapping(GroupPolicy, {**own, "max_weight_share": share, "clip_update_norm": clip},
                                                  f"{where}.{group}")
        return cls(rules, share, clip)

    def policy(self, group: str) -> GroupPolicy:
        return self.rules[group]

    def small_federation_warnings(self, hospitals: int) -> list[str]:
        """What the influence bounds cannot do with fewer than 3 hospitals, said once at start."""
        if hospitals >= 3:
            return []
        notes = []
        robust = sorted(g for g, r in self.rules.items() if not r.local and r.rule != "fedavg")
        if robust:
            notes.append(f"{hospitals} hospital(s): the {', '.join(robust)} rule(s) cannot outvote a hostile "
                         f"hospital (the median of 2 is their mean); use 3 or more hospitals for a robust rule")
        if self.clip_update_norm is not None:
            notes.append(f"{hospitals} hospital(s): clip_update_norm clips to {self.clip_update_norm:g} x the median "
                         f"norm, and with fewer than 3 the median includes any hostile hospital's own update, "
                         f"so it bounds nothing")
        if any(not r.local and r.rule == "fedavg" for r in self.rules.values()):
            notes.append(f"{hospitals} hospital(s): max_weight_share cannot stop one hospital from dominating "
                         f"FedAvg ('auto' leaves it off below 3 hospitals)")
        return notes


@dataclass
class RoundRecord:
    """What one phase (train or evaluate) of a round saw: per-site metrics, exclusions, bytes."""

    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    bytes_to_sites: int = 0
    bytes_from_sites: int = 0
    class_counts: dict[str, Any] = field(default_factory=dict)
    aggregated: bool = False
    #: Hospitals that did not train because the round would exceed their privacy budget (their
    #: site name, message and DP metrics); they are also in ``excluded``.
    budget_exhausted: list[dict[str, Any]] = field(default_factory=list)
    #: Per group: rule, hospitals taking part and their shares, hospitals clipped, or why kept.
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Why the phase produced nothing (fewer than min_sites valid replies, ...), else None.
    failure: str | None = None
    #: Pooled metrics (evaluate phase).
    global_metrics: dict[str, float] = field(default_factory=dict)
    #: A SecAgg+ round: participants, dropouts (who, at which stage, why), bytes and seconds per stage.
    secure_aggregation: dict[str, Any] | None = None


class GroupedStrategy(Strategy):
    """Per-group aggregation with reply checks, node-bound identities and bounded influence."""

    def __init__(
        self,
        reference_state: Mapping[str, torch.Tensor],
        aggregation: AggregationConfig,
        transport: str,
        run_config_json: str,
        limits: ReplyLimits,
        num_sites: int,
        min_sites: int,
        wait_for_sites_s: float,
        phase_timeout_s: float,
        registry: SiteRegistry | None = None,
    ) -> None:
        self.reference = split_groups(reference_state)
        self.aggregation = aggregation
        self.rules = dict(aggregation.rules)
        self.transport = transport
        self.run_config_json = run_config_json
        self.limits = limits
        self.num_sites = num_sites
        self.min_sites = max(1, int(min_sites))
        self.wait_for_sites_s = wait_for_sites_s
        self.phase_timeout_s = phase_timeout_s
        self.registry = registry or SiteRegistry()
        self.notes: list[str] = []
        self.current: ArrayRecord | None = None
        self.train_record = RoundRecord()
        self.evaluate_record = RoundRecord()
        self._asked: dict[str, list[int]] = {"train": [], "evaluate": []}
        #: The instructions of each phase; the grid gives them their message ids when it sends them.
        self._sent: dict[str, list[Message]] = {"train": [], "evaluate": []}
        self._reconciled = False
        self._round = 0
        #: Held-out patches each hospital reported in its train-time class counts (the ceiling of
        #: what its evaluation may count; hospitals that send no class counts have none).
        self.released_test: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def sent_groups(self) -> list[str]:
        return [g for g in GROUPS if not self.rules[g].local]

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """The round's one wait: until ``num_sites`` hospitals are connected, or ``wait_for_sites_s``."""
        deadline = time.monotonic() + self.wait_for_sites_s
        nodes = list(grid.get_node_ids())
        while len(nodes) < self.num_sites and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        if len(nodes) < self.num_sites:
            logger.warning("only %d of %d hospitals connected; going on with them", len(nodes), self.num_sites)
        return sorted(nodes)

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: Sequence[int],
                  message_type: str, record: RoundRecord) -> list[Message]:
        self.current = arrays
        content = RecordDict()
        sent = 0
        state = {k: torch.from_numpy(arrays[k].numpy()) for k in arrays.keys()}
        for group in self.sent_groups:
            group_record = to_arrayrecord({k: state[k] for k in self.reference[group]}, self.transport)
            content[group] = group_record
            sent += payload_bytes(group_record)
        cfg = ConfigRecord(dict(config))
        cfg[protocol.SERVER_ROUND] = server_round
        cfg[protocol.TRANSPORT_DTYPE] = self.transport
        cfg[protocol.RUN_CONFIG_JSON] = self.run_config_json
        cfg[protocol.SENT_GROUPS] = ",".join(self.sent_groups)
        content[protocol.CONFIG] = cfg
        record.bytes_to_sites = sent * len(nodes)
        return [Message(content=content, dst_node_id=node, message_type=message_type, group_id=str(server_round))
                for node in nodes]

    def _exclude(self, record: RoundRecord, verdict: Verdict, reason: str, phase: str) -> None:
        logger.warning("round %s: leaving out %s's %s reply: %s", self._round, verdict.name, phase, reason)
        entry: dict[str, Any] = {"site": verdict.name, "node_id": int(verdict.node_id), "phase": phase, "reason": reason}
        if verdict.claimed is not None and verdict.claimed != verdict.name:
            entry["claimed"] = verdict.claimed
        record.excluded.append(entry)

    def _sender(self, reply: Message, phase: str) -> int:
        """The node a reply is about: its authenticated source, or, for an error the SuperLink itself
        returns for an unreachable hospital (source ``SUPERLINK_NODE_ID``), the node the instruction went to."""
        node = int(reply.metadata.src_node_id)
        if node == SUPERLINK_NODE_ID and reply.has_error():
            for instruction in self._sent[phase]:
                if instruction.metadata.message_id and instruction.metadata.message_id == reply.metadata.reply_to_message_id:
                    return int(instruction.metadata.dst_node_id)
        return node

    def _admit(self, replies: Iterable[Message], phase: str, record: RoundRecord) -> list[tuple[Message, Verdict]]:
        """Identity checks for one phase; refused replies and stragglers go to ``record.excluded``."""
        replies = list(replies)
        verdicts = self.registry.admit([(self._sender(m, phase), claimed_name(m)) for m in replies],
                                       self._asked[phase])
        admitted = []
        for msg, verdict in zip(replies, verdicts):
            if verdict.refused is not None:
                self._exclude(record, verdict, verdict.refused, phase)
            else:
                admitted.append((msg, verdict))
        answered = {v.node_id for v in verdicts}
        for node in self._asked[phase]:
            if node not in answered:
                straggler = Verdict(node, self.registry.display(node), None)
                self._exclude(record, straggler, f"no reply within federation.round_timeout_s="
                                                 f"{self.phase_timeout_s:g} s (straggler)", phase)
        return admitted

    # ------------------------------------------------------------------ Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round = server_round
        self.train_record = RoundRecord()
        nodes = self._wait_for_nodes(grid)
        if not self._reconciled:
            note = self.registry.reconcile(nodes)
            if note:
                self.notes.append(note)
            self._reconciled = True
        self._asked["train"] = nodes
        self._sent["train"] = self._messages(server_round, arrays, config, nodes, MessageType.TRAIN, self.train_record)
        return self._sent["train"]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._round = server_round
        record = self.train_record
        sent_reference = {g: self.reference[g] for g in self.sent_groups}
        valid: list[SiteReply] = []
        for msg, verdict in self._admit(replies, "train", record):
            try:
                stopped = budget_exhausted_metrics(msg, verdict.name)
                if stopped is not None:
                    record.budget_exhausted.append(stopped)
                reply = check_train_reply(msg, sent_reference, self.transport, self.limits, verdict.name,
                                          server_round)
            except Exception as error:  # every failure of one reply excludes that reply only
                self._exclude(record, verdict, _reason(error), "train")
                continue
            valid.append(reply)
            self._accept(reply, record)
        if self.current is None or len(valid) < self.min_sites:
            record.failure = (f"{len(valid)} valid train replies, fewer than federation.min_sites={self.min_sites}; "
                              f"global model unchanged")
            logger.warning("round %d: %s", server_round, record.failure)
            return None, None
        try:
            new_arrays = self.aggregate_arrays(self.current, valid, record)
        except Exception as error:  # the checks above should make this unreachable; never stop the run
            logger.exception("round %d: aggregation failed", server_round)
            record.failure = f"aggregation failed ({_reason(error)}); global model unchanged"
            return None, None
        record.aggregated = True
        return new_arrays, MetricRecord({"sites-aggregated": len(valid), "sites-excluded": len(record.excluded)})

    def _accept(self, reply: SiteReply, record: RoundRecord) -> None:
        """Record a valid train reply: its metrics, bytes and class counts."""
        record.sites[reply.site] = reply.metrics
        record.bytes_from_sites += reply.bytes_received
        if reply.class_counts is not None:
            record.class_counts[reply.site] = reply.class_counts
            self.released_test[reply.site] = sum(int(n) for n in reply.class_counts.get("test", {}).values())

    # ------------------------------------------------------------------ secure aggregation (SecAgg+)
    def check_secure_train(self, server_round: int, replies: Iterable[Message], sent: Sequence[Message],
                           shapes: Sequence[tuple[int, ...]], modulus: int
                           ) -> tuple[dict[int, list[np.ndarray]], dict[int, str]]:
        """A SecAgg+ round's train replies, checked as ``aggregate_train`` checks them but holding a
        masked vector instead of groups: the vectors that may enter the sum (by node), and why each
        other hospital asked is left out."""
        self._round = server_round
        record = self.train_record
        self._asked["train"] = [int(m.metadata.dst_node_id) for m in sent]
        self._sent["train"] = list(sent)
        vectors: dict[int, list[np.ndarray]] = {}
        for msg, verdict in self._admit(replies, "train", record):
            try:
                stopped = budget_exhausted_metrics(msg, verdict.name)
                if stopped is not None:
                    record.budget_exhausted.append(stopped)
                reply, vector = check_secure_train_reply(msg, shapes, modulus, self.limits, verdict.name,
                                                         server_round)
            except Exception as error:
                self._exclude(record, verdict, _reason(error), "train")
                continue
            vectors[verdict.node_id] = vector
            self._accept(reply, record)
        refused = {int(e["node_id"]): str(e["reason"]) for e in record.excluded
                   if e.get("phase") == "train" and int(e["node_id"]) not in vectors}
        return vectors, refused

    def aggregate_secure(self, server_round: int, sums: Mapping[str, tuple[Mapping[str, np.ndarray], float]],
                         participants: Sequence[str]) -> ArrayRecord | None:
        """The new global arrays from a SecAgg+ round's unmasked sums: each sent group moves by
        ``sum_i r_i update_i / sum_i r_i`` (FedAvg with the weights bounded at the hospitals). A group
        whose result is not finite or beyond ``federation.max_abs_value`` is kept as it was."""
        record = self.train_record
        if self.current is None or len(participants) < self.min_sites:
            record.failure = (f"{len(participants)} hospitals in the secure sum, fewer than federation.min_sites="
                              f"{self.min_sites}; global model unchanged")
            return None
        current = {g: {k: wire_array(self.current[k]) for k in self.reference[g]} for g in GROUPS}
        new = {k: v for arrays in current.values() for k, v in arrays.items()}
        for group in self.sent_groups:
            summed, ratio_sum = sums[group]
            described: dict[str, Any] = {"rule": "fedavg", "weight": self.rules[group].weight,
                                         "secure_aggregation": "secaggplus", "participants": list(participants),
                                         "weight_ratio_sum": ratio_sum}
            moved = {}
            if ratio_sum > 1e-9:
                for key, value in current[group].items():
                    moved[key] = as_reference_dtype(value.astype(np.float64) + summed[key] / ratio_sum, value)
            if not moved:
                described["kept"] = "the hospitals' weights sum to 0"
            elif not all(np.all(np.isfinite(v)) and within_magnitude(v, self.limits.max_abs_value)
                         for v in moved.values()):
                described["kept"] = (f"the aggregate is not finite or exceeds federation.max_abs_value="
                                     f"{self.limits.max_abs_value:g}")
                logger.warning("round %d: group %s kept unchanged: %s", server_round, group, described["kept"])
            else:
                new.update(moved)
            record.groups[group] = described
        record.aggregated = True
        return ArrayRecord({k: Array(np.ascontiguousarray(new[k])) for k in self.current.keys()})

    def group_weights(self, replies: Sequence[SiteReply]) -> dict[str, list[float]]:
        """Each sent group's weight per reply, as its rule says."""
        weights: dict[str, list[float]] = {}
        for group in self.sent_groups:
            rule = self.rules[group]
            if rule.weight == "uniform":
                weights[group] = [1.0] * len(replies)
            else:
                weights[group] = [float(r.metrics[protocol.WEIGHT_KEYS[rule.weight]]) for r in replies]
        return weights

    def aggregate_arrays(self, current: ArrayRecord, replies: Sequence[SiteReply],
                         record: RoundRecord | None = None) -> ArrayRecord:
        """The new global ArrayRecord from checked replies (pure math in ``server.aggregate``)."""
        current_groups = {g: {k: wire_array(current[k]) for k in self.reference[g]} for g in GROUPS}
        local = [g for g in GROUPS if self.rules[g].local]
        outcomes = aggregate_group_outcomes(current_groups, [r.groups for r in replies], self.group_weights(replies),
                                            local, {g: self.aggregation.policy(g) for g in GROUPS})
        if record is not None:
            record.groups = {g: self._describe(g, outcome, replies) for g, outcome in outcomes.items() if g not in local}
        flat = {k: v for outcome in outcomes.values() for k, v in outcome.arrays.items()}
        current_dtypes = {k: v.dtype for arrays in current_groups.values() for k, v in arrays.items()}
        return ArrayRecord({k: Array(np.ascontiguousarray(flat[k].astype(current_dtypes[k], copy=False)))
                            for k in current.keys()})

    def _describe(self, group: str, outcome: GroupOutcome, replies: Sequence[SiteReply]) -> dict[str, Any]:
        rule = self.rules[group]
        described: dict[str, Any] = {
            "rule": rule.rule,
            "weight": rule.weight,
            "shares": {replies[i].site: share for i, share in zip(outcome.members, outcome.shares)},
            "clipped": [replies[i].site for i in outcome.clipped],
        }
        if outcome.kept:
            described["kept"] = outcome.kept
            logger.warning("round %d: group %s kept unchanged: %s", self._round, group, outcome.kept)
        return described

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._round = server_round
        self.evaluate_record = RoundRecord()
        nodes = sorted(grid.get_node_ids())  # no second wait: the round waited before training
        self._asked["evaluate"] = nodes
        self._sent["evaluate"] = self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE,
                                                self.evaluate_record)
        return self._sent["evaluate"]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pooled metrics of every valid hospital's held-out patches; per-site metrics in the record."""
        self._round = server_round
        record = self.evaluate_record
        valid: list[SiteReply] = []
        for msg, verdict in self._admit(replies, "evaluate", record):
            try:
                reply = check_evaluate_reply(msg, self.limits, verdict.name)
                assert reply.evaluation is not None
                released = self.released_test.get(reply.site)
                examples = int(reply.metrics[protocol.REAL_EXAMPLES])
                if released is not None and examples > released:
                    raise ReplyError(f"evaluation counts {examples} held-out patches, more than the {released} "
                                     f"its train-time class counts reported")
                metrics = summary_metrics(reply.evaluation)
            except Exception as error:
                self._exclude(record, verdict, _reason(error), "evaluate")
                continue
            valid.append(reply)
            record.sites[reply.site] = metrics
        if not valid:
            record.failure = "no valid evaluate reply"
            return None
        record.global_metrics = pooled_metrics(r.evaluation for r in valid if r.evaluation is not None)
        record.aggregated = True
        return MetricRecord(record.global_metrics)

    def summary(self) -> None:
        for group in GROUPS:
            rule = self.rules[group]
            if rule.local:
                logger.info("  %-13s kept local", group)
                continue
            how = {"fedavg": f"FedAvg weighted by {rule.weight}", "median": "coordinate-wise median",
                   "trimmed_mean": f"trimmed mean (cut {rule.trim_fraction:g} each end)"}[rule.rule]
            logger.info("  %-13s %s", group, how)
        share = self.aggregation.max_weight_share
        logger.info("  max weight share: %s, update clipping: %s",
                    "auto (max(2/n, 0.5) of the n hospitals taking part)" if share == AUTO_SHARE else f"{share:g}",
                    "off" if self.aggregation.clip_update_norm is None
                    else f"{self.aggregation.clip_update_norm:g} x median norm")
        logger.info("  transport dtype: %s", self.transport)


def _reason(error: BaseException) -> str:
    """An exclusion reason: the message of a ReplyError, the type and message of anything else."""
    text = str(error)[:500]
    return text if isinstance(error, ReplyError) else f"{type(error).__name__}: {text}"
