"""Gateways' conformance records in the database, so the report card is the same on every node and
survives restarts and moves (docs/cluster.md, docs/decisions.md).

The hot path is unchanged: the protocol service's :class:`~meterhub.core.service.GatewayRecord` and
the MQTT server's :class:`~meterhub.mqtt.session.ClientRecord` count in memory, and note which
gateways changed (a set add). Every ``conformance_flush_interval`` this store takes what changed
since the last flush out of those records (resetting them: they hold a *delta*) and hands it to
the group-commit writer as one batch, which adds it to the stored record
(:func:`meterhub.storage.conformance_rows.apply_deltas`). Nothing is loaded when a gateway
connects: a card is built from the stored record after this node's own delta was flushed, so what
the previous node saw and what this one sees add up whichever wrote first.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.storage import conformance_rows

log = get_logger(__name__)
_repeats = RateLimitedLog(log)

#: Deltas whose write failed, kept for the next flush (gateways; the oldest go first beyond this).
RETRY_MAX = 100_000


def take_gateway(rec: Any) -> dict[str, Any] | None:
    """What a :class:`~meterhub.core.service.GatewayRecord` counted since the last take (None:
    nothing); the record starts again from zero."""
    codes = {kind: {str(c): n for c, n in counter.items() if n} for kind, counter in rec.codes.items()}
    if not (
        codes["sync"]
        or codes["report"]
        or rec.status_times
        or rec.commands
        or rec.command_latencies
        or rec.request_id_reused
        or rec.status_rejected
        or rec.unknown_topic
    ):
        return None
    delta = {
        "codes": codes,
        "request_id_reused": rec.request_id_reused,
        "status_rejected": rec.status_rejected,
        "unknown_topic": rec.unknown_topic,
        "status_times": list(rec.status_times),
        "commands": dict(rec.commands),
        "command_latencies": list(rec.command_latencies),
        "gateway_seen": True,
    }
    for counter in rec.codes.values():
        counter.clear()
    rec.status_times.clear()
    rec.commands.clear()
    rec.command_latencies.clear()
    rec.request_id_reused = rec.status_rejected = rec.unknown_topic = 0
    return delta


def take_client(rec: Any) -> dict[str, Any] | None:
    """What a :class:`~meterhub.mqtt.session.ClientRecord` counted since the last take (None:
    nothing); the counters start again from zero (keep-alive and clean session stay)."""
    if not (rec.connects or any(rec.qos) or rec.acl_rejected or rec.keepalive_expired):
        return None
    delta = {
        "connects": [list(c) for c in rec.connects],
        "qos": list(rec.qos),
        "acl_rejected": rec.acl_rejected,
        "keepalive_expired": rec.keepalive_expired,
        "keepalive": rec.keepalive,
        "clean_session": rec.clean_session,
        "client_seen": True,
    }
    rec.connects.clear()
    rec.qos[:] = [0, 0, 0]
    rec.acl_rejected = rec.keepalive_expired = 0
    return delta


class ConformanceStore:
    """Periodic, batched writes of conformance deltas; reads of the stored record."""

    def __init__(self, engine: Any, writer: Any, service: Any, mqtt: Any, interval: float) -> None:
        self.engine = engine
        self.writer = writer
        self.service = service  # None with the echo handler
        self.mqtt = mqtt
        self.interval = interval
        self.retry: dict[str, dict[str, Any]] = {}
        self.stats: Any = None  # the MQTT server's counter, set by the hub
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Future[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop the periodic flush and write what is left (after the MQTT server closed)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:
                _repeats.error("conformance_flush", "conformance records not stored", exc_info=True)

    def collect(self) -> dict[str, dict[str, Any]]:
        """Take every delta there is now: gateway id -> delta."""
        mqtt, service = self.mqtt, self.service
        candidates: set[str] = set(mqtt.connected)
        candidates |= mqtt.records_dirty
        mqtt.records_dirty = set()
        gateway_records: dict[str, Any] = {}
        if service is not None:
            candidates |= service.conformance_dirty
            service.conformance_dirty = set()
            gateway_records = service.gateway_records
        client_records = mqtt.client_records
        deltas, self.retry = self.retry, {}
        for gw in candidates:
            g = gateway_records.get(gw)
            c = client_records.get(gw)
            part_g = take_gateway(g) if g is not None else None
            part_c = take_client(c) if c is not None else None
            if part_g is None and part_c is None:
                continue
            delta = {**(part_g or {}), **(part_c or {})}
            session = mqtt.sessions.get(gw) if gw in mqtt.connected else None
            if session is not None:  # the filters now (the node holding the gateway knows them)
                delta["subscriptions"] = sorted(session.subscriptions)
            old = deltas.get(gw)
            deltas[gw] = conformance_rows.merge(old, delta) if old is not None else delta
        return deltas

    async def flush(self) -> None:
        """Write every delta there is now and wait for the commit."""
        deltas = self.collect()
        if not deltas:
            return
        ops = [("conformance", {"gateway_id": gw, "delta": d}) for gw, d in deltas.items()]
        fut = self.writer.write(ops)
        self._inflight.add(fut)
        try:
            await fut
        except Exception as exc:
            for gw, d in deltas.items():  # kept for the next flush (merged with what comes)
                old = self.retry.get(gw)
                self.retry[gw] = conformance_rows.merge(old, d) if old is not None else d
            while len(self.retry) > RETRY_MAX:
                del self.retry[next(iter(self.retry))]
            _repeats.warning(
                "conformance_write", "conformance records not stored, retrying", error=str(exc)[:200]
            )
            return
        finally:
            self._inflight.discard(fut)
        if self.stats is not None:
            self.stats["conformance.flushed"] += len(ops)

    async def read(self, gateway_id: str) -> tuple[dict[str, Any] | None, Any]:
        """The gateway's record (what every node stored, with this node's latest flushed first) and its
        gateways row: ``(record or None, row or None)``."""
        await self.flush()
        if self._inflight:  # a periodic flush under way may hold part of it
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

        def load() -> tuple[dict[str, Any] | None, Any]:
            with self.engine.connect() as conn:
                return conformance_rows.read(conn, gateway_id)

        record, row = await asyncio.to_thread(load)
        pending = self.retry.get(gateway_id)
        if pending is not None:
            record = conformance_rows.merge(record, pending)
        return record, row
