"""``devices/sync`` and operators' moves: a device's gateway, product, model, name and vendor."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from meterhub.core.devices import DeviceState, _may_take
from meterhub.logs import RateLimitedLog, get_logger
from meterhub.model.datapoint import ProductModel
from meterhub.protocol.errors import ErrorCode, ProtocolError
from meterhub.protocol.messages import (
    decode_sync,
)
from meterhub.protocol.topics import Kind
from meterhub.storage import registry

log = get_logger(__name__)
#: Per-message log lines (rejects, failed writes): one line per kind and interval, with a count.
_repeats = RateLimitedLog(log)
_REPORT = Kind.REPORT
_SYNC = Kind.SYNC
#: ``param.msg`` of the 400 answer to a sync of a device that belongs to another vendor.
VENDOR_REFUSED = "tedge error: device belongs to another vendor"


class SyncMixin:
    """Syncs and moves
    (methods of :class:`meterhub.core.service.ProtocolService`, which sets what they use)."""

    async def _on_sync(self, gw: str, payload: bytes, vendor_id: int | None = None) -> None:
        """``vendor_id``: the syncing gateway's vendor. A device belongs to its vendor: a gateway of
        another vendor is answered 400 (``VENDOR_REFUSED``) and the device is left as it is."""
        now = self.clock()
        try:
            req = decode_sync(payload, now)
        except ProtocolError as exc:
            self._reject(gw, _SYNC, exc)
            return
        key = (gw, req.request_id)
        previous = self._dedupe.get(key)
        if previous is not None:
            result = self._repeat(gw, _SYNC, req.request_id, req.cid, previous)
            if result is not None:
                await asyncio.shield(result)
            return
        model = await self._model_for(req.product_id)
        if model is None:
            self._answer_now(
                key,
                gw,
                _SYNC,
                req.cid,
                ErrorCode.PARAMS_RANGE_INVALID,
                f"unknown product {req.product_id!r} and no default model",
            )
            return
        dev = self.devices.get(req.cid)
        owner: tuple[str, int | None] | None = None
        if dev is None:  # not in memory is not new: the device may be stored (and owned) already
            # One batched query for the syncs of a burst; a stored device of a model this node does
            # not know comes back as its (gateway, vendor).
            found = await self.cache.fetch_or_owner(req.cid)
            if isinstance(found, tuple):
                owner = found
            else:
                dev = found
        if owner is not None and owner[0] != gw and not _may_take(owner[1], vendor_id):
            dev_gateway: str | None = owner[0]
        elif dev is not None and dev.gateway_id != gw and not _may_take(dev.vendor_id, vendor_id):
            dev_gateway = dev.gateway_id
        else:
            dev_gateway = None
        if dev_gateway is not None:
            # Not remembered for redeliveries: nothing was stored, and asking again changes nothing.
            self.stats["devices.vendor_refused"] += 1
            self.stats["rejected.sync"] += 1
            _repeats.warning(
                ("vendor_refused", gw),
                "sync refused: the device belongs to another vendor",
                gateway_id=gw,
                cid=req.cid,
                owner_gateway_id=dev_gateway,
            )
            self._reply(gw, _SYNC, req.request_id, req.cid, ErrorCode.UPLINK, VENDOR_REFUSED)
            return
        ops: list[tuple[str, Any]] = []
        row: dict[str, Any] = {
            "cid": req.cid,
            "gateway_id": gw,
            "product_id": req.product_id,
            "model": model.model,
            "synced_at": now,
            "last_seen": now,
            "first_seen": now,
            "online": False,
        }
        row.update(req.fields)
        if vendor_id is not None:
            row["vendor_id"] = vendor_id
        ops.append(("device", row))
        name_changed = False
        created = dev is None
        if dev is None:
            product = sys.intern(req.product_id)  # a few products, 100,000s of devices
            name = req.fields.get("device_name")
            dev = DeviceState(req.cid, gw, product, model, False, now, name, vendor_id)
            self._remember(dev)
            self.stats["devices.created"] += 1
        else:
            if vendor_id is not None:
                dev.vendor_id = vendor_id
            if dev.gateway_id != gw:
                rebind = {"cid": dev.cid, "old_gateway_id": dev.gateway_id, "new_gateway_id": gw, "at": now}
                ops.append(("rebind", {**rebind, "cause": "sync"}))
                _repeats.info(
                    "rebind", "device moved to another gateway", cid=dev.cid, old=dev.gateway_id, new=gw
                )
                self.cache.move(dev, gw)
                self.stats["devices.rebound"] += 1
            if dev.product_id != req.product_id:
                dev.product_id = sys.intern(req.product_id)  # a few products, 100,000s of devices
            dev.model = model
            if "device_name" in req.fields and req.fields["device_name"] != dev.name:
                name_changed = dev.name is not None or req.fields["device_name"] is not None
                dev.name = req.fields["device_name"]
        fut = self.writer.write(ops)
        self._dedupe_store(key, fut)
        try:
            await fut
        except Exception as exc:
            _repeats.error("sync_not_stored", "sync not stored", gateway_id=gw, cid=req.cid, error=str(exc))
            self._dedupe.pop(key, None)
            if created:
                self.cache.discard(dev.cid)
            self._reply(gw, _SYNC, req.request_id, req.cid, ErrorCode.SYSTEM)
            return
        self._dedupe[key] = ErrorCode.SUCCESS
        self._reply(gw, _SYNC, req.request_id, req.cid, ErrorCode.SUCCESS)
        self._emit(
            "sync",
            {
                "cid": dev.cid,
                "gateway_id": gw,
                "product_id": dev.product_id,
                "name": dev.name,
                "name_changed": name_changed,
            },
        )

    async def _model_for(self, product_id: str) -> ProductModel | None:
        name = self.products.get(product_id)
        if name is None:
            # An operator may have registered it from the CLI since we last looked.
            self.products = await asyncio.to_thread(registry.list_products, self.engine)
            name = self.products.get(product_id)
        if name is not None:
            model = self.models.get(name)
            if model is not None:
                return model
            _repeats.warning(
                "product_unknown_model",
                "product refers to an unknown model",
                product_id=product_id,
                model=name,
            )
        return self.models.for_product(product_id) or self.default_model

    async def move_device(self, cid: str, gateway_id: str) -> dict[str, Any]:
        """An operator moves a device to another gateway, of any vendor: the device then belongs to
        that gateway's vendor. Recorded in ``device_rebinds`` (cause ``operator``). From then on the
        old gateway's reports are answered 2003 (and its syncs 400 when it is of another vendor); the
        device is offline (cause ``moved``) until the new gateway reports it. Raises
        :class:`registry.UnknownDevice`, :class:`registry.UnknownGateway` or
        :class:`registry.RegistryError` (a gateway of no vendor)."""
        target = await asyncio.to_thread(registry.move_target, self.engine, cid, gateway_id)
        dev = await self.find_device(cid)  # cached, so other nodes are told (the sync event below)
        old = dev.gateway_id if dev is not None else target.old_gateway_id
        out = {"cid": cid, "old_gateway_id": old, "gateway_id": gateway_id, "vendor": target.vendor}
        if old == gateway_id and (dev is None or dev.vendor_id == target.vendor_id):
            return {**out, "moved": False}
        now = self.clock()
        ops: list[tuple[str, Any]] = [
            ("device_move", {"cid": cid, "gateway_id": gateway_id, "vendor_id": target.vendor_id}),
            (
                "rebind",
                {
                    "cid": cid,
                    "old_gateway_id": old,
                    "new_gateway_id": gateway_id,
                    "at": now,
                    "cause": "operator",
                },
            ),
        ]
        saved = None
        if dev is not None:  # the cache changes now, so no report of the old gateway slips in meanwhile
            saved = (dev.gateway_id, dev.vendor_id, dev.online)
            self.cache.move(dev, gateway_id)
            dev.vendor_id = target.vendor_id
            if dev.online:
                self._set_presence(dev, False, "moved", now, ops)
        elif target.online:
            ops.append(("presence", {"cid": cid, "online": False, "cause": "moved", "at": now}))
        try:
            await self.writer.write(ops)
        except Exception:
            if dev is not None and saved is not None and dev.gateway_id == gateway_id:
                self.cache.move(dev, saved[0])
                dev.vendor_id, dev.online = saved[1], saved[2]
            raise
        self.stats["devices.moved"] += 1
        log.info("device moved by an operator", cid=cid, old=old, new=gateway_id, vendor=target.vendor)
        if dev is not None:  # like a sync: other nodes of a cluster reload the device from the database
            self._emit(
                "sync",
                {
                    "cid": cid,
                    "gateway_id": gateway_id,
                    "product_id": dev.product_id,
                    "name": dev.name,
                    "name_changed": False,
                },
            )
        return {**out, "moved": True}
