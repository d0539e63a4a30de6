"""Model state <-> per-group Flower ArrayRecords, in a chosen transport dtype.

A group travels as one ArrayRecord holding its tensors packed: the values of every tensor, in the
order of their sorted state-dict keys, concatenated into one flat array per wire dtype, under the
key ``packed:<wire dtype>`` (``packed:float32`` for a float32 transport). The receiver knows the
layout from its own model (keys, shapes, dtypes), so nothing else travels. Packing matters in a
deployment: Flower moves every array of a message as its own request (two objects per array, two
requests at a time), so a group of 45 tensors cost about 90 requests per hop, and on a hospital
network each costs a round trip. Floating-point tensors are cast to the transport dtype (float32,
float16 or bfloat16; bfloat16 travels as its raw 16-bit pattern, since NumPy has no bfloat16);
other tensors travel unchanged. Local state (optimisers, loss weights, selection statistics) never
goes through here.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

TRANSPORT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def check_transport_dtype(name: str) -> torch.dtype:
    if name not in TRANSPORT_DTYPES:
        raise ValueError(f"federation.transport_dtype must be one of {sorted(TRANSPORT_DTYPES)}, got {name!r}")
    return TRANSPORT_DTYPES[name]


def _wire_values(tensor: torch.Tensor, transport: str) -> np.ndarray:
    """A tensor's values as they travel (a view of ``tensor`` where no conversion is needed)."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(check_transport_dtype(transport))
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
    return tensor.contiguous().numpy()


def encode_tensor(tensor: torch.Tensor, transport: str) -> np.ndarray:
    """One tensor as the NumPy array that travels (a copy)."""
    return _wire_values(tensor, transport).copy()


def wire_array(array: Array, expected: tuple[np.dtype, tuple[int, ...]] | None = None) -> np.ndarray:
    """The NumPy array an ``Array`` carries, as a read-only view of its ``.npy`` payload: no copy.

    ``Array.numpy()`` (``np.load``) copies the payload; a server holding many replies only reads
    them, so it reads them in place. With ``expected`` (dtype, shape), a payload that starts with
    exactly the header ``np.save`` writes for them is read without parsing the header. Raises
    ``TypeError`` for another serialisation and ``ValueError`` for a payload that is not a ``.npy``
    file of a plain dtype, as ``np.load`` does.
    """
    if array.stype != "numpy.ndarray":
        raise TypeError(f"unsupported serialisation {str(array.stype)[:40]!r}, expected 'numpy.ndarray'")
    if expected is not None:
        header = npy_header(*expected)
        if array.data[: len(header)] == header:
            count = int(np.prod(expected[1], dtype=np.int64))
            return np.frombuffer(array.data, dtype=expected[0], count=count, offset=len(header)).reshape(expected[1])
    stream = io.BytesIO(array.data)  # shares the bytes until written to
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:  # a format this reader does not parse: let NumPy read (and copy) it
        return array.numpy()
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    flat = np.frombuffer(array.data, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=stream.tell())
    return flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)


def decode_array(array: np.ndarray, like: torch.Tensor, transport: str) -> torch.Tensor:
    """Back to a tensor of ``like``'s dtype (the receiver's own model defines the dtype)."""
    if like.is_floating_point() and check_transport_dtype(transport) == torch.bfloat16:
        return torch.from_numpy(array.copy()).view(torch.bfloat16).to(like.dtype)
    return torch.from_numpy(array.copy()).to(like.dtype)


def expected_wire_dtype(like: torch.Tensor, transport: str) -> np.dtype:
    """The NumPy dtype a tensor like ``like`` has on the wire."""
    return _wire_dtype(like.dtype, transport)


@functools.lru_cache(maxsize=64)
def _wire_dtype(dtype: torch.dtype, transport: str) -> np.dtype:
    return encode_tensor(torch.zeros(1, dtype=dtype), transport).dtype


@functools.lru_cache(maxsize=4096)
def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape`` (format 1.0)."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return stream.getvalue()


#: Key prefix of a packed group's arrays: ``packed:<wire dtype>``.
PACKED_PREFIX = "packed:"


@dataclass(frozen=True)
class PackedSlot:
    """Where one tensor sits in its group's packed array."""

    key: str
    shape: tuple[int, ...]
    offset: int
    count: int


