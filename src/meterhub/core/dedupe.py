"""Recent answers by ``(gateway, request_id)``, each with the digest of the content it answered.

A shortcut in front of the database, not the authority: the reports table's unique index on
``(gateway_id, request_id, digest)`` decides what is stored once (in every process of a cluster).
This cache answers a redelivery without validating or writing it again, tells a reused request_id
(same id, other content) from a redelivery, and is bounded both in entries and in age: an entry older
than ``max_age`` seconds is forgotten (a later redelivery is then recognised by the database).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["AnswerCache"]

Key = tuple[str, str]


class AnswerCache:
    """``key -> (digest, answer)``, oldest first; ``answer`` is a code or a future still running."""

    __slots__ = ("_clock", "_entries", "max_age", "max_entries")

    def __init__(self, max_entries: int, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self._clock = clock
        # key -> [digest, answer, stored_at]; insertion order is age order (put moves an entry last)
        self._entries: OrderedDict[Key, list[Any]] = OrderedDict()

    def get(self, key: Key) -> tuple[object, Any] | None:
        """``(digest, answer)`` for ``key``, or None (never seen, evicted, or older than ``max_age``)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry[2] > self.max_age:
            del self._entries[key]
            return None
        return entry[0], entry[1]

    def put(self, key: Key, digest: object, answer: Any) -> None:
        """Remember ``answer`` for ``key`` and ``digest`` (replacing what ``key`` had)."""
        entries = self._entries
        now = self._clock()
        entries.pop(key, None)
        entries[key] = [digest, answer, now]
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        limit = now - self.max_age
        while entries:
            oldest = next(iter(entries.values()))
            if oldest[2] >= limit:
                break
            entries.popitem(last=False)

    def settle(self, key: Key, digest: object, answer: Any) -> None:
        """Replace the answer of ``key`` if it still stands for ``digest`` (a future became a code)."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] == digest:
            entry[1] = answer

    def discard(self, key: Key, digest: object) -> None:
        """Forget ``key`` if it still stands for ``digest`` (so a redelivery is tried again)."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] == digest:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
