"""A named registry: the one mechanism behind data sets, training methods, aggregation rules and
experiment procedures (each keeps its own entry type and registers its built-in entries itself)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry, in registration order; read like a mapping, written with :meth:`add`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what an entry is, for messages ("data set", "training method", ...)
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name registered twice is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"{self.kind} {name!r} is not one of {sorted(self._entries)}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
