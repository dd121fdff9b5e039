"""Presence: ``devices/status``, online/offline transitions, silence sweeps, last-seen flushes."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from meterhub.core.devices import DeviceState
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.protocol.errors import ProtocolError
from meterhub.protocol.messages import (
    decode_status,
)
from meterhub.protocol.topics import Kind

log = get_logger(__name__)
#: Per-message log lines (rejects, failed writes): one line per kind and interval, with a count.
_repeats = RateLimitedLog(log)
_REPORT = Kind.REPORT
_SYNC = Kind.SYNC
#: Most devices whose last-seen time one periodic flush writes (see ProtocolService._flush_seen).
SEEN_FLUSH_MAX = 5_000


class PresenceMixin:
    """Presence
    (methods of :class:`meterhub.core.service.ProtocolService`, which sets what they use)."""

    def _on_status(self, gw: str, payload: bytes) -> Any:
        now = self.clock()
        try:
            req = decode_status(payload, now)
        except ProtocolError as exc:
            self.stats["rejected.status"] += 1
            self.record(gw).status_rejected += 1
            _repeats.info(
                ("status_rejected", int(exc.code)),
                "status message rejected",
                gateway_id=gw,
                code=int(exc.code),
                detail=exc.detail,
                request_id=exc.request_id,
            )
            return None
        for reason in req.rejected:
            self.stats["rejected.status_item"] += 1
            _repeats.info(
                "status_item_rejected",
                "status item rejected",
                gateway_id=gw,
                request_id=req.request_id,
                detail=reason,
            )
        devices = self.devices
        missing = [cid for cid, _ in req.items if cid not in devices]
        if missing:  # not in memory: ask the database first
            return asyncio.ensure_future(self._status_miss(gw, req, missing, now))
        return self._apply_status(gw, req, now)

    async def _status_miss(self, gw: str, req: Any, missing: list[str], now: float) -> None:
        try:
            await asyncio.gather(*(self.cache.fetch(cid) for cid in missing))
        except Exception:
            _repeats.error("status_lookup", "status not applied: device lookup failed", gateway_id=gw)
            return
        result = self._apply_status(gw, req, now)
        if result is not None:
            await result

    def _apply_status(self, gw: str, req: Any, now: float) -> Any:
        ops: list[tuple[str, Any]] = []
        for cid, online in req.items:
            dev = self.devices.get(cid)
            if dev is None or dev.gateway_id != gw:
                self.stats["rejected.status_item"] += 1
                _repeats.info(
                    "status_unknown_device",
                    "status for a device this gateway never synced",
                    gateway_id=gw,
                    cid=cid,
                )
                continue
            if online:
                dev.last_heard = now
                self._dirty_seen[cid] = now
            if dev.online != online:
                self._set_presence(dev, online, "status", now, ops)
        self.stats["status.accepted"] += 1
        self.record(gw).status_times.append(now)
        return self.writer.write(ops) if ops else None

    # --- presence --------------------------------------------------------------------------------

    def _set_presence(
        self, dev: DeviceState, online: bool, cause: str, now: float, ops: list[tuple[str, Any]]
    ) -> None:
        dev.online = online
        self.stats[f"presence.{'online' if online else 'offline'}.{cause}"] += 1
        ops.append(("presence", {"cid": dev.cid, "online": online, "cause": cause, "at": now}))
        self._emit(
            "presence",
            {"cid": dev.cid, "online": online, "cause": cause, "at": now, "product_id": dev.product_id},
        )

    async def _presence_loop(self) -> None:
        while True:
            await asyncio.sleep(self.presence_interval)
            try:
                self.check_presence()
                self._flush_seen()
            except Exception:
                _repeats.error("presence_check", "presence check failed", exc_info=True)

    def check_presence(self) -> int:
        """Set offline every online device silent for ``presence_timeout``; returns how many."""
        now = self.clock()
        limit = now - self.settings.presence_timeout
        ops: list[tuple[str, Any]] = []
        for dev in list(self.devices.values()):  # every online device is in memory
            if dev.online and dev.last_heard < limit:
                self._set_presence(dev, False, "silence", now, ops)
        if ops:
            self.writer.submit(ops)
        return len(ops)

    def _flush_seen(self, limit: int | None = SEEN_FLUSH_MAX) -> None:
        """Write devices' last-seen times in one batch (not on every report), at most ``limit`` of
        them per call, longest waiting first: with 190,000 meters heard every minute a single flush
        was a six-figure UPDATE that held the writer (and every report's answer) for seconds."""
        gateways, self._dirty_gw_seen = self._dirty_gw_seen, {}
        if gateways:  # one row per gateway: a few thousand at most, unlike the devices
            self.writer.submit(
                [("gateway", {"gateway_id": gw, "last_seen": t}) for gw, t in gateways.items()]
            )
        dirty = self._dirty_seen
        if not dirty:
            return
        if limit is None or len(dirty) <= limit:
            seen, self._dirty_seen = dirty, {}
            items = list(seen.items())
        else:  # dicts keep first-insertion order: the devices dirty for longest come first
            items = list(itertools.islice(dirty.items(), limit))
            for cid, _ in items:
                del dirty[cid]
        self.writer.submit([("seen", {"cid": cid, "last_seen": t}) for cid, t in items])
