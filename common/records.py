"""Model state <-> per-group Flower ArrayRecords, in a chosen transport dtype.

A group travels as one ArrayRecord whose keys are the model's state-dict keys (prefixed by the
group). Floating-point tensors are cast to the transport dtype (float32, float16 or bfloat16;
bfloat16 travels as its raw 16-bit pattern, since NumPy has no bfloat16); other tensors travel
unchanged. Local state (optimisers, loss weights, selection statistics) never goes through here.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping

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


def encode_tensor(tensor: torch.Tensor, transport: str) -> np.ndarray:
    """One tensor as the NumPy array that travels."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(check_transport_dtype(transport))
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().copy()
    return tensor.contiguous().numpy().copy()


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


def to_arrayrecord(state: Mapping[str, torch.Tensor], transport: str = "float32") -> ArrayRecord:
    """A state (sub-)dict as an ArrayRecord in the transport dtype."""
    return ArrayRecord({k: Array(encode_tensor(v, transport)) for k, v in state.items()})


def from_arrayrecord(
    record: ArrayRecord, reference: Mapping[str, torch.Tensor], transport: str = "float32"
) -> dict[str, torch.Tensor]:
    """Decode an ArrayRecord into tensors shaped and typed like ``reference`` (keys must match)."""
    missing = sorted(set(reference) - set(record.keys()))
    extra = sorted(set(record.keys()) - set(reference))
    if missing or extra:
        raise ValueError(f"array record keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    return {k: decode_array(wire_array(record[k]), reference[k], transport) for k in reference}


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
