"""A small bounded list: the recent-history fields of per-client records.

``collections.deque(maxlen=n)`` allocates a 64-slot block (~630 bytes) even when it holds one item;
with one record per connected gateway that was the largest part of an idle connection's memory.
``BoundedList`` is a list (56 bytes empty) that drops its oldest item past ``maxlen``.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class BoundedList(list[T]):
    """A list that keeps only the last ``maxlen`` items appended (oldest dropped first)."""

    __slots__ = ("maxlen",)

    def __init__(self, maxlen: int) -> None:
        super().__init__()
        self.maxlen = maxlen

    def append(self, item: T) -> None:
        super().append(item)
        if len(self) > self.maxlen:
            del self[0]
