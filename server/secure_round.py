"""The coordinator's side of SecAgg+: a training round whose groups are summed securely.

The hospitals run Flower's ``secaggplus_mod`` unchanged (``client/secure_aggregation.py``). Flower's
own server side, ``SecAggPlusWorkflow``, cannot drive them here: it runs inside Flower's legacy
``DefaultWorkflow`` (a ``LegacyContext``, a legacy ``Strategy`` and ``FitIns``/``FitRes`` with one
flat parameter list and one weight), while this project's round loop (``server/federation.py``)
sends per-group records, weighs each group by its own count, checks and records every reply and
stops after repeated failed rounds. So ``SecAggPlusCoordinator`` drives the same four stages with
the same wire keys and Flower's primitives (Shamir's ``combine_shares``, ``generate_shared_key``,
``pseudo_rand_gen``, ``dequantize``):

1. ``setup``: the protocol's parameters to every hospital; each answers with two public keys;
2. ``share_keys``: each hospital gets its neighbours' public keys and returns, encrypted for each
   neighbour, Shamir shares of its mask seed and of its first secret key;
3. ``collect_masked_vectors``: the round's train instruction plus the ciphertexts addressed to the
   hospital; it trains and answers with its metrics and its masked, quantized vector (its clipped
   update times its weight ratio, and the ratio: ``common.secure_aggregation.VectorLayout``);
4. ``unmask``: the hospitals whose vectors are in the sum return the shares that remove the masks:
   the mask seeds of those hospitals, the secret keys of those that dropped out after sharing keys.

Two departures from ``SecAggPlusWorkflow`` (flwr 1.42), both about dropouts: a hospital lost
before it shared keys is outside the protocol (no hospital holds a share of it, so it is never
asked for at ``unmask``), and a dropped hospital's pairwise masks are removed only for the
neighbours whose vectors are in the sum (two neighbours that both drop added no mask to it).

The coordinator sees each hospital's masked vector, which on its own is uniformly random; only the
sum is unmasked. Hospitals whose reply fails the checks are left out of the sum before unmasking
and count as dropouts. Below ``reconstruction_threshold`` the round fails cleanly: the global
model is kept and the round counts toward ``federation.max_failed_rounds``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from common.federation_config import FederationConfig
from common.secure_aggregation import SECAGGPLUS, SecAggPlusConfig, VectorLayout, neighbour_count
from server.collect import send_and_collect
from server.strategy import GroupedStrategy

logger = logging.getLogger("fedvitgan.server")

#: ``send(messages, timeout_s)``: deliver a stage's messages, return the replies that arrived in time.
Send = Callable[[list[Message], float], list[Message]]

#: Largest public key or share the coordinator accepts from a hospital (bytes).
MAX_KEY_BYTES = 4096


class SecureAggregationFailed(RuntimeError):
    """The round's secure sum cannot be completed (the message says at which stage and why)."""


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records: array data, bytes and strings, 8 per number (no framing)."""
    total = 0
    for record in content.array_records.values():
        total += sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


@dataclass
class SecureRoundLog:
    """What ``summary.json`` records of a secure round (node ids; names are added by the caller)."""

    hospitals: list[int] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    dropouts: list[dict[str, Any]] = field(default_factory=list)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    num_shares: int = 0
    threshold: int = 0
    failure: str | None = None

    def entry(self, name: Callable[[int], str]) -> dict[str, Any]:
        return {"protocol": SECAGGPLUS, "hospitals": [name(n) for n in self.hospitals],
                "participants": [name(n) for n in self.participants],
                "dropouts": [{"site": name(d["node_id"]), **d} for d in self.dropouts],
                "num_shares": self.num_shares, "reconstruction_threshold": self.threshold,
                "bytes": self.bytes, "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                **({"failure": self.failure} if self.failure else {})}


def neighbour_ring(nodes: Sequence[int], shares: int) -> dict[int, set[int]]:
    """SecAgg+'s sparse graph, as Flower builds it: the nodes in a random ring, each sharing with
    itself and the ``shares // 2`` nodes on either side (``shares`` from ``neighbour_count``)."""
    ring = list(nodes)
    secrets.SystemRandom().shuffle(ring)
    half = shares >> 1
    return {node: {ring[(i + offset) % len(ring)] for offset in range(-half, half + 1)} for i, node in enumerate(ring)}


