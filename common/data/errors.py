"""The one error type for unusable data: it names the file (and index or key) and what was expected."""

from __future__ import annotations


class DataError(Exception):
    """A data root, file, key, shape, dtype, label or image that cannot be used as configured.

    The message is one paragraph a hospital engineer can act on: what is wrong, where (file path,
    index or HDF5 key), and what was expected.
    """
