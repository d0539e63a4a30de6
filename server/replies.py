"""Checking a hospital's reply before anything in it is used.

A train reply is used only if every record in it is expected, every group carries exactly the
packed arrays of the global model's group (``common/records.py``), every packed array's payload has
the byte size the reference implies and decodes to exactly the expected wire dtype and element
count, and every tensor in it holds finite values no larger in magnitude than
``federation.max_abs_value`` (a checked
group is then read in place from the reply's payload, ``DecodedGroup``: no copy of a reply is
made). Metrics follow a schema: the aggregation weights are integer counts in range (``num-examples`` at most
``federation.max_site_examples``, ``generator-steps`` at most ``train.local_steps``), other metrics
are finite numbers with printable names, and lists are allowed only where the protocol has them (the
accountant history: only in a run with DP on, at most ``max_history_entries(round)`` long). Class
counts are a small JSON object of known class names and integer counts. An evaluate reply carries
its held-out confusion matrix and score histograms, whose totals must agree with each other.

Anything else raises ``ReplyError`` (or any other exception, which the strategy treats the same):
the reply is left out, the hospital named in the log and in ``summary.json``, and the round goes on.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from common import protocol
from common.evaluation import EvaluationSummary
from common.records import (
    PACKED_PREFIX,
    check_packed_keys,
    decode_array,
    expected_wire_dtype,
    packed_layout,
    packed_size,
    slot_views,
    wire_array,
)

#: A site name: what simulations/certs.py allows for a hospital's key files.
SITE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
#: Metric names: printable text such as ``loss/d_real`` or ``acceptance/<class name>``.
MAX_METRIC_NAME = 160
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
#: Bytes a ``.npy`` payload may carry beyond its data (its header).
NPY_HEADER_MAX = 4096
MAX_METRICS = 512
MAX_LIST = 100_000
MAX_TEXT = 4096
MAX_CLASS_COUNTS_JSON = 65_536
#: Metric lists a train reply may carry (a hospital's privacy accountant history).
LIST_METRICS = frozenset({protocol.DP_HISTORY_NOISE, protocol.DP_HISTORY_RATE, protocol.DP_HISTORY_STEPS})
SITE_KEYS = frozenset({protocol.SITE_NAME, protocol.STATUS, protocol.STATUS_MESSAGE, protocol.CLASS_COUNTS_JSON})
COUNT_SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"


class ReplyError(ValueError):
    """A reply that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class ReplyLimits:
    """What the server knows a valid reply must respect (from its own config)."""

    class_names: tuple[str, ...]
    score_bins: int
    max_site_examples: int
    max_generator_steps: int
    #: Largest magnitude a floating-point model value may have (``federation.max_abs_value``; None: any finite value).
    max_abs_value: float | None = None
    #: Whether the run trains with DP; only then may a train reply carry an accountant history.
    privacy_enabled: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def decoded(wire: np.ndarray, like: torch.Tensor, transport: str) -> np.ndarray:
    """A wire array in ``like``'s dtype: ``wire`` itself when it already has it, else a conversion."""
    if not (like.is_floating_point() and transport == "bfloat16") and wire.dtype == _numpy_dtype(like):
        return wire
    return decode_array(wire, like, transport).numpy()


def _numpy_dtype(like: torch.Tensor) -> np.dtype | None:
    return _numpy_dtype_of(like.dtype)


@functools.lru_cache(maxsize=64)
def _numpy_dtype_of(dtype: torch.dtype) -> np.dtype | None:
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:  # a dtype NumPy lacks (bfloat16)
        return None


