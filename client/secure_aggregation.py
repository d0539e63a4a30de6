"""The hospital's side of SecAgg+: Flower's ``secaggplus_mod``, unchanged, in front of the ClientApp.

``secure_aggregation_mod`` is installed on the ClientApp for every run. A train instruction without
SecAgg+ records passes straight through. With them, Flower's mod answers the ``setup``,
``share_keys`` and ``unmask`` stages itself (key pairs, Shamir shares of the mask seed and of the
key, encrypted for each neighbour; shares for unmasking), and in ``collect_masked_vectors`` it calls
the ClientApp's training and masks what that returns. The ClientApp's training reply under SecAgg+
holds no group in the clear: ``secure_vector`` turns the trained groups into the vector that is
summed (``common.secure_aggregation.VectorLayout``: the clipped update times the weight ratio,
then the ratio), which ``_masked_input`` hands to the mod in the layout it reads (Flower's legacy
``fitres.*`` records, weight = the mod's own ``max_weight`` so that its ratio is exactly 1: the
per-group weights already travel inside the vector). The mod quantizes, adds the private and
pairwise masks, and clears every array of the reply; the ``fitres.*`` records are then removed.

A hospital that cannot contribute this round (its policy refuses, its budget is spent, an error)
replies with its status and no vector: for the coordinator it dropped out after sharing keys, and
its masks are removed with its neighbours' shares.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from common import protocol
from common.model import group_entries
from common.records import from_arrayrecord
from common.secure_aggregation import (
    CLIPPED_GROUPS,
    VectorLayout,
    clip_update,
    secaggplus_config,
    weight_bound,
    weight_ratio,
)

#: Reply record of the ClientApp's training under SecAgg+: the vector to mask (float64 arrays "0", "1", ...).
SECURE_VECTOR = "secure-vector"
#: The legacy FitRes records Flower's mod reads.
_FITRES = ("fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status")


def under_secure_aggregation(msg: Message) -> bool:
    """Whether an instruction belongs to a SecAgg+ round (it carries the protocol's config record)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_vector(msg: Message, run: Mapping[str, object], trained: Mapping[str, torch.Tensor], transport: str,
                  metrics: Mapping[str, float]) -> tuple[ArrayRecord, int]:
    """The vector this hospital contributes to the round's secure sum, and how many groups it clipped.

    For each group the coordinator sent (in its order): the update (trained minus received, float64),
    its learnt weights clipped to ``federation.secaggplus.update_norm`` and its derived buffers kept
    within ``clipping_range`` (``common.secure_aggregation.clip_update``), times ``min(w, M) / M`` for the group's FedAvg
    weight ``w`` from this reply's metrics and its bound ``M`` (``common.secure_aggregation.weight_bound``).
    """
    federation, train = run["federation"], run["train"]
    assert isinstance(federation, Mapping) and isinstance(train, Mapping)
    secure = secaggplus_config(federation["secaggplus"])
    config = msg.content.config_records[protocol.CONFIG]
    sent = [g for g in str(config[protocol.SENT_GROUPS]).split(",") if g]
    updates: dict[str, dict[str, np.ndarray]] = {}
    ratios: dict[str, float] = {}
    clipped = 0
    for group in sent:
        reference = group_entries(trained, [group])
        received = from_arrayrecord(msg.content.array_records[group], reference, transport)
        update = {k: reference[k].detach().double().numpy() - received[k].double().numpy() for k in reference}
        updates[group], was_clipped = clip_update(update, secure.update_norm, secure.clipping_range)
        clipped += int(was_clipped)
        kind = str(federation["aggregation"][group]["weight"])
        weight = 1.0 if kind == "uniform" else float(metrics[protocol.WEIGHT_KEYS[kind]])
        ratios[group] = weight_ratio(weight, weight_bound(kind, secure, int(train["local_steps"])))
    layout = VectorLayout.of(sent, {g: {k: tuple(v.shape) for k, v in updates[g].items()} for g in sent})
    vector = layout.encode(updates, ratios)
    return ArrayRecord({str(i): Array(np.ascontiguousarray(a)) for i, a in enumerate(vector)}), clipped


class _NotContributing(Exception):
    """The hospital's training produced no vector this round; carries its status reply."""

    def __init__(self, reply: Message) -> None:
        super().__init__("no vector this round")
        self.reply = reply


def _is_ok(reply: Message) -> bool:
    if reply.has_error() or protocol.SITE not in reply.content.config_records:
        return False
    return reply.content.config_records[protocol.SITE].get(protocol.STATUS) == protocol.STATUS_OK


def _masked_input(call_next: ClientAppCallable) -> ClientAppCallable:
    """The ClientApp's training as Flower's mod expects to call it: the vector in ``fitres.*``."""

    def call(msg: Message, context: Context) -> Message:
        reply = call_next(msg, context)
        if not _is_ok(reply) or SECURE_VECTOR not in reply.content.array_records:
            raise _NotContributing(reply)
        vector = reply.content.array_records.pop(SECURE_VECTOR)
        state = context.state.config_records[RECORD_KEY_STATE]
        reply.content["fitres.parameters"] = ArrayRecord([vector[str(i)].numpy() for i in range(len(vector))])
        # The mod weighs the vector by num_examples / max_weight: exactly 1 here (the weights are inside).
        reply.content["fitres.num_examples"] = MetricRecord({"num_examples": float(state["max_weight"])})
        reply.content["fitres.metrics"] = ConfigRecord({})
        reply.content["fitres.status"] = ConfigRecord({"code": 0, "message": ""})
        return reply

    return call


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ train instructions; everything else passes through."""
    if msg.metadata.message_type != MessageType.TRAIN or not under_secure_aggregation(msg):
        return call_next(msg, context)
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    if stage != Stage.COLLECT_MASKED_VECTORS:
        return secaggplus_mod(msg, context, call_next)
    try:
        reply = secaggplus_mod(msg, context, _masked_input(call_next))
    except _NotContributing as stop:
        return stop.reply
    for name in _FITRES:
        if name in reply.content:
            del reply.content[name]
    return reply


__all__ = ["CLIPPED_GROUPS", "SECURE_VECTOR", "secure_aggregation_mod", "secure_vector", "under_secure_aggregation"]
