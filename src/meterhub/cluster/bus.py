"""The bus between meterhub nodes: publish, subscribe, request/reply with a timeout.

Two implementations behind one interface:

- :class:`LocalBus`, the embedded default: a cluster of one, in process. Messages go to this process's
  own subscribers (each in its own task, as a real bus would deliver them: never inside the caller).
- :class:`NatsBus`: NATS core subjects and request/reply (nats-py), for several nodes.

Payloads are bytes; subjects are dotted strings (``mh.events``, ``mh.node.<id>.command``). A handler
is ``async (data: bytes) -> bytes | None``; for a request, what it returns is the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from meterhub.logs import get_logger

log = get_logger(__name__)

Handler = Callable[[bytes], Awaitable[bytes | None]]


class BusError(Exception):
    """A request got no reply."""


class BusTimeout(BusError):
    """Nobody answered within the timeout."""


class NoResponders(BusError):
    """Nobody listens on the subject."""


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...


class Bus(Protocol):
    """What a node uses to reach the other nodes."""

    #: ``"local"`` or ``"nats"``: whether other nodes can exist at all.
    kind: str
    connected: bool

    async def publish(self, subject: str, data: bytes) -> None: ...

    async def subscribe(self, subject: str, handler: Handler, *, concurrent: bool = False) -> Subscription:
        """Call ``handler`` for every message on ``subject``. ``concurrent``: each message in its own
        task (for slow handlers such as commands); otherwise one at a time, in order."""
        ...

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        """Send and wait for the first reply; :class:`BusTimeout` or :class:`NoResponders`."""
        ...

    async def close(self) -> None: ...


# --- in process ------------------------------------------------------------------------------------


class _LocalSubscription:
    def __init__(self, bus: LocalBus, subject: str, handler: Handler) -> None:
        self.bus = bus
        self.subject = subject
        self.handler = handler

    async def unsubscribe(self) -> None:
        subs = self.bus.subs.get(self.subject)
        if subs and self in subs:
            subs.remove(self)


class LocalBus:
    """A bus with one node on it (the embedded default)."""

    kind = "local"
    connected = True  # in process: always

    def __init__(self) -> None:
        self.subs: dict[str, list[_LocalSubscription]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bus handler failed", error=repr(task.exception()))

    async def publish(self, subject: str, data: bytes) -> None:
        for sub in list(self.subs.get(subject, ())):
            self._spawn(sub.handler(data))

    async def subscribe(self, subject: str, handler: Handler, *, concurrent: bool = False) -> Subscription:
        sub = _LocalSubscription(self, subject, handler)
        self.subs.setdefault(subject, []).append(sub)
        return sub

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        subs = self.subs.get(subject)
        if not subs:
            raise NoResponders(subject)
        try:
            reply = await asyncio.wait_for(subs[0].handler(data), timeout)
        except TimeoutError:
            raise BusTimeout(subject) from None
        if reply is None:
            raise NoResponders(subject)
        return reply

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        self.subs.clear()


# --- NATS ------------------------------------------------------------------------------------------


class NatsBus:
    """NATS core (no JetStream): at-most-once subjects and request/reply between nodes."""

    kind = "nats"

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    async def connect(cls, url: str, name: str) -> NatsBus:
        import nats

        async def on_error(exc: Exception) -> None:
            log.warning("bus error", error=str(exc) or type(exc).__name__)

        async def on_disconnect() -> None:
            log.warning("bus disconnected, reconnecting")

        async def on_reconnect() -> None:
            log.info("bus reconnected")

        nc = await nats.connect(
            url,
            name=name,
            connect_timeout=5,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        return cls(nc)

    async def publish(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, data)

    async def subscribe(self, subject: str, handler: Handler, *, concurrent: bool = False) -> Subscription:
        async def run(msg: Any) -> None:
            try:
                reply = await handler(msg.data)
            except Exception:
                log.exception("bus handler failed", subject=subject)
                return
            if msg.reply and reply is not None:
                await msg.respond(reply)

        async def callback(msg: Any) -> None:
            if concurrent:
                task = asyncio.ensure_future(run(msg))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                await run(msg)

        return await self.nc.subscribe(subject, cb=callback)  # type: ignore[no-any-return]

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout

        try:
            msg = await self.nc.request(subject, data, timeout=timeout)
        except NoRespondersError:
            raise NoResponders(subject) from None
        except (NatsTimeout, TimeoutError):
            raise BusTimeout(subject) from None
        return msg.data  # type: ignore[no-any-return]

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up now (False while nats-py reconnects)."""
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.nc.drain()
        with contextlib.suppress(Exception):
            await self.nc.close()


async def connect_bus(url: str | None, name: str) -> Bus:
    """The bus for ``bus_url``: None (or ``local:``) is the in-process bus; ``nats://`` is NATS."""
    if not url or url.startswith("local:"):
        return LocalBus()
    if url.startswith(("nats://", "tls://")):
        return await NatsBus.connect(url, name)
    raise ValueError(f"bus_url must be nats://HOST:PORT (or empty for the in-process bus), not {url!r}")