class SecAggPlusCoordinator:
    """One round of SecAgg+ over ``nodes`` (see the module docstring)."""

    def __init__(self, cfg: SecAggPlusConfig, layout: VectorLayout, server_round: int, send: Send) -> None:
        self.cfg = cfg
        self.layout = layout
        self.round = server_round
        self.send = send
        self.log = SecureRoundLog(threshold=cfg.reconstruction_threshold)
        self.neighbours: dict[int, set[int]] = {}
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        self.active: set[int] = set()
        self.shared: set[int] = set()  # hospitals whose key shares reached their neighbours
        self.forward: dict[int, tuple[list[int], list[bytes]]] = {}
        self.masked_sum: list[np.ndarray] | None = None

    # ------------------------------------------------------------------ helpers
    def _drop(self, node: int, stage: str, reason: str) -> None:
        if node in self.active:
            self.active.discard(node)
            self.log.dropouts.append({"node_id": int(node), "stage": stage, "reason": reason[:300]})
            logger.warning("round %d: secure aggregation: node %d dropped out at %s: %s", self.round, node, stage, reason)

    def _send_stage(self, stage: str, messages: list[Message], timeout_s: float) -> list[Message]:
        """Send one stage's messages; every reply that came back in time (bytes and seconds logged)."""
        started = time.perf_counter()
        replies = self.send(messages, timeout_s)
        self.log.bytes[stage] = {"to_sites": sum(content_bytes(m.content) for m in messages),
                                 "from_sites": sum(content_bytes(r.content) for r in replies if not r.has_error())}
        self.log.seconds[stage] = time.perf_counter() - started
        return replies

    def _exchange(self, stage: str, messages: list[Message], timeout_s: float) -> dict[int, Message]:
        """Send one stage's messages; the usable reply of each node (error replies and silence drop it)."""
        sent = {int(m.metadata.dst_node_id): m for m in messages}
        replies = self._send_stage(stage, messages, timeout_s)
        by_id = {m.metadata.message_id: node for node, m in sent.items() if m.metadata.message_id}
        answered: dict[int, Message] = {}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node == SUPERLINK_NODE_ID:
                node = by_id.get(reply.metadata.reply_to_message_id, node)
            if node not in sent or node in answered:
                logger.warning("round %d: %s: ignoring a reply from node %d (not asked, or a duplicate)",
                               self.round, stage, node)
                continue
            answered[node] = reply
        for node in sent:
            if node not in answered:
                self._drop(node, stage, f"no reply within {timeout_s:g} s")
            elif answered[node].has_error():
                self._drop(node, stage, f"Flower error: {str(answered[node].error.reason)[:200]}")
        return {n: m for n, m in answered.items() if n in self.active}

    def _message(self, node: int, record: dict[str, Any], content: RecordDict | None = None) -> Message:
        content = content if content is not None else RecordDict()
        content[RECORD_KEY_CONFIGS] = ConfigRecord(record)
        return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(self.round))

    def _check_threshold(self, stage: str, nodes: Iterable[int], among: set[int]) -> None:
        short = sorted(n for n in nodes if len(self.neighbours[n] & among) < self.cfg.reconstruction_threshold)
        if short:
            self.log.failure = (f"secure aggregation stopped at {stage}: node(s) {short} have fewer than "
                                f"reconstruction_threshold={self.cfg.reconstruction_threshold} neighbours left")
            raise SecureAggregationFailed(self.log.failure)

    # ------------------------------------------------------------------ stages
    def setup(self, nodes: Sequence[int]) -> None:
        """Stage 1: parameters out, two public keys back from each hospital."""
        self.log.hospitals = sorted(int(n) for n in nodes)
        if len(nodes) < max(2, self.cfg.reconstruction_threshold):
            self.log.failure = (f"secure aggregation needs at least {max(2, self.cfg.reconstruction_threshold)} "
                                f"hospitals (reconstruction_threshold), {len(nodes)} connected")
            raise SecureAggregationFailed(self.log.failure)
        shares = neighbour_count(self.cfg.num_shares, len(nodes))  # odd, or every hospital
        self.log.num_shares = shares
        self.neighbours = neighbour_ring(nodes, shares)
        self.active = set(self.log.hospitals)
        record = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(nodes), Key.SHARE_NUMBER: shares,
                  Key.THRESHOLD: self.cfg.reconstruction_threshold, Key.CLIPPING_RANGE: self.cfg.clipping_range,
                  Key.TARGET_RANGE: self.cfg.quantization_range, Key.MOD_RANGE: self.cfg.modulus_range,
                  Key.MAX_WEIGHT: self.cfg.max_weight}
        replies = self._exchange(Stage.SETUP, [self._message(n, dict(record)) for n in self.log.hospitals],
                                 self.cfg.stage_timeout_s)
        for node, reply in replies.items():
            keys = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
            pk1, pk2 = keys.get(Key.PUBLIC_KEY_1), keys.get(Key.PUBLIC_KEY_2)
            if not all(isinstance(k, bytes) and 0 < len(k) <= MAX_KEY_BYTES for k in (pk1, pk2)):
                self._drop(node, Stage.SETUP, "malformed public keys")
                continue
            self.public_keys[node] = (cast(bytes, pk1), cast(bytes, pk2))
        seen: dict[bytes, int] = {}
        for node, pair in sorted(self.public_keys.items()):
            for key in pair:
                if key in seen and node in self.active:
                    self._drop(node, Stage.SETUP, f"public key identical to node {seen[key]}'s")
                seen.setdefault(key, node)
        self._check_threshold(Stage.SETUP, self.active, self.active)

    def share_keys(self) -> None:
        """Stage 2: neighbours' public keys out, encrypted shares (for the neighbours) back."""
        messages = []
        for node in sorted(self.active):
            keys = {str(n): list(self.public_keys[n]) for n in sorted(self.neighbours[node] & self.active)}
            messages.append(self._message(node, {**keys, Key.STAGE: Stage.SHARE_KEYS}))
        replies = self._exchange(Stage.SHARE_KEYS, messages, self.cfg.stage_timeout_s)
        forward: dict[int, tuple[list[int], list[bytes]]] = {}
        for node, reply in replies.items():
            record = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
            dsts, ciphertexts = record.get(Key.DESTINATION_LIST), record.get(Key.CIPHERTEXT_LIST)
            if not isinstance(dsts, list) or not isinstance(ciphertexts, list) or len(dsts) != len(ciphertexts) \
                    or not all(isinstance(c, bytes) and len(c) <= 4 * MAX_KEY_BYTES for c in ciphertexts):
                self._drop(node, Stage.SHARE_KEYS, "malformed key shares")
                continue
            expected = (self.neighbours[node] & self.active) - {node}
            if set(dsts) != expected or len(dsts) != len(expected):
                self._drop(node, Stage.SHARE_KEYS, "key shares addressed to other hospitals than its neighbours")
                continue
            for dst, ciphertext in zip(dsts, ciphertexts):
                srcs, texts = forward.setdefault(int(dst), ([], []))
                srcs.append(node)
                texts.append(ciphertext)
        # Only the shares of hospitals still in the protocol travel on.
        self.shared = set(self.active)
        self.forward = {n: ([s for s in srcs if s in self.shared], [t for s, t in zip(srcs, texts) if s in self.shared])
                        for n, (srcs, texts) in forward.items() if n in self.shared}
        self._check_threshold(Stage.SHARE_KEYS, self.active, self.active)

    def collect_messages(self, train: Iterable[Message]) -> list[Message]:
        """Stage 3's instructions: each active hospital's train instruction (its records shared, not
        copied) plus the key shares addressed to it."""
        out = []
        for msg in train:
            node = int(msg.metadata.dst_node_id)
            if node not in self.active:
                continue
            srcs, texts = self.forward.get(node, ([], []))
            content = RecordDict({name: record for name, record in msg.content.items()})
            record = {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: list(texts),
                      Key.SOURCE_LIST: [int(s) for s in srcs]}
            out.append(self._message(node, record, content))
        return out

    def collect(self, messages: list[Message], timeout_s: float) -> list[Message]:
        """Stage 3: train and mask. Every reply is returned for the caller to judge (``admit``)."""
        return self._send_stage(Stage.COLLECT_MASKED_VECTORS, messages, timeout_s)

    def admit(self, vectors: Mapping[int, Sequence[np.ndarray]], refused: Mapping[int, str]) -> None:
        """The masked vectors that enter the sum (checked by the caller); the others drop out."""
        for node, reason in refused.items():
            self._drop(node, Stage.COLLECT_MASKED_VECTORS, reason)
        for node in sorted(self.active - set(vectors)):
            self._drop(node, Stage.COLLECT_MASKED_VECTORS, "no masked vector")
        total: list[np.ndarray] | None = None
        for node in sorted(self.active):
            arrays = [np.asarray(a, dtype=np.int64) for a in vectors[node]]
            total = arrays if total is None else [t + a for t, a in zip(total, arrays)]
            if total is not None:
                total = [t & (self.cfg.modulus_range - 1) for t in total]
        self.masked_sum = total
        self.log.participants = sorted(self.active)
        dead = self.shared - self.active
        self._check_threshold(Stage.COLLECT_MASKED_VECTORS, self.active | dead, self.active)
        if total is None:
            self.log.failure = "secure aggregation: no masked vector to sum"
            raise SecureAggregationFailed(self.log.failure)

    def unmask(self) -> dict[str, tuple[dict[str, np.ndarray], float]]:
        """Stage 4: the shares back, the masks removed; the decoded sums ``{group: (sum r x update, sum r)}``."""
        assert self.masked_sum is not None
        participants = set(self.log.participants)
        dead = self.shared - participants
        messages = [self._message(n, {Key.STAGE: Stage.UNMASK,
                                      Key.ACTIVE_NODE_ID_LIST: sorted(self.neighbours[n] & participants),
                                      Key.DEAD_NODE_ID_LIST: sorted(self.neighbours[n] & dead)})
                    for n in sorted(participants)]
        replies = self._exchange(Stage.UNMASK, messages, self.cfg.stage_timeout_s)
        shares: dict[int, list[bytes]] = {n: [] for n in participants | dead}
        for node, reply in replies.items():
            record = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
            owners, values = record.get(Key.NODE_ID_LIST), record.get(Key.SHARE_LIST)
            if not isinstance(owners, list) or not isinstance(values, list) or len(owners) != len(values):
                logger.warning("round %d: unmask: malformed shares from node %d, not used", self.round, node)
                continue
            for owner, share in zip(owners, values):
                if int(owner) in shares and int(owner) in self.neighbours[node] and isinstance(share, bytes) \
                        and len(share) <= MAX_KEY_BYTES:
                    shares[int(owner)].append(share)
        short = sorted(n for n, s in shares.items() if len(s) < self.cfg.reconstruction_threshold)
        if short:
            self.log.failure = (f"secure aggregation stopped at unmask: fewer than reconstruction_threshold="
                                f"{self.cfg.reconstruction_threshold} shares came back for node(s) {short}")
            raise SecureAggregationFailed(self.log.failure)
        return self._unmasked(shares, participants, dead)

    def _unmasked(self, shares: Mapping[int, list[bytes]], participants: set[int], dead: set[int]
                  ) -> dict[str, tuple[dict[str, np.ndarray], float]]:
        assert self.masked_sum is not None
        mod = self.cfg.modulus_range
        vector = list(self.masked_sum)
        shapes = [a.shape for a in vector]
        for node in sorted(participants):  # the private mask of each hospital in the sum
            seed = combine_shares(shares[node])
            vector = [v - m for v, m in zip(vector, pseudo_rand_gen(seed, mod, shapes))]
        for node in sorted(dead):  # the pairwise masks a dropped hospital left in its neighbours' vectors
            secret_key = bytes_to_private_key(combine_shares(shares[node]))
            for other in sorted((self.neighbours[node] & participants) - {node}):
                shared = generate_shared_key(secret_key, bytes_to_public_key(self.public_keys[other][0]))
                masks = pseudo_rand_gen(shared, mod, shapes)
                # ``other`` added the mask if its id is the larger, subtracted it otherwise.
                vector = [v - m if other > node else v + m for v, m in zip(vector, masks)]
        vector = [v & (mod - 1) for v in vector]
        count, quantized = int(vector[0].reshape(-1)[0]), vector[1:]
        expected = (len(participants) * self.cfg.quantization_range) % mod
        if count != expected:
            self.log.failure = (f"secure aggregation: the unmasked sum counts {count} where {len(participants)} "
                                f"hospitals give {expected}; the round's sum is not used")
            raise SecureAggregationFailed(self.log.failure)
        summed = dequantize(quantized, self.cfg.clipping_range, self.cfg.quantization_range)
        offset = -(len(participants) - 1) * self.cfg.clipping_range
        return self.layout.decode([s + offset for s in summed])