def packed_layout(reference: Mapping[str, torch.Tensor], transport: str) -> dict[str, list[PackedSlot]]:
    """The packed arrays of a group like ``reference``: record key -> its tensors' slots, in sorted key order."""
    layout: dict[str, list[PackedSlot]] = {}
    ends: dict[str, int] = {}
    for key in sorted(reference):
        like = reference[key]
        name = PACKED_PREFIX + expected_wire_dtype(like, transport).name
        start = ends.get(name, 0)
        layout.setdefault(name, []).append(PackedSlot(key, tuple(like.shape), start, int(like.numel())))
        ends[name] = start + int(like.numel())
    return layout


def packed_size(slots: list[PackedSlot]) -> int:
    """Elements of one packed array."""
    return slots[-1].offset + slots[-1].count if slots else 0


def slot_views(flat: np.ndarray, slots: list[PackedSlot]) -> dict[str, np.ndarray]:
    """Each slot's tensor as a view of the packed array ``flat`` (no copy), by key."""
    return {s.key: flat[s.offset: s.offset + s.count].reshape(s.shape) for s in slots}


def to_arrayrecord(state: Mapping[str, torch.Tensor], transport: str = "float32") -> ArrayRecord:
    """A state (sub-)dict as a packed ArrayRecord in the transport dtype (one array per wire dtype),
    each filled in place: no copy of a tensor beyond the packed array and its payload."""
    layout = packed_layout(state, transport)
    record = {}
    for name, slots in layout.items():
        flat = np.empty(packed_size(slots), dtype=np.dtype(name.removeprefix(PACKED_PREFIX)))
        for slot in slots:
            flat[slot.offset: slot.offset + slot.count] = _wire_values(state[slot.key], transport).reshape(-1)
        record[name] = Array(flat)
    return ArrayRecord(record)


def check_packed_keys(record: ArrayRecord, layout: Mapping[str, list[PackedSlot]], what: str) -> None:
    """Raise ``ValueError`` unless ``record`` holds exactly the packed arrays of ``layout``."""
    keys = {str(k) for k in record.keys()}
    missing, extra = sorted(set(layout) - keys), sorted(k[:60] for k in keys - set(layout))
    if missing or extra:
        raise ValueError(f"{what}: packed arrays differ: missing {missing[:3]}, unexpected {extra[:3]} "
                         "(a sender with another model or an older fedvitgan?)")


def unpack(record: ArrayRecord, reference: Mapping[str, torch.Tensor], transport: str,
           what: str = "array record") -> dict[str, np.ndarray]:
    """The wire arrays of a packed record, one read-only view per key of ``reference`` (no copy);
    ``ValueError`` naming ``what`` for another set of arrays or a size, dtype or shape that differs."""
    layout = packed_layout(reference, transport)
    check_packed_keys(record, layout, what)
    views: dict[str, np.ndarray] = {}
    for name, slots in layout.items():
        wire, size = np.dtype(name.removeprefix(PACKED_PREFIX)), packed_size(slots)
        flat = wire_array(record[name], (wire, (size,)))
        if flat.dtype != wire or flat.shape != (size,):
            raise ValueError(f"{what}: {name} holds {flat.dtype} {flat.shape}, expected {wire.name} ({size},)")
        views.update(slot_views(flat, slots))
    return {key: views[key] for key in reference}


def from_arrayrecord(
    record: ArrayRecord, reference: Mapping[str, torch.Tensor], transport: str = "float32"
) -> dict[str, torch.Tensor]:
    """Decode a packed ArrayRecord into tensors shaped and typed like ``reference``."""
    return {k: decode_array(v, reference[k], transport) for k, v in unpack(record, reference, transport).items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record (what the groups' sizes add up to; no framing)."""
    return int(sum(int(np.prod(record[k].shape, dtype=np.int64)) * np.dtype(record[k].dtype).itemsize
                   for k in record.keys()))


def state_nbytes(state: Mapping[str, torch.Tensor], transport: str = "float32") -> int:
    """Bytes a state dict occupies on the wire in ``transport`` dtype."""
    total = 0
    for tensor in state.values():
        size = check_transport_dtype(transport).itemsize if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def tensors_to_arrayrecord(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Local state kept by a hospital (exact dtypes; never sent)."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy().copy()) for k, v in state.items()})


def arrayrecord_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(record[k].numpy().copy()) for k in record.keys()}
