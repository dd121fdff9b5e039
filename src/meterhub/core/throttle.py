"""Failed-login budgets with a short ban, in front of every MQTT authenticator (gateways, open hub).

Two budgets, each of failed CONNECTs (CONNACK 0x04: unknown username, wrong password) in a fixed
window of ``window`` seconds:

- per source address (the peer's IP, every client id together): ``source_budget`` failures, then
  every CONNECT from that address is refused for ``ban_seconds``;
- per client id (failures from every address together): ``client_budget`` failures, then that
  client id is refused for ``ban_seconds`` - but only from the addresses whose failures made up the
  budget. A correct login for the same client id from an address that did not fail is checked as
  usual: somebody guessing a gateway's password cannot lock the real gateway out.

A refused CONNECT is answered without looking at its password (no database lookup, no hash), so a
password-guessing flood costs a dictionary lookup per CONNECT once its budget is spent. Correct
logins from other addresses are never counted, slowed or refused.

The tables are bounded (``max_tracked`` addresses and as many client ids; the entry touched longest
ago is forgotten first), as is the set of failing addresses kept per client id.

Bans are per node (process memory): checking them needs no database round trip, so a flood of wrong
passwords does not turn into database writes, and a cluster of N nodes lets an attacker at most N
budgets per window (docs/decisions.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

#: Failing addresses remembered per client id (the oldest is forgotten first).
MAX_SOURCES_PER_CLIENT = 64


@dataclass(slots=True)
class _Budget:
    window_start: float
    failures: int = 0
    banned_until: float = 0.0
    sources: dict[str, None] = field(default_factory=dict)  # client ids only: addresses that failed


def source_of(peer: str) -> str:
    """The address part of ``host:port`` (IPv4 or IPv6); the whole string if there is no port."""
    host, sep, port = peer.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else peer


class LoginThrottle:
    def __init__(
        self,
        *,
        window: float = 60.0,
        client_budget: int = 20,
        source_budget: int = 200,
        ban_seconds: float = 60.0,
        max_tracked: int = 100_000,
        stats: MutableMapping[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.client_budget = client_budget
        self.source_budget = source_budget
        self.ban_seconds = ban_seconds
        self.max_tracked = max_tracked
        self.stats: MutableMapping[str, int] = stats if stats is not None else {}
        self._clock = clock
        self._sources: OrderedDict[str, _Budget] = OrderedDict()
        self._clients: OrderedDict[str, _Budget] = OrderedDict()

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _current(self, table: OrderedDict[str, _Budget], key: str, now: float) -> _Budget | None:
        """The entry, its window or ban renewed if over; None if not tracked."""
        entry = table.get(key)
        if entry is None:
            return None
        if entry.banned_until:
            if now < entry.banned_until:
                return entry
            entry.banned_until = 0.0  # the ban is over: a fresh budget
            entry.window_start, entry.failures = now, 0
            entry.sources.clear()
        elif now - entry.window_start >= self.window:
            entry.window_start, entry.failures = now, 0
            entry.sources.clear()
        return entry

    def refusal(self, client_id: str, peer: str) -> str | None:
        """Why this CONNECT is refused without checking it, or None to check it."""
        now = self._clock()
        source = source_of(peer)
        entry = self._current(self._sources, source, now)
        if entry is not None and entry.banned_until:
            self._count("auth.throttled.source")
            return "too many failed logins from this address"
        entry = self._current(self._clients, client_id, now)
        if entry is not None and entry.banned_until and source in entry.sources:
            self._count("auth.throttled.client")
            return "too many failed logins for this client id"
        return None

    def failed(self, client_id: str, peer: str) -> None:
        """Count one failed login (wrong username or password)."""
        now = self._clock()
        source = source_of(peer)
        self._count("auth.failed")
        entry = self._touch(self._sources, source, now)
        entry.failures += 1
        if not entry.banned_until and self.source_budget > 0 and entry.failures >= self.source_budget:
            entry.banned_until = now + self.ban_seconds
            self._count("auth.banned.source")
        entry = self._touch(self._clients, client_id, now)
        entry.failures += 1
        entry.sources.pop(source, None)
        entry.sources[source] = None
        if len(entry.sources) > MAX_SOURCES_PER_CLIENT:
            del entry.sources[next(iter(entry.sources))]
        if not entry.banned_until and self.client_budget > 0 and entry.failures >= self.client_budget:
            entry.banned_until = now + self.ban_seconds
            self._count("auth.banned.client")

    def _touch(self, table: OrderedDict[str, _Budget], key: str, now: float) -> _Budget:
        entry = self._current(table, key, now)
        if entry is None:
            entry = table[key] = _Budget(now)
            while len(table) > self.max_tracked:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return entry

    @property
    def tracked(self) -> tuple[int, int]:
        """(addresses, client ids) tracked now."""
        return len(self._sources), len(self._clients)