def masked_vector_shapes(layout: VectorLayout) -> list[tuple[int, ...]]:
    """The shapes of a hospital's masked vector: the mod's weight factor, then the layout's arrays."""
    return [(1,), *layout.array_shapes]


def secure_train_phase(grid: Grid, strategy: GroupedStrategy, fed: FederationConfig, secure: SecAggPlusConfig,
                       server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
    """A round's training phase with SecAgg+: the four stages around the hospitals' training, the
    replies checked before the sum is unmasked; the new global arrays, or None (the round failed:
    ``strategy.train_record.failure`` says why). The round's protocol log goes to
    ``strategy.train_record.secure_aggregation``."""
    train = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    groups = strategy.sent_groups
    layout = VectorLayout.of(groups, {g: {k: tuple(v.shape) for k, v in strategy.reference[g].items()} for g in groups})

    def send(messages: list[Message], timeout_s: float) -> list[Message]:
        return send_and_collect(grid, messages, timeout_s=timeout_s, poll_s=fed.reply_poll_s)

    coordinator = SecAggPlusCoordinator(secure, layout, server_round, send)
    record = strategy.train_record
    new_arrays = None
    try:
        coordinator.setup([int(m.metadata.dst_node_id) for m in train])
        coordinator.share_keys()
        messages = coordinator.collect_messages(train)
        replies = coordinator.collect(messages, fed.round_timeout_s)
        vectors, refused = strategy.check_secure_train(server_round, replies, messages, masked_vector_shapes(layout),
                                                       secure.modulus_range)
        coordinator.admit(vectors, refused)
        sums = coordinator.unmask()
        new_arrays = strategy.aggregate_secure(server_round, sums,
                                               [strategy.registry.display(n) for n in coordinator.log.participants])
    except SecureAggregationFailed as failed:
        record.failure = f"{failed}; global model unchanged"
        logger.warning("round %d: %s", server_round, record.failure)
    except Exception as error:  # e.g. a share that reconstructs no valid key: never stop the run
        logger.exception("round %d: secure aggregation failed", server_round)
        coordinator.log.failure = f"secure aggregation failed ({type(error).__name__}: {str(error)[:300]})"
        record.failure = f"{coordinator.log.failure}; global model unchanged"
    finally:
        record.secure_aggregation = coordinator.log.entry(strategy.registry.display)
    return new_arrays
