"""The bounded device cache: what the report hot path looks up, loaded on demand.

A node does not hold every meter of the fleet in memory:

- a gateway's devices are loaded when it connects (one batched query per burst of CONNECTs: one
  worker-thread job at a time answers every gateway queued meanwhile, like :mod:`meterhub.core.auth`);
- a device not in memory (evicted, synced through another node, or never synced) is fetched from the
  database on its first message (again batched), so a miss costs one round trip, never a wrong answer;
- at most ``device_cache_max`` devices are kept. When full, the devices inserted longest ago are
  evicted first, except **online** ones: presence (silence sweeps, the gateway's disconnect) needs
  every online device of this node in memory, so an online device met at the front gets a second
  chance. Only when more than ``device_cache_max`` devices are online here does the cache exceed it.

The hot path stays a dict lookup: ``devices`` is the mapping itself (an ``OrderedDict``, not
reordered on reads), ``by_gateway`` the cached devices per gateway.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, select

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.storage import schema

log = get_logger(__name__)
_repeats = RateLimitedLog(log)

_CHUNK = 1000  # values per IN (...) list


def read_devices(engine: Engine, gateways: Sequence[str], cids: Sequence[str]) -> list[Any]:
    """Device rows of some gateways and with some cids (blocking; run it in a thread)."""
    d = schema.devices
    cols = (
        d.c.cid,
        d.c.gateway_id,
        d.c.product_id,
        d.c.model,
        d.c.online,
        d.c.last_seen,
        d.c.device_name,
        d.c.vendor_id,
    )
    rows: list[Any] = []
    with engine.connect() as conn:
        for i in range(0, len(gateways), _CHUNK):
            rows += conn.execute(select(*cols).where(d.c.gateway_id.in_(gateways[i : i + _CHUNK]))).all()
        for i in range(0, len(cids), _CHUNK):
            rows += conn.execute(select(*cols).where(d.c.cid.in_(cids[i : i + _CHUNK]))).all()
    return rows


class DeviceCache:
    """Devices in memory, bounded, filled from the database on connect and on a miss."""

    #: Most gateways and cids one lookup job asks for.
    batch_max = 2000

    def __init__(self, engine: Engine, max_size: int, make: Callable[[Any], Any | None]) -> None:
        """``make`` turns a database row into a ``DeviceState`` (None: its model is unknown)."""
        self.engine = engine
        self.max_size = max(1, max_size)
        self._make = make
        self.devices: OrderedDict[str, Any] = OrderedDict()
        self.by_gateway: dict[str, set[str]] = {}
        self._gateways: list[str] = []  # gateways to load
        self._cids: dict[str, list[tuple[asyncio.Future[Any], bool]]] = {}  # to fetch; (waiter, owner?)
        self._drainer: asyncio.Task[None] | None = None
        self.lookups = 0  # lookup jobs run
        self.misses = 0  # cids fetched from the database
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.devices)

    # --- in memory -------------------------------------------------------------------------------

    def put(self, dev: Any) -> None:
        """Remember a device (replacing the cached one), evicting others if the cache is full."""
        old = self.devices.get(dev.cid)
        if old is not None and old.gateway_id != dev.gateway_id:
            self._unlink(old.cid, old.gateway_id)
        self.devices[dev.cid] = dev
        self.by_gateway.setdefault(dev.gateway_id, set()).add(dev.cid)
        if len(self.devices) > self.max_size:
            self._evict()

    def discard(self, cid: str) -> None:
        dev = self.devices.pop(cid, None)
        if dev is not None:
            self._unlink(cid, dev.gateway_id)

    def move(self, dev: Any, gateway_id: str) -> None:
        """Change a cached device's gateway."""
        self._unlink(dev.cid, dev.gateway_id)
        self.by_gateway.setdefault(gateway_id, set()).add(dev.cid)
        dev.gateway_id = gateway_id

    def of_gateway(self, gateway_id: str) -> Iterable[Any]:
        """The cached devices of a gateway (a copy: safe to change the cache meanwhile)."""
        devices = self.devices
        return [devices[c] for c in list(self.by_gateway.get(gateway_id, ())) if c in devices]

    def _unlink(self, cid: str, gateway_id: str) -> None:
        cids = self.by_gateway.get(gateway_id)
        if cids is not None:
            cids.discard(cid)
            if not cids:
                del self.by_gateway[gateway_id]

    def _evict(self) -> None:
        devices = self.devices
        budget = len(devices)  # each device is looked at once at most per eviction
        while len(devices) > self.max_size and budget > 0:
            budget -= 1
            cid, dev = devices.popitem(last=False)
            if dev.online:  # presence needs it: second chance
                devices[cid] = dev
                continue
            self._unlink(cid, dev.gateway_id)
            self.evicted += 1

    # --- from the database -----------------------------------------------------------------------

    def load_gateway(self, gateway_id: str) -> None:
        """Load a (just connected) gateway's devices soon, batched with other gateways."""
        self._gateways.append(gateway_id)
        self._wake()

    def fetch(self, cid: str) -> asyncio.Future[Any]:
        """The device (None: not in the database or of an unknown model), from memory or the database."""
        return self._lookup(cid, False)

    def fetch_or_owner(self, cid: str) -> asyncio.Future[Any]:
        """Like :meth:`fetch`, but a device stored with a model this node does not know gives its
        ``(gateway_id, vendor_id)`` instead of None (None: not stored). From the same batched query:
        a sync of a new device costs no lookup of its own."""
        return self._lookup(cid, True)

    def _lookup(self, cid: str, owner: bool) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        dev = self.devices.get(cid)
        if dev is not None:
            fut.set_result(dev)
            return fut
        self._cids.setdefault(cid, []).append((fut, owner))
        self._wake()
        return fut

    def _wake(self) -> None:
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._gateways or self._cids:
            gateways = list(dict.fromkeys(self._gateways[: self.batch_max]))
            del self._gateways[: self.batch_max]
            cids = list(itertools.islice(self._cids, self.batch_max))
            waiters = {c: self._cids.pop(c) for c in cids}
            try:
                rows = await asyncio.to_thread(read_devices, self.engine, gateways, cids)
            except Exception as exc:
                _repeats.error("device_lookup", "device lookup failed", error=str(exc)[:200])
                for futs in waiters.values():
                    for fut, _ in futs:
                        if not fut.done():
                            fut.set_exception(exc)
                continue
            self.lookups += 1
            self.misses += len(cids)
            found: dict[str, Any] = {}
            owners: dict[str, tuple[str, int | None]] = {}
            for row in rows:
                owners[row.cid] = (row.gateway_id, row.vendor_id)
                dev = self.devices.get(row.cid)
                # What is in memory is at least as new as the row, unless it is an offline device
                # left with another gateway (moved through another node meanwhile).
                if dev is None or (not dev.online and dev.gateway_id != row.gateway_id):
                    dev = self._make(row)
                    if dev is None:
                        continue
                    self.put(dev)
                found[row.cid] = dev
            for cid, futs in waiters.items():
                dev = self.devices.get(cid) or found.get(cid)
                for fut, owner in futs:
                    if not fut.done():
                        fut.set_result(dev if dev is not None or not owner else owners.get(cid))
