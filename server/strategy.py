"""Per-group FedAvg on Flower's public Strategy API.

Each of the generator, discriminator and classifier groups is averaged with its own weighting
(default: discriminator and classifier by real examples, generator by generator steps), or left
local to the hospitals. Replies are checked first (``server.replies``); a reply that fails is left
out and the hospital named in the log. The math is ``common.aggregate``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.aggregate import aggregate_groups
from common.evaluation import METRIC_NAMES
from common.model import GROUPS
from common.records import payload_bytes, to_arrayrecord
from server.replies import (
    ReplyError,
    SiteReply,
    budget_exhausted_metrics,
    check_evaluate_reply,
    check_train_reply,
    site_name,
)

logger = logging.getLogger("fedvitgan.server")


@dataclass(frozen=True)
class GroupRule:
    """How one group is aggregated."""

    weight: str = "real_examples"  # a key of protocol.WEIGHT_KEYS, or "uniform"
    local: bool = False

    def __post_init__(self) -> None:
        if self.weight not in (*protocol.WEIGHT_KEYS, "uniform"):
            raise ValueError(f"aggregation weight {self.weight!r}: choose one of {[*protocol.WEIGHT_KEYS, 'uniform']}")


@dataclass
class RoundRecord:
    """What one phase (train or evaluate) of a round saw: per-site metrics, exclusions, bytes."""

    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    bytes_to_sites: int = 0
    bytes_from_sites: int = 0
    class_counts: dict[str, Any] = field(default_factory=dict)
    aggregated: bool = False
    #: Hospitals that did not train because the round would exceed their privacy budget (their
    #: reply's site name, message and DP metrics); they are also in ``excluded``.
    budget_exhausted: list[dict[str, Any]] = field(default_factory=list)


class GroupedFedAvg(Strategy):
    """FedAvg applied to each parameter group separately."""

    def __init__(
        self,
        reference_state: Mapping[str, torch.Tensor],
        rules: Mapping[str, GroupRule],
        transport: str,
        run_config_json: str,
        num_sites: int,
        min_sites: int = 1,
        wait_for_sites_s: float = 600.0,
    ) -> None:
        missing = [g for g in GROUPS if g not in rules]
        if missing:
            raise ValueError(f"aggregation rules missing for groups {missing}")
        self.reference = {g: {k: v for k, v in reference_state.items() if k.startswith(g + ".")} for g in GROUPS}
        self.rules = dict(rules)
        self.transport = transport
        self.run_config_json = run_config_json
        self.num_sites = num_sites
        self.min_sites = max(1, min_sites)
        self.wait_for_sites_s = wait_for_sites_s
        self.current: ArrayRecord | None = None
        self.train_record = RoundRecord()
        self.evaluate_record = RoundRecord()

    # ------------------------------------------------------------------ helpers
    @property
    def sent_groups(self) -> list[str]:
        return [g for g in GROUPS if not self.rules[g].local]

    def _nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_for_sites_s
        nodes = list(grid.get_node_ids())
        while len(nodes) < self.num_sites and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        if len(nodes) < self.num_sites:
            logger.warning("only %d of %d hospitals connected; going on with them", len(nodes), self.num_sites)
        return sorted(nodes)

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
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
        nodes = self._nodes(grid)
        record.bytes_to_sites = sent * len(nodes)
        return [Message(content=content, dst_node_id=node, message_type=message_type, group_id=str(server_round))
                for node in nodes]

    def _exclude(self, record: RoundRecord, msg: Message, error: Exception, phase: str) -> None:
        name = site_name(msg)
        logger.warning("round %s: leaving out %s's %s reply: %s", self._round, name, phase, error)
        record.excluded.append({"site": name, "node_id": int(msg.metadata.src_node_id), "reason": str(error)})

    # ------------------------------------------------------------------ Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round = server_round
        self.train_record = RoundRecord()
        return self._messages(server_round, arrays, config, grid, MessageType.TRAIN, self.train_record)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._round = server_round
        record = self.train_record
        weight_keys = sorted({protocol.WEIGHT_KEYS[r.weight] for r in self.rules.values() if r.weight != "uniform"})
        sent_reference = {g: self.reference[g] for g in self.sent_groups}
        valid: list[SiteReply] = []
        for msg in replies:
            stopped = budget_exhausted_metrics(msg)
            if stopped is not None:
                record.budget_exhausted.append(stopped)
            try:
                reply = check_train_reply(msg, sent_reference, self.transport, weight_keys)
            except (ReplyError, ValueError, KeyError, TypeError) as error:
                self._exclude(record, msg, error, "train")
                continue
            if reply.site in record.sites:
                self._exclude(record, msg, ReplyError(f"a second reply from site {reply.site!r}"), "train")
                continue
            valid.append(reply)
            record.sites[reply.site] = reply.metrics
            record.bytes_from_sites += reply.bytes_received
            if reply.class_counts is not None:
                record.class_counts[reply.site] = reply.class_counts
        if len(valid) < self.min_sites or self.current is None:
            logger.warning("round %d: %d valid replies (< federation.min_sites=%d); global model unchanged",
                           server_round, len(valid), self.min_sites)
            return None, None
        new_arrays = self.aggregate_arrays(self.current, valid)
        record.aggregated = True
        return new_arrays, MetricRecord({"sites-aggregated": len(valid), "sites-excluded": len(record.excluded)})

    def aggregate_arrays(self, current: ArrayRecord, replies: Sequence[SiteReply]) -> ArrayRecord:
        """The new global ArrayRecord from checked replies (pure math in ``common.aggregate``)."""
        current_groups = {g: {k: current[k].numpy() for k in self.reference[g]} for g in GROUPS}
        weights: dict[str, list[float]] = {}
        for group, rule in self.rules.items():
            if rule.local:
                continue
            if rule.weight == "uniform":
                weights[group] = [1.0] * len(replies)
            else:
                weights[group] = [r.metrics[protocol.WEIGHT_KEYS[rule.weight]] for r in replies]
                if sum(weights[group]) <= 0:
                    logger.warning("group %s: all weights are 0; averaging uniformly", group)
                    weights[group] = [1.0] * len(replies)
        local = [g for g, r in self.rules.items() if r.local]
        merged = aggregate_groups(current_groups, [r.groups for r in replies], weights, local)
        flat = {k: v for group in GROUPS for k, v in merged[group].items()}
        return ArrayRecord({k: Array(np.ascontiguousarray(flat[k].astype(current[k].numpy().dtype))) for k in current.keys()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._round = server_round
        self.evaluate_record = RoundRecord()
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE, self.evaluate_record)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the hospitals' classifier metrics (NaN AUROCs left out)."""
        self._round = server_round
        record = self.evaluate_record
        valid: list[SiteReply] = []
        for msg in replies:
            try:
                reply = check_evaluate_reply(msg)
            except (ReplyError, ValueError, KeyError, TypeError) as error:
                self._exclude(record, msg, error, "evaluate")
                continue
            valid.append(reply)
            record.sites[reply.site] = reply.metrics
        if not valid:
            return None
        return MetricRecord(weighted_site_metrics([r.metrics for r in valid]))

    def summary(self) -> None:
        for group in GROUPS:
            rule = self.rules[group]
            logger.info("  %-13s %s", group, "kept local" if rule.local else f"FedAvg weighted by {rule.weight}")
        logger.info("  transport dtype: %s", self.transport)


def weighted_site_metrics(sites: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Global figures: each metric's mean over hospitals weighted by their held-out examples."""
    out: dict[str, float] = {}
    total = sum(float(s[protocol.REAL_EXAMPLES]) for s in sites)
    for name in METRIC_NAMES:
        pairs = [(float(s[name]), float(s[protocol.REAL_EXAMPLES])) for s in sites
                 if name in s and math.isfinite(float(s[name]))]
        weight = sum(w for _, w in pairs)
        out[name] = sum(v * w for v, w in pairs) / weight if weight > 0 else math.nan
    out["examples"] = total
    return out