def within_magnitude(values: np.ndarray, bound: float) -> bool:
    """Whether every value is a number in ``[-bound, bound]`` (a NaN or an infinity fails): two
    passes (max, min) over the values, no copy."""
    flat = values.reshape(-1)
    if not flat.size:
        return True
    high, low = flat.max(), flat.min()
    return bool(high <= bound and low >= -bound)  # NaN compares False


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite. Fast path: ``x . x`` is a sum of non-negative terms, so it is
    finite only if every ``x`` is (an inf or NaN makes it inf or NaN); when it is not finite, which
    also happens for finite values beyond about 1e19 in float32, the values are checked one by one."""
    flat = values.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        if flat.size and np.isfinite(np.dot(flat, flat)):
            return True
    return bool(np.isfinite(flat).all())


class DecodedGroup(Mapping[str, np.ndarray]):
    """A checked group's arrays in the reference dtypes, read from the reply's payload on access.

    Where the wire dtype is the reference dtype (float32 transport of a float32 model) an entry is
    a read-only view of the payload: no copy. Otherwise (float16, bfloat16 transport) each access
    converts that one entry afresh, so a reply never holds a decoded copy of its groups.
    """

    def __init__(self, wire: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor], transport: str) -> None:
        self._wire = dict(wire)
        self._reference = reference
        self._transport = transport

    def __getitem__(self, key: str) -> np.ndarray:
        return decoded(self._wire[key], self._reference[key], self._transport)

    def __iter__(self) -> Iterator[str]:
        return iter(self._wire)

    def __len__(self) -> int:
        return len(self._wire)


@dataclass
class SiteReply:
    """A checked reply: who sent it, its metrics, and its groups (read in the reference dtypes)."""

    node_id: int
    site: str
    metrics: dict[str, Any]
    groups: dict[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    bytes_received: int = 0
    class_counts: dict[str, Any] | None = None
    evaluation: EvaluationSummary | None = None


def claimed_name(msg: Message) -> str | None:
    """The site name a reply reports, if it is a well-formed one (never raises)."""
    try:
        if msg.has_error() or protocol.SITE not in msg.content.config_records:
            return None
        name = msg.content.config_records[protocol.SITE].get(protocol.SITE_NAME)
        return name if isinstance(name, str) and SITE_NAME.match(name) else None
    except Exception:  # a malformed record must not stop us naming the node
        return None


def site_name(msg: Message) -> str:
    """The hospital's name as it reported it, else its node id."""
    return claimed_name(msg) or f"node-{msg.metadata.src_node_id}"


def _short(text: str, limit: int = 160) -> str:
    """A one-line digest of a long error text (a remote traceback): its first and last lines."""
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", text).splitlines() if line.strip()]
    clip = [line if len(line) <= limit else line[: limit - 3] + "..." for line in lines]
    return " ... ".join(clip[:1] + clip[-1:] if len(clip) > 1 else clip)


