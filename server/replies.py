"""Checking a hospital's reply before anything in it is used.

A reply is used only if it carries every expected group with exactly the global model's keys,
shapes and wire dtypes, finite values, and finite non-negative aggregation weights. Anything else
is a ``ReplyError`` whose message says what was wrong; the strategy leaves that hospital out of the
round and logs its name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Message

from common import protocol
from common.records import decode_array, expected_wire_dtype, payload_bytes


class ReplyError(ValueError):
    """A reply that cannot be used; the message names the problem."""


@dataclass
class SiteReply:
    """A checked reply: who sent it, its metrics, and its groups decoded to float32 arrays."""

    node_id: int
    site: str
    metrics: dict[str, float]
    groups: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    bytes_received: int = 0
    class_counts: dict[str, Any] | None = None


def site_name(msg: Message) -> str:
    """The hospital's name as it reported it, else its node id."""
    try:
        if not msg.has_error() and protocol.SITE in msg.content.config_records:
            return str(msg.content.config_records[protocol.SITE][protocol.SITE_NAME])
    except Exception:  # a malformed record must not stop us naming the node
        pass
    return f"node-{msg.metadata.src_node_id}"


def _finite_metrics(msg: Message, required: Sequence[str]) -> dict[str, Any]:
    if protocol.METRICS not in msg.content.metric_records:
        raise ReplyError("no metrics record")
    metrics = {k: v for k, v in msg.content.metric_records[protocol.METRICS].items()}
    for key in required:
        if key not in metrics:
            raise ReplyError(f"metric {key!r} missing")
        value = float(metrics[key])  # type: ignore[arg-type]
        if not math.isfinite(value) or value < 0:
            raise ReplyError(f"metric {key!r} is {value}; expected a finite number >= 0")
    kept: dict[str, Any] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    # Lists of numbers (e.g. a hospital's privacy accountant history) are kept as lists of floats.
    kept.update({k: [float(x) for x in v] for k, v in metrics.items()
                 if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)})
    return kept


def budget_exhausted_metrics(msg: Message) -> dict[str, Any] | None:
    """A reply whose hospital stopped for its privacy budget: its metrics (else None)."""
    if msg.has_error():
        return None
    site = msg.content.config_records.get(protocol.SITE)
    if site is None or str(site.get(protocol.STATUS, "")) != protocol.STATUS_BUDGET_EXHAUSTED:
        return None
    try:
        metrics = _finite_metrics(msg, [])
    except ReplyError:
        metrics = {}
    return {"site": site_name(msg), "message": str(site.get(protocol.STATUS_MESSAGE, "")), **metrics}


def check_status(msg: Message) -> None:
    if msg.has_error():
        raise ReplyError(f"Flower error (code {msg.error.code}): {msg.error.reason}")
    site = msg.content.config_records.get(protocol.SITE)
    if site is None:
        raise ReplyError("no site record")
    status = str(site.get(protocol.STATUS, "missing"))
    if status != "ok":
        raise ReplyError(f"hospital reported {status}: {site.get(protocol.STATUS_MESSAGE, '')}")


def check_train_reply(
    msg: Message,
    reference: Mapping[str, Mapping[str, torch.Tensor]],
    transport: str,
    weight_keys: Sequence[str],
) -> SiteReply:
    """Validate a train reply against the global groups in ``reference`` (group -> state)."""
    check_status(msg)
    metrics = _finite_metrics(msg, weight_keys)
    groups: dict[str, dict[str, np.ndarray]] = {}
    received = 0
    for group, state in reference.items():
        if group not in msg.content.array_records:
            raise ReplyError(f"group {group!r} missing")
        record = msg.content.array_records[group]
        keys = set(record.keys())
        if keys != set(state):
            missing, extra = sorted(set(state) - keys), sorted(keys - set(state))
            raise ReplyError(f"group {group!r} keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
        decoded: dict[str, np.ndarray] = {}
        for key, like in state.items():
            array = record[key]
            if tuple(array.shape) != tuple(like.shape):
                raise ReplyError(f"{key}: shape {tuple(array.shape)}, expected {tuple(like.shape)}")
            wire = expected_wire_dtype(like, transport)
            if np.dtype(array.dtype) != wire:
                raise ReplyError(f"{key}: dtype {array.dtype}, expected {wire}")
            tensor = decode_array(array.numpy(), like, transport)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ReplyError(f"{key}: non-finite values")
            decoded[key] = tensor.numpy()
        groups[group] = decoded
        received += payload_bytes(record)
    counts = msg.content.config_records[protocol.SITE].get(protocol.CLASS_COUNTS_JSON)
    return SiteReply(msg.metadata.src_node_id, site_name(msg), metrics, groups, received,
                     json.loads(str(counts)) if counts else None)


def check_evaluate_reply(msg: Message) -> SiteReply:
    check_status(msg)
    metrics = _finite_metrics(msg, [protocol.REAL_EXAMPLES])
    return SiteReply(msg.metadata.src_node_id, site_name(msg), metrics)
