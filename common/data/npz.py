"""Arrays of an ``.npz`` file without loading them whole.

A member stored uncompressed (``np.savez``) is memory-mapped in place. A compressed member
(``np.savez_compressed``) is inflated in chunks into an unlinked temporary file, which is then
memory-mapped: either way only the pages in use occupy memory, whatever the array's size.
"""

from __future__ import annotations

import struct
import tempfile
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from common.data.errors import DataError

CHUNK_BYTES = 1 << 24


def npz_keys(path: Path) -> list[str]:
    """Array names in the ``.npz`` file."""
    with _zip(path) as archive:
        return sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))


def _zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise DataError(f"file {path} does not exist; expected a NumPy .npz archive there")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"file {path} is not a readable .npz archive ({error}); expected the complete "
                        f"file as downloaded (truncated copy?)") from error


def _read_header(handle: IO[bytes], path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(handle)
        return np.lib.format._read_array_header(handle, version)  # type: ignore[attr-defined]
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise DataError(f"file {path} key {key!r} is not a valid .npy array ({error})") from error


def npz_array(path: Path, key: str, cache_dir: str | None = None) -> np.ndarray:
    """Array ``key`` of the ``.npz`` at ``path`` as a read-only memory map.

    ``DataError`` names the file and key when the key is missing or the member is unreadable.
    ``cache_dir`` is where a compressed member is inflated (default: the system temp folder).
    """
    with _zip(path) as archive:
        try:
            info = archive.getinfo(key + ".npy")
        except KeyError as error:
            raise DataError(f"file {path} has no array {key!r} (arrays found: "
                            f"{sorted(n[:-4] for n in archive.namelist())}); expected key {key!r}") from error
        try:
            with archive.open(info) as member:
                shape, fortran, dtype = _read_header(member, path, key)
                if dtype.hasobject:
                    raise DataError(f"file {path} key {key!r} holds Python objects; expected a numeric array")
                header_len = member.tell()
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if info.file_size - header_len < nbytes:
                    raise DataError(f"file {path} key {key!r} holds {info.file_size - header_len} bytes of "
                                    f"data; expected {nbytes} for shape {shape} {dtype} (truncated?)")
                order = "F" if fortran else "C"
                if nbytes == 0:
                    return np.empty(shape, dtype, order=order)
                if info.compress_type == zipfile.ZIP_STORED:
                    return np.memmap(path, dtype, "r", _data_offset(path, info) + header_len, shape, order)
                spool = tempfile.TemporaryFile(dir=cache_dir)  # noqa: SIM115 (the map keeps it alive)
                while chunk := member.read(CHUNK_BYTES):
                    spool.write(chunk)
                spool.flush()
                return np.memmap(spool, dtype, "r", 0, shape, order)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise DataError(f"file {path} key {key!r} cannot be read ({error}); expected the complete "
                            f"archive as downloaded (truncated or damaged copy?)") from error


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header, name and extra field."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise DataError(f"file {path} has a damaged zip entry for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len