def _text(value: Any, what: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ReplyError(f"{what} is a {type(value).__name__}, expected a string")
    if len(value) > limit:
        raise ReplyError(f"{what} is {len(value)} characters long (at most {limit})")
    return value


MAX_STATUS_MESSAGE = 500


def one_line(text: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """``text`` as one printable line of at most ``limit`` characters, for logs and summary.json:
    ANSI escapes dropped, line breaks and other unprintable characters shown as spaces or ``?``."""
    text = ANSI_ESCAPE.sub("", text)
    text = " ".join(text.split())  # every run of whitespace (newlines included) -> one space
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any, what: str, low: int, high: int) -> int:
    """An integer count in ``[low, high]`` (an int, or a float with no fraction)."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) != math.floor(float(value)):
        raise ReplyError(f"{what} is {value!r}; expected an integer count")
    if not low <= value <= high:
        raise ReplyError(f"{what} is {value!r}; expected a count in [{low}, {high}]")
    return int(value)


def _site_record(msg: Message) -> Any:
    if protocol.SITE not in msg.content.config_records:
        raise ReplyError("no site record")
    record = msg.content.config_records[protocol.SITE]
    unknown = sorted(set(record.keys()) - SITE_KEYS)
    if unknown:
        raise ReplyError(f"site record has unknown entries {unknown[:5]}")
    return record


def check_status(msg: Message) -> None:
    """A reply is usable only if Flower delivered it without error and the hospital says ``ok``."""
    if msg.has_error():
        raise ReplyError(f"Flower error (code {msg.error.code}): {_short(str(msg.error.reason))}")
    record = _site_record(msg)
    status = _text(record.get(protocol.STATUS, "missing"), "status", 64)
    if status != protocol.STATUS_OK:
        message = one_line(_text(record.get(protocol.STATUS_MESSAGE, ""), "status message"))
        raise ReplyError(f"hospital reported {one_line(status, 64)}: {message}")


def _expect_records(msg: Message, arrays: Sequence[str]) -> None:
    """Only the records the protocol defines, and exactly ``arrays`` as array records."""
    content = msg.content
    extra = sorted(set(content.config_records.keys()) - {protocol.SITE})
    extra += sorted(set(content.metric_records.keys()) - {protocol.METRICS})
    extra += sorted(set(content.array_records.keys()) - set(arrays))
    if extra:
        raise ReplyError(f"unexpected records {extra[:5]}")
    missing = [g for g in arrays if g not in content.array_records]
    if missing:
        raise ReplyError(f"group {missing[0]!r} missing")


def _metrics(msg: Message) -> dict[str, Any]:
    """The reply's metrics after the generic schema: printable names, finite numbers, known lists."""
    if protocol.METRICS not in msg.content.metric_records:
        raise ReplyError("no metrics record")
    record = msg.content.metric_records[protocol.METRICS]
    if len(record) > MAX_METRICS:
        raise ReplyError(f"{len(record)} metrics (at most {MAX_METRICS})")
    metrics: dict[str, Any] = {}
    for key, value in record.items():
        if not isinstance(key, str) or not key.isprintable() or not 0 < len(key) <= MAX_METRIC_NAME:
            raise ReplyError(f"metric name {str(key)[:40]!r} is not printable text of at most {MAX_METRIC_NAME} characters")
        if isinstance(value, list):
            if len(value) > MAX_LIST or not all(_is_number(v) and math.isfinite(float(v)) for v in value):
                raise ReplyError(f"metric {key!r}: expected at most {MAX_LIST} finite numbers")
            metrics[key] = list(value)
        elif _is_number(value) and math.isfinite(float(value)):
            metrics[key] = value
        else:
            raise ReplyError(f"metric {key!r} is {value!r}; expected a finite number")
    return metrics


def _weights(metrics: dict[str, Any], limits: ReplyLimits) -> None:
    """The aggregation weights: integer counts in their ranges (replaced by ints in ``metrics``)."""
    for key in (protocol.REAL_EXAMPLES, protocol.LABELLED_EXAMPLES, protocol.GENERATOR_STEPS):
        if key not in metrics:
            raise ReplyError(f"metric {key!r} missing")
    real = _integer(metrics[protocol.REAL_EXAMPLES], protocol.REAL_EXAMPLES, 1, limits.max_site_examples)
    labelled = _integer(metrics[protocol.LABELLED_EXAMPLES], protocol.LABELLED_EXAMPLES, 0, real)
    steps = _integer(metrics[protocol.GENERATOR_STEPS], protocol.GENERATOR_STEPS, 0, limits.max_generator_steps)
    metrics.update({protocol.REAL_EXAMPLES: real, protocol.LABELLED_EXAMPLES: labelled, protocol.GENERATOR_STEPS: steps})


def max_history_entries(server_round: int) -> int:
    """The most accountant-history entries a train reply of ``server_round`` may carry: one count
    release and, per round so far, one training attempt plus one retried attempt (a round trained
    again after a resume), each with its own noise in the worst case."""
    return 1 + 2 * max(1, int(server_round))


def max_history_steps(server_round: int, local_steps: int) -> int:
    """The most steps this run's accountant history may hold by ``server_round``: the count release
    and ``local_steps`` DP steps per round, each round possibly trained twice (a resume)."""
    return 1 + 2 * max(1, int(server_round)) * int(local_steps)


def _dp_history(metrics: dict[str, Any], limits: ReplyLimits, server_round: int) -> None:
    """The accountant-history lists: only when the run trains with DP, of one length, bounded by the
    rounds run, and each entry a valid (noise multiplier, sampling rate, step count)."""
    present = sorted(k for k in LIST_METRICS if k in metrics)
    if not present:
        return
    if not limits.privacy_enabled:
        raise ReplyError(f"metric {present[0]!r}: an accountant history, but this run trains without DP")
    if len(present) != len(LIST_METRICS):
        raise ReplyError(f"accountant history incomplete: only {present}")
    lengths = {len(metrics[k]) for k in LIST_METRICS}
    if len(lengths) != 1:
        raise ReplyError(f"accountant history lists of different lengths {sorted(lengths)}")
    length, bound = lengths.pop(), max_history_entries(server_round)
    if length > bound:
        raise ReplyError(f"accountant history of {length} entries in round {server_round} (at most {bound})")
    most = max_history_steps(server_round, limits.max_generator_steps)
    total = 0
    for noise, rate, steps in zip(metrics[protocol.DP_HISTORY_NOISE], metrics[protocol.DP_HISTORY_RATE],
                                  metrics[protocol.DP_HISTORY_STEPS]):
        if not (noise > 0 and 0 < rate <= 1):
            raise ReplyError(f"accountant history entry (noise {noise!r}, rate {rate!r}) is not a valid mechanism")
        total += _integer(steps, protocol.DP_HISTORY_STEPS, 0, most)
    if total > most:
        raise ReplyError(f"accountant history of {total} steps in round {server_round} (at most {most}: "
                         f"train.local_steps per round, each round possibly trained twice, and the count release)")


def train_metrics(msg: Message, limits: ReplyLimits, server_round: int = 1) -> dict[str, Any]:
    """A train reply's metrics: the generic schema, list metrics only where known (the accountant
    history, only with DP on and bounded by the round), valid weights."""
    metrics = _metrics(msg)
    lists = sorted(k for k, v in metrics.items() if isinstance(v, list) and k not in LIST_METRICS)
    if lists:
        raise ReplyError(f"metric {lists[0]!r} is a list; expected a number")
    _dp_history(metrics, limits, server_round)
    _weights(metrics, limits)
    return metrics


def checked_payload(array: Array, wire: np.dtype, shape: tuple[int, ...], key: str) -> np.ndarray:
    """One array's payload: its size, declared and decoded dtype and shape, element count. Returns it
    as a read-only view (no copy)."""
    count = int(np.prod(shape, dtype=np.int64))
    expected = count * wire.itemsize
    data = array.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ReplyError(f"{key}: payload is a {type(data).__name__}")
    if not expected <= len(data) <= expected + NPY_HEADER_MAX:
        raise ReplyError(f"{key}: payload of {len(data)} bytes; {shape} {wire} takes {expected} "
                         f"(+ at most {NPY_HEADER_MAX} of header)")
    if array.stype != "numpy.ndarray":
        raise ReplyError(f"{key}: serialisation {str(array.stype)[:40]!r}, expected 'numpy.ndarray'")
    if str(array.dtype) != wire.name:
        raise ReplyError(f"{key}: declared dtype {str(array.dtype)[:20]}, expected {wire.name}")
    if tuple(array.shape) != shape:
        raise ReplyError(f"{key}: declared shape {tuple(array.shape)[:8]}, expected {shape}")
    payload = wire_array(array, (wire, shape))
    if payload.dtype != wire:
        raise ReplyError(f"{key}: decoded dtype {payload.dtype}, expected {wire.name}")
    if payload.shape != shape or payload.size != count:
        raise ReplyError(f"{key}: decoded shape {payload.shape[:8]} ({payload.size} elements), "
                         f"expected {shape} ({count})")
    return payload


def checked_value(payload: np.ndarray, like: torch.Tensor, transport: str, key: str,
                  max_abs_value: float | None = None) -> np.ndarray:
    """One tensor's wire values (``payload``, shaped like ``like``): they decode to ``like``'s dtype
    and shape and, for a floating tensor, are all finite and, with ``max_abs_value``, no larger in
    magnitude (finite values of 1e38 pass a finiteness check and overflow the next forward pass).
    Returns ``payload``."""
    value = decoded(payload, like, transport)
    if value.shape != tuple(like.shape) or value.dtype != _numpy_dtype(like):
        raise ReplyError(f"{key}: decodes to {value.dtype} {value.shape}")
    if like.is_floating_point():
        if not all_finite(value):
            raise ReplyError(f"{key}: non-finite values")
        if max_abs_value is not None and not within_magnitude(value, max_abs_value):
            raise ReplyError(f"{key}: values beyond federation.max_abs_value={max_abs_value:g} in magnitude")
    return payload


def unpack_checked(record: ArrayRecord, state: Mapping[str, torch.Tensor], transport: str, group: str,
                   max_abs_value: float | None = None) -> dict[str, np.ndarray]:
    """A reply's packed group, checked: exactly the expected packed arrays, each payload checked, then
    every tensor's values (errors name the tensor's key). Returns read-only views, one per key."""
    layout = packed_layout(state, transport)
    try:
        check_packed_keys(record, layout, f"group {group!r}")
    except ValueError as error:
        raise ReplyError(str(error)) from None
    views: dict[str, np.ndarray] = {}
    for name, slots in layout.items():
        wire = np.dtype(name.removeprefix(PACKED_PREFIX))
        flat = checked_payload(record[name], wire, (packed_size(slots),), f"{group} {name}")
        for key, view in slot_views(flat, slots).items():
            views[key] = checked_value(view, state[key], transport, key, max_abs_value)
    return {key: views[key] for key in state}


def class_counts(msg: Message, site: str, limits: ReplyLimits) -> dict[str, Any] | None:
    """The partition-report row a hospital sent: ``{"site", "train": {class: n}, "test": {class: n}}``
    (and ``"val"`` when the hospital carves a validation split).

    The row is filed under the reply's (bound) site name; the ``site`` entry inside is ignored.
    """
    raw = _site_record(msg).get(protocol.CLASS_COUNTS_JSON)
    if raw is None:
        return None
    text = _text(raw, "class counts", MAX_CLASS_COUNTS_JSON)
    try:
        counts = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ReplyError(f"class counts are not readable JSON: {type(error).__name__}") from None
    if not isinstance(counts, dict) or not set(counts) <= {"site", *COUNT_SPLITS}:
        raise ReplyError("class counts: expected an object with 'site' and per-split counts ('train', 'val', 'test')")
    if not isinstance(counts.get("site", ""), str):
        raise ReplyError("class counts: 'site' is not a string")
    known = {*limits.class_names, UNLABELLED}
    clean: dict[str, Any] = {"site": site}
    for split in COUNT_SPLITS:
        if split == "val" and split not in counts:
            continue
        per_class = counts.get(split, {})
        if not isinstance(per_class, dict):
            raise ReplyError(f"class counts [{split}]: expected an object of class -> count")
        unknown = sorted(str(k)[:40] for k in per_class if k not in known)
        if unknown:
            raise ReplyError(f"class counts [{split}]: unknown classes {unknown[:3]}")
        clean[split] = {name: _integer(n, f"class counts [{split}][{name}]", 0, limits.max_site_examples)
                        for name, n in per_class.items()}
    return clean


def check_train_reply(
    msg: Message,
    reference: Mapping[str, Mapping[str, torch.Tensor]],
    transport: str,
    limits: ReplyLimits,
    site: str | None = None,
    server_round: int = 1,
) -> SiteReply:
    """Validate a train reply of ``server_round`` against the global groups in ``reference`` (group -> state)."""
    check_status(msg)
    _expect_records(msg, list(reference))
    name = site or site_name(msg)
    metrics = train_metrics(msg, limits, server_round)
    groups: dict[str, Mapping[str, np.ndarray]] = {}
    received = 0
    for group, state in reference.items():
        groups[group] = DecodedGroup(unpack_checked(msg.content.array_records[group], state, transport, group,
                                                    limits.max_abs_value), state, transport)
        received += sum(int(like.numel()) * expected_wire_dtype(like, transport).itemsize for like in state.values())
    return SiteReply(int(msg.metadata.src_node_id), name, metrics, groups, received, class_counts(msg, name, limits))


def check_secure_train_reply(
    msg: Message,
    shapes: Sequence[tuple[int, ...]],
    modulus: int,
    limits: ReplyLimits,
    site: str | None = None,
    server_round: int = 1,
) -> tuple[SiteReply, list[np.ndarray]]:
    """Validate a train reply of a SecAgg+ round: status, metrics, class counts and the masked vector
    (one integer array of each of ``shapes``, every entry in ``[0, modulus)``). No group may travel
    in the clear. Returns the checked reply and the vector as int64 arrays."""
    check_status(msg)
    content = msg.content
    extra = sorted(set(content.config_records.keys()) - {protocol.SITE, RECORD_KEY_CONFIGS})
    extra += sorted(set(content.metric_records.keys()) - {protocol.METRICS})
    extra += sorted(k for k, record in content.array_records.items() if len(record))
    if extra:
        raise ReplyError(f"unexpected records {extra[:5]} in a secure-aggregation reply")
    record = content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None or set(record.keys()) != {Key.MASKED_PARAMETERS}:
        raise ReplyError("no masked vector (secure aggregation)")
    masked = record[Key.MASKED_PARAMETERS]
    if not isinstance(masked, list) or len(masked) != len(shapes):
        raise ReplyError(f"masked vector of {len(masked) if isinstance(masked, list) else 'no'} arrays, "
                         f"expected {len(shapes)}")
    vector: list[np.ndarray] = []
    for index, (blob, shape) in enumerate(zip(masked, shapes)):
        if not isinstance(blob, bytes) or len(blob) > 8 * int(np.prod(shape, dtype=np.int64)) + 1024:
            raise ReplyError(f"masked array {index}: not an array of at most {int(np.prod(shape))} integers")
        try:
            array = bytes_to_ndarray(blob)
        except Exception as error:
            raise ReplyError(f"masked array {index}: unreadable ({type(error).__name__})") from error
        if tuple(array.shape) != tuple(shape) or not np.issubdtype(array.dtype, np.integer):
            raise ReplyError(f"masked array {index}: {array.dtype} {array.shape}, expected integers {tuple(shape)}")
        if array.size and (int(array.min()) < 0 or int(array.max()) >= modulus):
            raise ReplyError(f"masked array {index}: entries outside [0, {modulus})")
        vector.append(array.astype(np.int64))
    name = site or site_name(msg)
    metrics = train_metrics(msg, limits, server_round)
    received = sum(len(blob) for blob in masked)
    return SiteReply(int(msg.metadata.src_node_id), name, metrics, {}, received, class_counts(msg, name, limits)), vector


def _count_list(metrics: Mapping[str, Any], key: str, shape: tuple[int, int], limits: ReplyLimits) -> np.ndarray:
    if key not in metrics:
        raise ReplyError(f"metric {key!r} missing")
    values = metrics[key]
    size = shape[0] * shape[1]
    if not isinstance(values, list) or len(values) != size:
        raise ReplyError(f"metric {key!r}: expected a list of {size} counts ({shape[0]} x {shape[1]})")
    counts = np.asarray([_integer(v, key, 0, limits.max_site_examples) for v in values], dtype=np.int64)
    return counts.reshape(shape)


def check_evaluate_reply(msg: Message, limits: ReplyLimits, site: str | None = None) -> SiteReply:
    """Validate an evaluate reply: exactly the evaluation counts, consistent with each other."""
    check_status(msg)
    _expect_records(msg, [])
    name = site or site_name(msg)
    metrics = _metrics(msg)
    allowed = {protocol.REAL_EXAMPLES, protocol.EVAL_CONFUSION, protocol.EVAL_POSITIVE_SCORES,
               protocol.EVAL_NEGATIVE_SCORES}
    unknown = sorted(set(metrics) - allowed)
    if unknown:
        raise ReplyError(f"unknown evaluation metrics {unknown[:5]}")
    if protocol.REAL_EXAMPLES not in metrics:
        raise ReplyError(f"metric {protocol.REAL_EXAMPLES!r} missing")
    examples = _integer(metrics[protocol.REAL_EXAMPLES], protocol.REAL_EXAMPLES, 1, limits.max_site_examples)
    k, bins = limits.num_classes, limits.score_bins
    confusion = _count_list(metrics, protocol.EVAL_CONFUSION, (k, k), limits)
    positive = _count_list(metrics, protocol.EVAL_POSITIVE_SCORES, (k, bins), limits)
    negative = _count_list(metrics, protocol.EVAL_NEGATIVE_SCORES, (k, bins), limits)
    if int(confusion.sum()) != examples:
        raise ReplyError(f"confusion matrix counts {int(confusion.sum())} patches, the reply {examples}")
    actual = confusion.sum(axis=1)
    if not np.array_equal(positive.sum(axis=1), actual) or not np.array_equal(negative.sum(axis=1), examples - actual):
        raise ReplyError("score histograms do not add up to the confusion matrix's class totals")
    summary = EvaluationSummary(confusion, positive, negative)
    return SiteReply(int(msg.metadata.src_node_id), name, {protocol.REAL_EXAMPLES: examples}, evaluation=summary)


def budget_exhausted_metrics(msg: Message, site: str | None = None) -> dict[str, Any] | None:
    """A reply whose hospital stopped for its privacy budget: its name, message and DP metrics (else None)."""
    try:
        if msg.has_error():
            return None
        record = _site_record(msg)
        if record.get(protocol.STATUS) != protocol.STATUS_BUDGET_EXHAUSTED:
            return None
        message = one_line(_text(record.get(protocol.STATUS_MESSAGE, ""), "status message"))
    except Exception:
        return None
    try:
        metrics = _metrics(msg)
    except Exception:
        metrics = {}
    return {"site": site or site_name(msg), "message": message, **metrics}
