"""What the open hub's device API reads: the devices an application may see, their latest values, and
the places (homes, assets) they are grouped in.

Synchronous functions on an Engine (the HTTP layer runs them in a worker thread). Everything comes
from the database, so every node of a cluster answers the same.

Scope: a user token sees the devices bound to its user; a project token (``uid`` None) sees every
device bound to some open hub user. A device never bound to anyone is not visible to applications.

Places: today one per user (``Place.kind == "user"``), id :func:`user_place_id`. When sites exist, a
place per site replaces it here (``places_of`` / ``place_devices``), and the HTTP layer, which only
speaks of places, is unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Select, select

from meterhub.openhub import schema as oh
from meterhub.storage import schema

_d = schema.devices
_b = oh.bindings
#: Most values in one ``IN (...)``.
_IN_CHUNK = 900


@dataclass(slots=True, frozen=True)
class DeviceRow:
    cid: str
    uid: str  # the user it is seen through (the requesting user, or the first bound one)
    name: str | None
    gateway_id: str
    product_id: str
    model: str
    online: bool
    device_ip: str | None
    first_seen: float
    last_seen: float
    synced_at: float


@dataclass(slots=True, frozen=True)
class Place:
    """A group of devices: a home (smart-home API) or an asset (industry API)."""

    id: int
    name: str
    uid: str
    kind: str = "user"

    @property
    def asset_id(self) -> str:
        return str(self.id)


def _chunks(values: Collection[str]) -> Iterator[list[str]]:
    items = sorted(set(values))
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _device_query() -> Select[Any]:
    return select(
        _d.c.cid,
        _b.c.uid,
        _d.c.device_name,
        _d.c.gateway_id,
        _d.c.product_id,
        _d.c.model,
        _d.c.online,
        _d.c.device_ip,
        _d.c.first_seen,
        _d.c.last_seen,
        _d.c.synced_at,
    ).select_from(_d.join(_b, _b.c.cid == _d.c.cid))


def _rows(rows: Any) -> list[DeviceRow]:
    seen: dict[str, DeviceRow] = {}
    for r in sorted(rows, key=lambda r: (r.cid, r.uid)):
        if r.cid not in seen:
            seen[r.cid] = DeviceRow(
                r.cid,
                r.uid,
                r.device_name,
                r.gateway_id,
                r.product_id,
                r.model,
                bool(r.online),
                r.device_ip,
                r.first_seen,
                r.last_seen,
                r.synced_at,
            )
    return list(seen.values())


def visible_devices(
    engine: Engine,
    uid: str | None,
    cids: Collection[str] | None = None,
    *,
    after: str | None = None,
    limit: int | None = None,
) -> list[DeviceRow]:
    """The devices in scope (of ``uid``, or of the project when None), by cid; only ``cids`` if given.
    ``after``/``limit`` page through them (cids greater than ``after``)."""
    q = _device_query()
    if uid is not None:
        q = q.where(_b.c.uid == uid)
    if after:
        q = q.where(_d.c.cid > after)
    with engine.connect() as conn:
        if cids is None:
            if limit is not None and uid is not None:
                q = q.order_by(_d.c.cid).limit(limit)
            found = _rows(conn.execute(q).all())
        else:
            rows: list[Any] = []
            for chunk in _chunks(cids):
                rows.extend(conn.execute(q.where(_d.c.cid.in_(chunk))).all())
            found = _rows(rows)
    return found[:limit] if limit is not None else found


def visible_device(engine: Engine, uid: str | None, cid: str) -> DeviceRow | None:
    found = visible_devices(engine, uid, [cid])
    return found[0] if found else None


def latest_values(engine: Engine, cids: Collection[str]) -> dict[str, list[tuple[str, Any, float]]]:
    """cid -> ``[(dp_id, canonical value, t)]`` of the latest reported values."""
    lv = schema.latest
    out: dict[str, list[tuple[str, Any, float]]] = {}
    with engine.connect() as conn:
        for chunk in _chunks(cids):
            q = select(lv.c.cid, lv.c.dp_id, lv.c.value, lv.c.t).where(lv.c.cid.in_(chunk))
            for cid, dp_id, value, t in conn.execute(q).all():
                out.setdefault(cid, []).append((dp_id, value, t))
    return out


# --- places ----------------------------------------------------------------------------------------


def user_place_id(uid: str) -> int:
    """A user's home id: stable, positive, within JavaScript's safe integers (52 bits)."""
    return int(hashlib.sha256(f"home\0{uid}".encode()).hexdigest()[:13], 16)


def places_of(engine: Engine, uid: str | None) -> list[Place]:
    """The places in scope: the user's home, or every user's for a project token."""
    u = oh.users
    q = select(u.c.uid, u.c.username)
    if uid is not None:
        q = q.where(u.c.uid == uid)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    places = [Place(user_place_id(r.uid), r.username, r.uid) for r in rows]
    return sorted(places, key=lambda p: p.id)


def find_place(engine: Engine, uid: str | None, place_id: str | int) -> Place | None:
    """The place with this id, if it is in scope."""
    try:
        wanted = int(place_id)
    except (TypeError, ValueError):
        return None
    for place in places_of(engine, uid):
        if place.id == wanted:
            return place
    return None


def place_devices(engine: Engine, place: Place) -> list[DeviceRow]:
    """The devices of a place (a user's: the devices bound to the user)."""
    return visible_devices(engine, place.uid)
