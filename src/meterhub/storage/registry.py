"""Vendors, gateways and products: the small, rarely written tables operators manage.

Plain synchronous functions on an :class:`~sqlalchemy.Engine`; the CLI calls them directly and the
server calls them from a worker thread.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Select, func, select, update
from sqlalchemy.exc import IntegrityError

from meterhub.storage import schema


class RegistryError(Exception):
    """An operator request that cannot be done (unknown name, duplicate)."""


class UnknownDevice(RegistryError):
    """No device with this cid."""


class UnknownGateway(RegistryError):
    """No gateway with this id (it never connected and no operator registered it)."""


@dataclass(slots=True, frozen=True)
class Vendor:
    id: int
    name: str
    username: str
    enabled: bool
    allowlist_enabled: bool
    created_at: float


@dataclass(slots=True, frozen=True)
class GatewayRecord:
    gateway_id: str
    vendor_id: int | None
    enabled: bool
    allowed: bool


def _vendor(row: Any) -> Vendor:
    return Vendor(row.id, row.name, row.username, row.enabled, row.allowlist_enabled, row.created_at)


def new_username() -> str:
    """A vendor username: it is the shared secret of the md5 password rule, so make it unguessable."""
    return "mh_" + secrets.token_urlsafe(18)


def add_vendor(engine: Engine, name: str, *, allowlist: bool = False) -> Vendor:
    now = time.time()
    username = new_username()
    try:
        with engine.begin() as conn:
            conn.execute(
                schema.vendors.insert().values(
                    name=name, username=username, enabled=True, allowlist_enabled=allowlist, created_at=now
                )
            )
    except IntegrityError:
        raise RegistryError(f"a vendor named {name!r} already exists") from None
    vendor = get_vendor(engine, name)
    assert vendor is not None
    return vendor


def get_vendor(engine: Engine, name: str) -> Vendor | None:
    with engine.connect() as conn:
        row = conn.execute(select(schema.vendors).where(schema.vendors.c.name == name)).first()
    return _vendor(row) if row else None


#: Most values in one ``IN (...)`` (SQLite's default limit on bound parameters is 32,766).
_IN_CHUNK = 900


def _rows_where_in(
    conn: Connection, query: Select[Any], column: Any, values: Collection[Any]
) -> Iterator[Any]:
    """Rows of ``query`` whose ``column`` is one of ``values``, one ``IN (...)`` per ``_IN_CHUNK``."""
    values = list(values)
    for start in range(0, len(values), _IN_CHUNK):
        yield from conn.execute(query.where(column.in_(values[start : start + _IN_CHUNK])))


def vendors_by_usernames(conn: Connection, usernames: Collection[str]) -> dict[str, Vendor]:
    """The vendors with these usernames."""
    v = schema.vendors
    return {row.username: _vendor(row) for row in _rows_where_in(conn, select(v), v.c.username, usernames)}


def gateways_by_ids(conn: Connection, gateway_ids: Collection[str]) -> dict[str, GatewayRecord]:
    """The operator flags of these gateways (those that have a row)."""
    g = schema.gateways
    query = select(g.c.gateway_id, g.c.vendor_id, g.c.enabled, g.c.allowed)
    return {
        row.gateway_id: GatewayRecord(row.gateway_id, row.vendor_id, row.enabled, row.allowed)
        for row in _rows_where_in(conn, query, g.c.gateway_id, gateway_ids)
    }


def list_vendors(engine: Engine) -> list[Vendor]:
    with engine.connect() as conn:
        rows = conn.execute(select(schema.vendors).order_by(schema.vendors.c.name)).all()
    return [_vendor(r) for r in rows]


def set_vendor(engine: Engine, name: str, **values: Any) -> Vendor:
    with engine.begin() as conn:
        res = conn.execute(update(schema.vendors).where(schema.vendors.c.name == name).values(**values))
    if res.rowcount == 0:
        raise RegistryError(f"no vendor named {name!r}")
    vendor = get_vendor(engine, name)
    assert vendor is not None
    return vendor


def set_gateway(engine: Engine, gateway_id: str, *, vendor: str | None = None, **values: Any) -> None:
    """Create or change a gateway's operator flags (``enabled``, ``allowed``)."""
    vendor_id = None
    if vendor is not None:
        v = get_vendor(engine, vendor)
        if v is None:
            raise RegistryError(f"no vendor named {vendor!r}")
        vendor_id = v.id
    with engine.begin() as conn:
        exists = conn.execute(
            select(func.count())
            .select_from(schema.gateways)
            .where(schema.gateways.c.gateway_id == gateway_id)
        ).scalar_one()
        if exists:
            if vendor_id is not None:
                values["vendor_id"] = vendor_id
            conn.execute(
                update(schema.gateways).where(schema.gateways.c.gateway_id == gateway_id).values(**values)
            )
        else:
            row = {"gateway_id": gateway_id, "vendor_id": vendor_id, "enabled": True, "allowed": False}
            row.update(values)
            conn.execute(schema.gateways.insert().values(**row))


def add_product(engine: Engine, product_id: str, model: str) -> None:
    now = time.time()
    with engine.begin() as conn:
        exists = conn.execute(
            select(schema.products.c.product_id).where(schema.products.c.product_id == product_id)
        ).first()
        if exists:
            conn.execute(
                update(schema.products).where(schema.products.c.product_id == product_id).values(model=model)
            )
        else:
            conn.execute(schema.products.insert().values(product_id=product_id, model=model, created_at=now))


def list_products(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(select(schema.products.c.product_id, schema.products.c.model)).all()
    return {r.product_id: r.model for r in rows}


@dataclass(slots=True, frozen=True)
class MoveTarget:
    """What moving a device to a gateway needs to know (see :func:`move_target`)."""

    cid: str
    old_gateway_id: str
    online: bool
    gateway_id: str
    vendor_id: int
    vendor: str


def move_target(engine: Engine, cid: str, gateway_id: str) -> MoveTarget:
    """The device and the gateway an operator wants to move it to. Raises :class:`UnknownDevice`,
    :class:`UnknownGateway`, or :class:`RegistryError` when the gateway belongs to no vendor (the
    device would then belong to nobody)."""
    d, g, v = schema.devices, schema.gateways, schema.vendors
    with engine.connect() as conn:
        dev = conn.execute(select(d.c.gateway_id, d.c.online).where(d.c.cid == cid)).first()
        gw = conn.execute(
            select(g.c.vendor_id, v.c.name)
            .select_from(g.outerjoin(v, v.c.id == g.c.vendor_id))
            .where(g.c.gateway_id == gateway_id)
        ).first()
    if dev is None:
        raise UnknownDevice(f"device {cid!r} does not exist")
    if gw is None:
        raise UnknownGateway(f"gateway {gateway_id!r} is not known")
    if gw.vendor_id is None or gw.name is None:
        raise RegistryError(
            f"gateway {gateway_id!r} belongs to no vendor yet (it never connected); "
            f"bind it first: meterhub gateway allow {gateway_id} --vendor NAME"
        )
    return MoveTarget(cid, dev.gateway_id, bool(dev.online), gateway_id, gw.vendor_id, gw.name)
