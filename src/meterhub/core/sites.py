"""Sites, buildings, units, meters in units, tenants, occupancy and tariffs: the operator's records.

Plain synchronous functions on an Engine (the API runs them in worker threads, the CLI directly).
Every mistake raises :class:`PMError` with an HTTP status and a message meant for the operator
(404 unknown thing, 409 conflict such as overlapping occupancy, 422 bad value). Every change is written
to ``audit_log`` in the same transaction.

Meter assignment keeps history: moving a meter closes its current assignment at the instant of the
move and opens a new one, so a bill for an earlier month still finds the meter where it was.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Engine, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from meterhub.billing.engine import BillError, MeterInterval, TariffVersion, compute_bill
from meterhub.billing.tariff import TariffError, parse_spec
from meterhub.core import energy
from meterhub.storage import schema

__all__ = ["PMError", "audit", "parse_instant"]

S, B, U = schema.sites, schema.buildings, schema.units
MA, T, OC = schema.meter_assignments, schema.tenants, schema.occupancies
TF, TV = schema.tariffs, schema.tariff_versions
FOREVER = 1e11


class PMError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> float:
    return time.time()


def audit(
    conn: Connection,
    actor: str,
    action: str,
    *,
    site_id: int | None = None,
    target: str | None = None,
    details: Any = None,
    at: float | None = None,
) -> None:
    conn.execute(
        insert(schema.audit_log).values(
            at=_now() if at is None else at,
            actor=actor[:128],
            site_id=site_id,
            action=action,
            target=None if target is None else target[:255],
            details=details,
        )
    )


def parse_instant(value: Any, tz: ZoneInfo, name: str) -> float:
    """Unix seconds, an ISO 8601 time (no offset: the site's zone) or a date (its local midnight)."""
    if isinstance(value, bool):
        raise PMError(422, f"{name}: expected a time, got {value!r}")
    if isinstance(value, (int, float)):
        t = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            t = float(text)
        except ValueError:
            try:
                if len(text) == 10:
                    d = dt.date.fromisoformat(text)
                    parsed = dt.datetime(d.year, d.month, d.day, tzinfo=tz)
                else:
                    parsed = dt.datetime.fromisoformat(text)
                    if parsed.tzinfo is None:
                        parsed = parsed.replace(tzinfo=tz)
                t = parsed.timestamp()
            except (ValueError, OverflowError):
                raise PMError(
                    422, f"{name}: expected Unix seconds, YYYY-MM-DD or an ISO 8601 time, got {text[:40]!r}"
                ) from None
    else:
        raise PMError(422, f"{name}: expected a time, got {value!r}")
    if not -1e11 < t < 1e11 or t != t:
        raise PMError(422, f"{name}: time out of range")
    return t


def _iso(t: float | None, tz: ZoneInfo) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, tz).isoformat()


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PMError(422, f"timezone: {name!r} is not a known IANA time zone (e.g. Europe/Berlin)") from None


def _currency(code: str) -> str:
    if not (isinstance(code, str) and len(code) == 3 and code.isalpha()):
        raise PMError(422, f"currency: expected a 3-letter ISO 4217 code (EUR, GBP), got {code!r}")
    return code.upper()


def _name(value: Any, what: str, limit: int = 128) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise PMError(422, f"{what}: 1 to {limit} characters")
    return value.strip()


def _row(conn: Connection, table: Any, key: Any, what: str) -> dict[str, Any]:
    row = conn.execute(select(table).where(table.c.id == key)).first()
    if row is None:
        raise PMError(404, f"{what} {key} does not exist")
    return dict(row._mapping)


# --- sites ---------------------------------------------------------------------------------------


def site_out(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "name", "timezone", "currency", "tariff_id", "created_at")}


def create_site(engine: Engine, name: str, timezone: str, currency: str, actor: str) -> dict[str, Any]:
    name = _name(name, "name")
    _zone(timezone)
    cur = _currency(currency)
    try:
        with engine.begin() as conn:
            sid = conn.execute(
                insert(S).values(name=name, timezone=timezone, currency=cur, created_at=_now())
            ).inserted_primary_key[0]
            audit(conn, actor, "site.create", site_id=sid, target=name)
            return site_out(_row(conn, S, sid, "site"))
    except IntegrityError:
        raise PMError(409, f"a site named {name!r} already exists") from None


