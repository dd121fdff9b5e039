"""The live stream behind ``GET /api/v1/stream``: protocol events fanned out to server-sent-event clients.

One :class:`StreamBroker` per app. It is a listener on ``ProtocolService.listeners`` while at least one
client is connected (installed with the first subscriber, removed with the last). The listener runs on
the report hot path, so it does a dict lookup and a ``put_nowait`` per interested subscriber and
nothing else: events are turned into JSON later, in each client's own response task.

Each subscriber has a bounded :class:`asyncio.Queue`. When a slow client's queue is full the oldest
event is dropped (never the listener blocked) and counted; the client is told (``overflow`` event) so
it can reload what it shows from the REST API.

Who gets what:

- a device subscriber (``?cid=``): that device's ``report``, ``presence`` and ``sync`` events;
- a fleet subscriber (no ``cid``): every device's ``presence`` and ``sync`` events, the ``gateway``
  (dis)connections, and ``report`` events of the data points it asked for (``?dp=3&dp=19``; none
  given: every report).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Iterable
from typing import Any

#: Events a client may have waiting; past that the oldest is dropped.
QUEUE_SIZE = 512
#: Clients connected at once (each holds an HTTP connection and a queue).
MAX_SUBSCRIBERS = 500


class Subscriber:
    """One connected client: what it wants and its queue of ``(kind, event)`` tuples."""

    __slots__ = ("cid", "dps", "dropped", "queue")

    def __init__(self, cid: str | None, dps: frozenset[int] | None, size: int = QUEUE_SIZE) -> None:
        self.cid = cid
        self.dps = dps
        self.dropped = 0
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=size)

    def offer(self, item: tuple[str, dict[str, Any]]) -> None:
        """Queue an event without ever blocking: a full queue loses its oldest event."""
        queue = self.queue
        if queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            self.dropped += 1
        queue.put_nowait(item)


class StreamBroker:
    """Routes protocol events to subscribers. Use from the event loop thread only."""

    def __init__(self, handler: Any, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self.handler = handler
        self.max_subscribers = max_subscribers
        self.by_cid: dict[str, list[Subscriber]] = {}
        self.fleet: list[Subscriber] = []
        self.count = 0

    # --- the listener (hot path) ----------------------------------------------------------------

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "report":
            subs = self.by_cid.get(event["cid"])
            if subs:
                item = (kind, event)
                for sub in subs:
                    sub.offer(item)
            if self.fleet:
                dp_id = event["dp"].id
                for sub in self.fleet:
                    if sub.dps is None or dp_id in sub.dps:
                        sub.offer((kind, event))
        elif kind in ("presence", "sync"):
            item = (kind, event)
            subs = self.by_cid.get(event["cid"])
            if subs:
                for sub in subs:
                    sub.offer(item)
            for sub in self.fleet:
                sub.offer(item)
        elif kind == "gateway":
            item = (kind, event)
            for sub in self.fleet:
                sub.offer(item)

    # --- subscribers ----------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """``max_subscribers`` are connected: refuse new clients."""
        return self.count >= self.max_subscribers

    def subscribe(self, cid: str | None, dps: Iterable[int] | None = None) -> Subscriber:
        """A new subscriber (the caller checks :attr:`full` first)."""
        sub = Subscriber(cid, frozenset(dps) if dps is not None else None)
        if cid is None:
            self.fleet.append(sub)
        else:
            self.by_cid.setdefault(cid, []).append(sub)
        self.count += 1
        if self.count == 1:
            self._install()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub.cid is None:
            if sub in self.fleet:
                self.fleet.remove(sub)
            else:
                return
        else:
            subs = self.by_cid.get(sub.cid)
            if not subs or sub not in subs:
                return
            subs.remove(sub)
            if not subs:
                del self.by_cid[sub.cid]
        self.count -= 1
        if self.count == 0:
            self._uninstall()

    @property
    def installed(self) -> bool:
        listeners = getattr(self.handler, "listeners", None)
        return listeners is not None and any(fn is self for fn in listeners)

    def _install(self) -> None:
        listeners = getattr(self.handler, "listeners", None)
        if listeners is not None and not self.installed:
            listeners.append(self)

    def _uninstall(self) -> None:
        listeners = getattr(self.handler, "listeners", None)
        if listeners is not None:
            listeners[:] = [fn for fn in listeners if fn is not self]


# --- events as JSON (in the client's task, not in the listener) ---------------------------------


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def event_data(kind: str, event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object sent to the browser for one protocol event."""
    if kind == "report":
        dp = event["dp"]
        value = event["value"]
        return {
            "cid": event["cid"],
            "dp": dp.id,
            "code": dp.code,
            "type": dp.type,
            "value": value,
            "scaled": _finite(event["num"]) if dp.type == "value" else None,
            "display_unit": dp.display_unit,
            "t": event["t"],
        }
    if kind == "presence":
        return {"cid": event["cid"], "online": event["online"], "cause": event["cause"], "at": event["at"]}
    if kind == "sync":
        return {
            "cid": event["cid"],
            "gateway_id": event["gateway_id"],
            "product_id": event["product_id"],
            "name": event["name"],
        }
    if kind == "gateway":
        return {
            "gateway_id": event["gateway_id"],
            "connected": event["connected"],
            "peer": event.get("peer"),
            "reason": event.get("reason"),
        }
    return {}


def sse(kind: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One server-sent event (``data`` is one line of JSON)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {text}\n\n"