def list_sites(engine: Engine, site_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    q = select(S).order_by(S.c.name)
    if site_ids is not None:
        q = q.where(S.c.id.in_(list(site_ids)))
    with engine.connect() as conn:
        return [site_out(dict(r._mapping)) for r in conn.execute(q).all()]


def get_site(engine: Engine, site_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return site_out(_row(conn, S, site_id, "site"))


def find_site(engine: Engine, ref: str) -> dict[str, Any]:
    """A site by id or by name."""
    with engine.connect() as conn:
        q = select(S).where(S.c.name == ref)
        if ref.isdigit():
            q = select(S).where(or_(S.c.name == ref, S.c.id == int(ref)))
        row = conn.execute(q).first()
    if row is None:
        raise PMError(404, f"site {ref!r} does not exist")
    return site_out(dict(row._mapping))


def update_site(engine: Engine, site_id: int, changes: dict[str, Any], actor: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if changes.get("name") is not None:
        values["name"] = _name(changes["name"], "name")
    if changes.get("timezone") is not None:
        _zone(changes["timezone"])
        values["timezone"] = changes["timezone"]
    if changes.get("currency") is not None:
        values["currency"] = _currency(changes["currency"])
    try:
        with engine.begin() as conn:
            _row(conn, S, site_id, "site")
            if "tariff_id" in changes:
                tid = changes["tariff_id"]
                if tid is not None:
                    _tariff_of_site(conn, tid, site_id)
                values["tariff_id"] = tid
            if values:
                conn.execute(update(S).where(S.c.id == site_id).values(**values))
                audit(conn, actor, "site.update", site_id=site_id, details=values)
            return site_out(_row(conn, S, site_id, "site"))
    except IntegrityError:
        raise PMError(409, f"a site named {values.get('name')!r} already exists") from None


# --- buildings and units -------------------------------------------------------------------------


def create_building(engine: Engine, site_id: int, name: str, actor: str) -> dict[str, Any]:
    name = _name(name, "name")
    try:
        with engine.begin() as conn:
            _row(conn, S, site_id, "site")
            bid = conn.execute(
                insert(B).values(site_id=site_id, name=name, created_at=_now())
            ).inserted_primary_key[0]
            audit(conn, actor, "building.create", site_id=site_id, target=name)
            return _row(conn, B, bid, "building")
    except IntegrityError:
        raise PMError(409, f"site {site_id} already has a building named {name!r}") from None


def list_buildings(engine: Engine, site_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        _row(conn, S, site_id, "site")
        return [
            dict(r._mapping) for r in conn.execute(select(B).where(B.c.site_id == site_id).order_by(B.c.name))
        ]


def create_unit(
    engine: Engine, building_id: int, name: str, label: str | None, tariff_id: int | None, actor: str
) -> dict[str, Any]:
    name = _name(name, "name")
    if label is not None:
        label = _name(label, "label", 64)
    try:
        with engine.begin() as conn:
            b = _row(conn, B, building_id, "building")
            if tariff_id is not None:
                _tariff_of_site(conn, tariff_id, b["site_id"])
            uid = conn.execute(
                insert(U).values(
                    building_id=building_id,
                    site_id=b["site_id"],
                    name=name,
                    label=label,
                    tariff_id=tariff_id,
                    created_at=_now(),
                )
            ).inserted_primary_key[0]
            audit(conn, actor, "unit.create", site_id=b["site_id"], target=name)
            return _unit(conn, uid)
    except IntegrityError:
        raise PMError(409, f"building {building_id} already has a unit named {name!r}") from None


def _unit(conn: Connection, unit_id: int) -> dict[str, Any]:
    u = _row(conn, U, unit_id, "unit")
    now = _now()
    u["meters"] = [
        r.cid
        for r in conn.execute(
            select(MA.c.cid).where(
                MA.c.unit_id == unit_id, MA.c.start_t <= now, or_(MA.c.end_t.is_(None), MA.c.end_t > now)
            )
        )
    ]
    return u


def get_unit(engine: Engine, unit_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return _unit(conn, unit_id)


def update_unit(engine: Engine, unit_id: int, changes: dict[str, Any], actor: str) -> dict[str, Any]:
    with engine.begin() as conn:
        u = _row(conn, U, unit_id, "unit")
        values: dict[str, Any] = {}
        if changes.get("name") is not None:
            values["name"] = _name(changes["name"], "name")
        if "label" in changes:
            values["label"] = None if changes["label"] is None else _name(changes["label"], "label", 64)
        if "tariff_id" in changes:
            if changes["tariff_id"] is not None:
                _tariff_of_site(conn, changes["tariff_id"], u["site_id"])
            values["tariff_id"] = changes["tariff_id"]
        if values:
            try:
                conn.execute(update(U).where(U.c.id == unit_id).values(**values))
            except IntegrityError:
                raise PMError(409, f"the building already has a unit named {values.get('name')!r}") from None
            audit(conn, actor, "unit.update", site_id=u["site_id"], target=str(unit_id), details=values)
        return _unit(conn, unit_id)


def list_units(engine: Engine, site_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        _row(conn, S, site_id, "site")
        ids = [r.id for r in conn.execute(select(U.c.id).where(U.c.site_id == site_id).order_by(U.c.id))]
        return [_unit(conn, i) for i in ids]


# --- meters --------------------------------------------------------------------------------------


def _device_exists(conn: Connection, cid: str) -> bool:
    d = schema.devices
    return conn.execute(select(d.c.cid).where(d.c.cid == cid)).first() is not None


def set_meter_info(
    engine: Engine, cid: str, name: str | None, location: str | None, actor: str
) -> dict[str, Any]:
    mi = schema.meter_info
    with engine.begin() as conn:
        if not _device_exists(conn, cid):
            raise PMError(404, f"device {cid!r} does not exist")
        values = {"name": name, "location": location, "updated_at": _now()}
        for k in ("name", "location"):
            if values[k] is not None and len(values[k]) > 255:
                raise PMError(422, f"{k}: at most 255 characters")
        if conn.execute(select(mi.c.cid).where(mi.c.cid == cid)).first() is None:
            conn.execute(insert(mi).values(cid=cid, **values))
        else:
            conn.execute(update(mi).where(mi.c.cid == cid).values(**values))
        audit(conn, actor, "meter.rename", site_id=_site_of_meter(conn, cid), target=cid, details=values)
    return meter(engine, cid)


def _site_of_meter(conn: Connection, cid: str) -> int | None:
    row = conn.execute(
        select(MA.c.site_id).where(MA.c.cid == cid, MA.c.end_t.is_(None)).order_by(MA.c.start_t.desc())
    ).first()
    return None if row is None else row.site_id


def meter(engine: Engine, cid: str) -> dict[str, Any]:
    d, mi = schema.devices, schema.meter_info
    with engine.connect() as conn:
        dev = conn.execute(select(d).where(d.c.cid == cid)).first()
        if dev is None:
            raise PMError(404, f"device {cid!r} does not exist")
        info = conn.execute(select(mi).where(mi.c.cid == cid)).first()
        hist = conn.execute(select(MA).where(MA.c.cid == cid).order_by(MA.c.start_t)).all()
    return {
        "cid": cid,
        "name": (info.name if info is not None and info.name else None) or dev.device_name,
        "location": (info.location if info is not None and info.location else None) or dev.install_location,
        "online": bool(dev.online),
        "unit_id": next((h.unit_id for h in hist if h.end_t is None), None),
        "site_id": next((h.site_id for h in hist if h.end_t is None), None),
        "assignments": [
            {"unit_id": h.unit_id, "site_id": h.site_id, "from": h.start_t, "to": h.end_t} for h in hist
        ],
    }


def assign_meter(
    engine: Engine, cid: str, unit_id: int | None, at: float | None, actor: str
) -> dict[str, Any]:
    """Put meter ``cid`` in a unit from instant ``at`` (now by default); ``unit_id`` None takes it out."""
    at = _now() if at is None else at
    with engine.begin() as conn:
        if not _device_exists(conn, cid):
            raise PMError(404, f"device {cid!r} does not exist")
        unit = _row(conn, U, unit_id, "unit") if unit_id is not None else None
        # a move must come after every earlier one (history is never rewritten)
        later = conn.execute(
            select(MA.c.id).where(MA.c.cid == cid, or_(MA.c.start_t >= at, MA.c.end_t > at))
        ).first()
        if later is not None:
            raise PMError(
                409,
                f"meter {cid!r} was already moved at or after {dt.datetime.fromtimestamp(at).isoformat()}; "
                "a move must be later than the meter's last move",
            )
        cur = conn.execute(select(MA).where(MA.c.cid == cid, MA.c.end_t.is_(None))).first()
        if cur is not None and unit is not None and cur.unit_id == unit_id:
            raise PMError(409, f"meter {cid!r} is already in unit {unit_id}")
        if cur is not None:
            conn.execute(update(MA).where(MA.c.id == cur.id).values(end_t=at))
        elif unit is None:
            raise PMError(409, f"meter {cid!r} is not in any unit")
        if unit is not None:
            conn.execute(insert(MA).values(cid=cid, unit_id=unit_id, site_id=unit["site_id"], start_t=at))
        audit(
            conn,
            actor,
            "meter.assign" if unit is not None else "meter.unassign",
            site_id=unit["site_id"] if unit is not None else cur.site_id if cur is not None else None,
            target=cid,
            details={"unit_id": unit_id, "from_unit_id": cur.unit_id if cur is not None else None, "at": at},
        )
    return meter(engine, cid)


def site_meters(engine: Engine, site_id: int) -> list[str]:
    """Meters in the site's units now."""
    now = _now()
    with engine.connect() as conn:
        _row(conn, S, site_id, "site")
        rows = conn.execute(
            select(MA.c.cid)
            .where(MA.c.site_id == site_id, MA.c.start_t <= now, or_(MA.c.end_t.is_(None), MA.c.end_t > now))
            .order_by(MA.c.cid)
        ).all()
    return [r.cid for r in rows]


# --- tenants and occupancy -----------------------------------------------------------------------


def create_tenant(
    engine: Engine, site_id: int, name: str, reference: str | None, email: str | None, actor: str
) -> dict[str, Any]:
    name = _name(name, "name", 255)
    with engine.begin() as conn:
        _row(conn, S, site_id, "site")
        tid = conn.execute(
            insert(T).values(site_id=site_id, name=name, reference=reference, email=email, created_at=_now())
        ).inserted_primary_key[0]
        audit(conn, actor, "tenant.create", site_id=site_id, target=name)
        return _tenant(conn, tid)


def _tenant(conn: Connection, tenant_id: int) -> dict[str, Any]:
    t = _row(conn, T, tenant_id, "tenant")
    t["occupancies"] = [
        {"id": r.id, "unit_id": r.unit_id, "from": r.start_t, "to": r.end_t}
        for r in conn.execute(select(OC).where(OC.c.tenant_id == tenant_id).order_by(OC.c.start_t))
    ]
    return t


def get_tenant(engine: Engine, tenant_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return _tenant(conn, tenant_id)


def list_tenants(engine: Engine, site_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        _row(conn, S, site_id, "site")
        ids = [r.id for r in conn.execute(select(T.c.id).where(T.c.site_id == site_id).order_by(T.c.name))]
        return [_tenant(conn, i) for i in ids]


def add_occupancy(
    engine: Engine, tenant_id: int, unit_id: int, start: Any, end: Any, actor: str
) -> dict[str, Any]:
    """Tenant moves into a unit at ``start`` (and out at ``end``, exclusive, or open-ended)."""
    with engine.begin() as conn:
        tenant = _row(conn, T, tenant_id, "tenant")
        unit = _row(conn, U, unit_id, "unit")
        if unit["site_id"] != tenant["site_id"]:
            raise PMError(409, f"unit {unit_id} is not in the tenant's site {tenant['site_id']}")
        tz = _zone(_row(conn, S, unit["site_id"], "site")["timezone"])
        s = parse_instant(start, tz, "move_in")
        e = None if end is None else parse_instant(end, tz, "move_out")
        if e is not None and e <= s:
            raise PMError(422, "move_out must be after move_in")
        _check_free(conn, unit_id, s, e, tz, exclude=None)
        oid = conn.execute(
            insert(OC).values(tenant_id=tenant_id, unit_id=unit_id, start_t=s, end_t=e, created_at=_now())
        ).inserted_primary_key[0]
        audit(
            conn,
            actor,
            "occupancy.create",
            site_id=unit["site_id"],
            target=f"tenant {tenant_id} unit {unit_id}",
            details={"id": oid, "from": s, "to": e},
        )
        return _tenant(conn, tenant_id)


def _check_free(
    conn: Connection, unit_id: int, s: float, e: float | None, tz: ZoneInfo, exclude: int | None
) -> None:
    q = (
        select(OC, T.c.name)
        .join(T, T.c.id == OC.c.tenant_id)
        .where(
            OC.c.unit_id == unit_id,
            or_(OC.c.end_t.is_(None), OC.c.end_t > s),
        )
    )
    if e is not None:
        q = q.where(OC.c.start_t < e)
    if exclude is not None:
        q = q.where(OC.c.id != exclude)
    clash = conn.execute(q).first()
    if clash is not None:
        until = _iso(clash.end_t, tz) or "open-ended"
        raise PMError(
            409,
            f"unit {unit_id} is occupied by tenant {clash.name!r} from {_iso(clash.start_t, tz)} to {until}: "
            "occupancies of a unit may not overlap",
        )


def end_occupancy(engine: Engine, occupancy_id: int, end: Any, actor: str) -> dict[str, Any]:
    """Move-out: set (or change) the end of an occupancy."""
    with engine.begin() as conn:
        occ = _row(conn, OC, occupancy_id, "occupancy")
        unit = _row(conn, U, occ["unit_id"], "unit")
        tz = _zone(_row(conn, S, unit["site_id"], "site")["timezone"])
        e = None if end is None else parse_instant(end, tz, "move_out")
        if e is not None and e <= occ["start_t"]:
            raise PMError(422, "move_out must be after move_in")
        _check_free(conn, occ["unit_id"], occ["start_t"], e, tz, exclude=occupancy_id)
        conn.execute(update(OC).where(OC.c.id == occupancy_id).values(end_t=e))
        audit(
            conn,
            actor,
            "occupancy.move_out",
            site_id=unit["site_id"],
            target=str(occupancy_id),
            details={"to": e},
        )
        return _tenant(conn, occ["tenant_id"])


# --- tariffs -------------------------------------------------------------------------------------


def _tariff_of_site(conn: Connection, tariff_id: int, site_id: int) -> dict[str, Any]:
    t = _row(conn, TF, tariff_id, "tariff")
    if t["site_id"] != site_id:
        raise PMError(409, f"tariff {tariff_id} belongs to another site")
    return t


def _version_in(data: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(data, dict):
        raise PMError(422, "a tariff version is an object with effective_from and the specification")
    eff = data.get("effective_from")
    try:
        day = dt.date.fromisoformat(eff) if isinstance(eff, str) else None
    except ValueError:
        day = None
    if day is None:
        raise PMError(422, f"effective_from: expected YYYY-MM-DD, got {eff!r}")
    spec = {k: v for k, v in data.items() if k != "effective_from"}
    try:
        parsed = parse_spec(spec)
    except TariffError as exc:
        raise PMError(422, f"tariff version {eff}: {exc}") from None
    return day.isoformat(), parsed.as_dict()


def create_tariff(engine: Engine, site_id: int, name: str, versions: list[Any], actor: str) -> dict[str, Any]:
    name = _name(name, "name")
    if not versions:
        raise PMError(422, "versions: at least one version (effective_from and prices) is required")
    parsed = [_version_in(v) for v in versions]
    if len({p[0] for p in parsed}) != len(parsed):
        raise PMError(422, "versions: two versions with the same effective_from")
    try:
        with engine.begin() as conn:
            _row(conn, S, site_id, "site")
            tid = conn.execute(
                insert(TF).values(site_id=site_id, name=name, created_at=_now())
            ).inserted_primary_key[0]
            for eff, spec in parsed:
                conn.execute(
                    insert(TV).values(tariff_id=tid, effective_from=eff, spec=spec, created_at=_now())
                )
            audit(conn, actor, "tariff.create", site_id=site_id, target=name, details={"versions": parsed})
            return _tariff(conn, tid)
    except IntegrityError:
        raise PMError(409, f"site {site_id} already has a tariff named {name!r}") from None


def add_tariff_version(engine: Engine, tariff_id: int, version: Any, actor: str) -> dict[str, Any]:
    eff, spec = _version_in(version)
    try:
        with engine.begin() as conn:
            t = _row(conn, TF, tariff_id, "tariff")
            conn.execute(
                insert(TV).values(tariff_id=tariff_id, effective_from=eff, spec=spec, created_at=_now())
            )
            audit(conn, actor, "tariff.version", site_id=t["site_id"], target=t["name"], details={eff: spec})
            return _tariff(conn, tariff_id)
    except IntegrityError:
        raise PMError(409, f"tariff {tariff_id} already has a version effective from {eff}") from None


def _tariff(conn: Connection, tariff_id: int) -> dict[str, Any]:
    t = _row(conn, TF, tariff_id, "tariff")
    t["versions"] = [
        {"effective_from": r.effective_from, **r.spec}
        for r in conn.execute(select(TV).where(TV.c.tariff_id == tariff_id).order_by(TV.c.effective_from))
    ]
    return t


def get_tariff(engine: Engine, tariff_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return _tariff(conn, tariff_id)


def list_tariffs(engine: Engine, site_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        _row(conn, S, site_id, "site")
        ids = [r.id for r in conn.execute(select(TF.c.id).where(TF.c.site_id == site_id).order_by(TF.c.name))]
        return [_tariff(conn, i) for i in ids]


def tariff_versions(conn: Connection, tariff_id: int) -> list[TariffVersion]:
    t = _tariff(conn, tariff_id)
    return [
        TariffVersion(
            dt.date.fromisoformat(v["effective_from"]),
            parse_spec({k: x for k, x in v.items() if k != "effective_from"}),
            t["name"],
        )
        for v in t["versions"]
    ]


# --- bills ---------------------------------------------------------------------------------------


def meter_readings(conn: Connection, cid: str, start: float, end: float) -> list[energy.Reading]:
    """The cumulative-total readings of ``cid`` in ``[start, end]`` and its neighbours outside, from the
    source the energy service would use (dp 44, else dp 50)."""
    for dp_id, _code in energy.SOURCE_DPS:
        inside = energy._readings(conn, cid, dp_id, start, end)
        before = energy._neighbour(conn, cid, dp_id, start, before=True)
        if inside or before is not None:
            after = energy._neighbour(conn, cid, dp_id, end, before=False)
            return [*([before] if before else []), *inside, *([after] if after else [])]
    return []


def month_span(month: str, tz: ZoneInfo) -> tuple[float, float]:
    try:
        first = energy.parse_period_key(month, "month")
        b = energy.buckets_for("month", first, first, tz)[0]
    except (ValueError, OverflowError) as exc:
        raise PMError(422, f"month: {exc}") from None
    if len(month.strip()) != 7:
        raise PMError(422, f"month: expected YYYY-MM, got {month!r}")
    return b.start, b.end


def _clip(spans: list[tuple[float, float | None]], s: float, e: float) -> list[tuple[float, float]]:
    out = []
    for a, b in spans:
        lo, hi = max(a, s), min(FOREVER if b is None else b, e)
        if hi > lo:
            out.append((lo, hi))
    return out


def unit_bill(
    engine: Engine, unit_id: int, month: str, tenant_id: int | None = None, *, vacant: bool = False
) -> dict[str, Any]:
    """The bill of a unit for a month: all of it, one tenant's occupancy (``tenant_id``), or the time
    no tenant occupied it (``vacant``: the landlord's part)."""
    with engine.connect() as conn:
        unit = _row(conn, U, unit_id, "unit")
        site = _row(conn, S, unit["site_id"], "site")
        tz = _zone(site["timezone"])
        start, end = month_span(month, tz)
        # a month still in progress is billed up to now (a preview): no standing charge for days to come
        preview = end > time.time()
        if preview:
            end = max(start + 1, time.time())
        tenant = None
        if tenant_id is not None:
            tenant = _row(conn, T, tenant_id, "tenant")
            occ = conn.execute(
                select(OC.c.start_t, OC.c.end_t).where(OC.c.tenant_id == tenant_id, OC.c.unit_id == unit_id)
            ).all()
            occupied = _clip([(r.start_t, r.end_t) for r in occ], start, end)
        elif vacant:
            occ = conn.execute(select(OC.c.start_t, OC.c.end_t).where(OC.c.unit_id == unit_id)).all()
            occupied = _gaps(_clip([(r.start_t, r.end_t) for r in occ], start, end), start, end)
        else:
            occupied = [(start, end)]
        tariff_id = unit["tariff_id"] or site["tariff_id"]
        if tariff_id is None:
            raise PMError(409, f"unit {unit['name']!r} has no tariff and neither has site {site['name']!r}")
        versions = tariff_versions(conn, tariff_id)
        assigned = conn.execute(
            select(MA.c.cid, MA.c.start_t, MA.c.end_t).where(
                MA.c.unit_id == unit_id, MA.c.start_t < end, or_(MA.c.end_t.is_(None), MA.c.end_t > start)
            )
        ).all()
        intervals: list[MeterInterval] = []
        cache: dict[str, list[energy.Reading]] = {}
        for a in assigned:
            for s, e in _clip([(a.start_t, a.end_t)], start, end):
                for os_, oe in occupied:
                    lo, hi = max(s, os_), min(e, oe)
                    if hi <= lo:
                        continue
                    if a.cid not in cache:
                        cache[a.cid] = meter_readings(conn, a.cid, start, end)
                    intervals.append(MeterInterval(a.cid, lo, hi, cache[a.cid]))
        try:
            bill = compute_bill(
                start=start,
                end=end,
                tz=tz,
                currency=site["currency"],
                intervals=intervals,
                versions=versions,
                occupied=occupied,
            )
        except BillError as exc:
            raise PMError(409, str(exc)) from None
    out = bill.as_dict()
    out.update(
        {
            "month": month,
            "preview": preview,
            "start_iso": _iso(start, tz),
            "end_iso": _iso(end, tz),
            "site": {"id": site["id"], "name": site["name"], "timezone": site["timezone"]},
            "unit": {"id": unit["id"], "name": unit["name"], "label": unit["label"]},
            "tenant": None if tenant is None else {"id": tenant["id"], "name": tenant["name"]},
            "vacant": vacant,
            "occupied": [
                {"from": a, "to": b, "from_iso": _iso(a, tz), "to_iso": _iso(b, tz)} for a, b in occupied
            ],
            "tariff_id": tariff_id,
        }
    )
    return out


def tenant_bill(engine: Engine, tenant_id: int, month: str) -> dict[str, Any]:
    with engine.connect() as conn:
        tenant = _row(conn, T, tenant_id, "tenant")
        tz = _zone(_row(conn, S, tenant["site_id"], "site")["timezone"])
        start, end = month_span(month, tz)
        units = sorted(
            {
                r.unit_id
                for r in conn.execute(
                    select(OC.c.unit_id).where(
                        OC.c.tenant_id == tenant_id,
                        OC.c.start_t < end,
                        or_(OC.c.end_t.is_(None), OC.c.end_t > start),
                    )
                )
            }
        )
    if not units:
        raise PMError(404, f"tenant {tenant['name']!r} occupied no unit in {month}")
    if len(units) > 1:
        raise PMError(
            409,
            f"tenant {tenant['name']!r} occupied units {units} in {month}: "
            "ask for each with /units/{id}/bill?tenant_id=",
        )
    return unit_bill(engine, units[0], month, tenant_id)


def _gaps(spans: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """``[start, end)`` minus the (non-overlapping) ``spans``."""
    out, at = [], start
    for a, b in sorted(spans):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < end:
        out.append((at, end))
    return out


def site_bills(engine: Engine, site_id: int, month: str) -> list[dict[str, Any]]:
    """One bill per occupancy (tenant and unit) in the month, and one per unit with metered time that no
    tenant occupied (``vacant``, the landlord's part), in unit order."""
    with engine.connect() as conn:
        site = _row(conn, S, site_id, "site")
        tz = _zone(site["timezone"])
        start, end = month_span(month, tz)
        end = min(end, max(start + 1, time.time()))
        occ = conn.execute(
            select(OC.c.tenant_id, OC.c.unit_id, OC.c.start_t, OC.c.end_t)
            .join(U, U.c.id == OC.c.unit_id)
            .where(U.c.site_id == site_id, OC.c.start_t < end, or_(OC.c.end_t.is_(None), OC.c.end_t > start))
            .order_by(OC.c.unit_id, OC.c.start_t)
        ).all()
        metered = {
            r.unit_id
            for r in conn.execute(
                select(MA.c.unit_id).where(
                    MA.c.site_id == site_id, MA.c.start_t < end, or_(MA.c.end_t.is_(None), MA.c.end_t > start)
                )
            )
        }
    by_unit: dict[int, list[Any]] = {}
    for r in occ:
        by_unit.setdefault(r.unit_id, []).append(r)
    out: list[dict[str, Any]] = []
    for unit_id in sorted(set(by_unit) | metered):
        rows = by_unit.get(unit_id, [])
        for tenant_id in dict.fromkeys(r.tenant_id for r in rows):
            out.append(unit_bill(engine, unit_id, month, tenant_id))
        if unit_id in metered and _gaps(_clip([(r.start_t, r.end_t) for r in rows], start, end), start, end):
            out.append(unit_bill(engine, unit_id, month, vacant=True))
    return out


def audit_entries(
    engine: Engine, site_ids: Sequence[int] | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    a = schema.audit_log
    q = select(a)
    c = select(func.count()).select_from(a)
    if site_ids is not None:
        q = q.where(a.c.site_id.in_(list(site_ids)))
        c = c.where(a.c.site_id.in_(list(site_ids)))
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(a.c.id.desc()).limit(limit).offset(offset)).all()
        total = conn.execute(c).scalar_one()
    return [dict(r._mapping) for r in rows], total


# --- the site at a glance (dashboard) ------------------------------------------------------------


def site_overview(engine: Engine, site_id: int, silent_minutes: float, days: int) -> dict[str, Any]:
    """Power now, energy per day over the last ``days`` days, top consumers this month, meters silent
    for more than ``silent_minutes`` (no report measured since), active alarms: the site's meters
    (those in its units now)."""
    now = _now()
    d, lv, al = schema.devices, schema.latest, schema.alarms
    with engine.connect() as conn:
        site = _row(conn, S, site_id, "site")
        tz = _zone(site["timezone"])
        rows = conn.execute(
            select(MA.c.cid, U.c.id.label("unit_id"), U.c.name.label("unit"))
            .join(U, U.c.id == MA.c.unit_id)
            .where(MA.c.site_id == site_id, MA.c.start_t <= now, or_(MA.c.end_t.is_(None), MA.c.end_t > now))
            .order_by(U.c.name, MA.c.cid)
        ).all()
        cids = [r.cid for r in rows]
        devs = {r.cid: r for r in conn.execute(select(d).where(d.c.cid.in_(cids)))} if cids else {}
        power = (
            {
                r.cid: r.num
                for r in conn.execute(select(lv.c.cid, lv.c.num).where(lv.c.cid.in_(cids), lv.c.dp_id == "3"))
            }
            if cids
            else {}
        )
        last_report = (
            {
                cid: last_t
                for cid, last_t in conn.execute(
                    select(lv.c.cid, func.max(lv.c.t)).where(lv.c.cid.in_(cids)).group_by(lv.c.cid)
                )
            }
            if cids
            else {}
        )
        names = (
            {
                r.cid: r.name
                for r in conn.execute(select(schema.meter_info).where(schema.meter_info.c.cid.in_(cids)))
            }
            if cids
            else {}
        )
        today = dt.datetime.fromtimestamp(now, tz).date()
        day_buckets = energy.buckets_for("day", today - dt.timedelta(days=days - 1), today, tz)
        per_day, _ = energy.group_energy(conn, cids, "day", day_buckets) if cids else ([None] * days, [])
        month = energy.buckets_for("month", today.replace(day=1), today, tz)
        _, parts = energy.group_energy(conn, cids, "month", month) if cids else ([], [])
        alarms = (
            [
                dict(r._mapping)
                for r in conn.execute(
                    select(al)
                    .where(al.c.cid.in_(cids), al.c.cleared_at.is_(None))
                    .order_by(al.c.raised_at.desc())
                )
            ]
            if cids
            else []
        )
    meters = []
    for r in rows:
        dev = devs.get(r.cid)
        # the newest measurement time reported (a gateway can be connected while its meter is silent)
        last_seen = last_report.get(r.cid)
        meters.append(
            {
                "cid": r.cid,
                "name": names.get(r.cid) or (dev.device_name if dev is not None else None),
                "unit_id": r.unit_id,
                "unit": r.unit,
                "online": bool(dev.online) if dev is not None else False,
                "power_w": power.get(r.cid) if dev is not None and dev.online else None,
                "last_seen": last_seen,
                "silent": last_seen is None or now - last_seen > silent_minutes * 60,
            }
        )
    month_kwh = {p.cid: p.total for p in parts}
    top = sorted(
        ({"cid": m["cid"], "unit": m["unit"], "kwh": month_kwh.get(m["cid"])} for m in meters),
        key=lambda x: -(x["kwh"] or 0),
    )
    return {
        "site": site_out(site),
        "now": now,
        "power_w": sum(m["power_w"] or 0 for m in meters),
        "meters": meters,
        "silent_minutes": silent_minutes,
        "silent": [m["cid"] for m in meters if m["silent"]],
        "energy_per_day": [{"day": b.key, "kwh": v} for b, v in zip(day_buckets, per_day, strict=True)],
        "top_consumers": top[:10],
        "alarms": alarms,
    }


# --- filtering the fleet by site -----------------------------------------------------------------


def site_rows(
    engine: Engine, site_id: int, kind: str, *, active: bool | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """Alarms (``kind="alarms"``, newest first) or commands (``"commands"``) of the meters in the
    site's units now."""
    cids = site_meters(engine, site_id)
    table = schema.alarms if kind == "alarms" else schema.commands
    if not cids:
        return [], 0
    conds = [table.c.cid.in_(cids)]
    if kind == "alarms" and active is not None:
        conds.append(table.c.cleared_at.is_(None) if active else table.c.cleared_at.is_not(None))
    order = table.c.raised_at if kind == "alarms" else table.c.created_at
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(table).where(*conds)).scalar_one()
        rows = conn.execute(
            select(table).where(*conds).order_by(order.desc(), table.c.id.desc()).limit(limit).offset(offset)
        ).all()
    return [dict(r._mapping) for r in rows], total


def site_energy(engine: Engine, site_id: int, period: str, first: str, last: str) -> dict[str, Any]:
    """Energy per day or month (the site's zone) summed over the meters in its units now, with each
    meter's total (the energy service's rules)."""
    cids = site_meters(engine, site_id)
    with engine.connect() as conn:
        site = _row(conn, S, site_id, "site")
        tz = _zone(site["timezone"])
        try:
            buckets = energy.buckets_for(
                period, energy.parse_period_key(first, period), energy.parse_period_key(last, period), tz
            )
        except (ValueError, OverflowError) as exc:
            raise PMError(422, str(exc)) from None
        sums, parts = (
            energy.group_energy(conn, cids, period, buckets) if cids else ([None] * len(buckets), [])
        )
    return {
        "site_id": site_id,
        "period": period,
        "timezone": site["timezone"],
        "buckets": [
            {"period": b.key, "start": b.start, "end": b.end, "consumption_kwh": v}
            for b, v in zip(buckets, sums, strict=True)
        ],
        "meters": [{"cid": p.cid, "total_kwh": p.total} for p in parts],
    }


def search_meters(engine: Engine, site_id: int, q: str | None) -> list[dict[str, Any]]:
    """The site's meters whose cid, name or location contains ``q`` (case-insensitive)."""
    out = [meter(engine, cid) for cid in site_meters(engine, site_id)]
    if q:
        needle = q.lower()
        out = [m for m in out if any(needle in (m[k] or "").lower() for k in ("cid", "name", "location"))]
    return out
