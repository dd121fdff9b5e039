"""The API's database reads: plain synchronous functions, run in worker threads by the routers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, and_, case, func, or_, select

from meterhub.storage import rollups, schema

d = schema.devices
g = schema.gateways
v = schema.vendors


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# --- gateways ------------------------------------------------------------------------------------


def gateways(engine: Engine, gateway_id: str | None = None) -> list[dict[str, Any]]:
    """Gateways with their vendor name and device counts (all of them: there are few)."""
    counts = (
        select(
            d.c.gateway_id,
            func.count().label("device_count"),
            func.sum(case((d.c.online.is_(True), 1), else_=0)).label("devices_online"),
        )
        .group_by(d.c.gateway_id)
        .subquery()
    )
    q = (
        select(
            g,
            v.c.name.label("vendor"),
            func.coalesce(counts.c.device_count, 0).label("device_count"),
            func.coalesce(counts.c.devices_online, 0).label("devices_online"),
        )
        .select_from(
            g.outerjoin(v, v.c.id == g.c.vendor_id).outerjoin(counts, counts.c.gateway_id == g.c.gateway_id)
        )
        .order_by(g.c.gateway_id)
    )
    if gateway_id is not None:
        q = q.where(g.c.gateway_id == gateway_id)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q).all()]


# --- devices -------------------------------------------------------------------------------------

_SUMMARY_COLS = (
    d.c.cid,
    d.c.device_name,
    d.c.gateway_id,
    d.c.product_id,
    d.c.model,
    d.c.online,
    d.c.last_seen,
    d.c.install_location,
)


def devices(
    engine: Engine,
    *,
    gateway: str | None = None,
    product: str | None = None,
    online: bool | None = None,
    q: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    conds = []
    if gateway is not None:
        conds.append(d.c.gateway_id == gateway)
    if product is not None:
        conds.append(d.c.product_id == product)
    if online is not None:
        conds.append(d.c.online.is_(online))
    if q:
        pattern = _like(q)
        conds.append(
            or_(
                d.c.cid.ilike(pattern, escape="\\"),
                d.c.device_name.ilike(pattern, escape="\\"),
                d.c.install_location.ilike(pattern, escape="\\"),
            )
        )
    where = and_(*conds) if conds else None
    base = select(*_SUMMARY_COLS)
    count = select(func.count()).select_from(d)
    if where is not None:
        base = base.where(where)
        count = count.where(where)
    with engine.connect() as conn:
        total = conn.execute(count).scalar_one()
        rows = conn.execute(base.order_by(d.c.cid).limit(limit).offset(offset)).all()
    return [dict(r._mapping) for r in rows], total


def device(engine: Engine, cid: str) -> dict[str, Any] | None:
    """The device row, its latest values, and its last presence change."""
    with engine.connect() as conn:
        row = conn.execute(select(d).where(d.c.cid == cid)).first()
        if row is None:
            return None
        lv = schema.latest
        values = conn.execute(select(lv).where(lv.c.cid == cid)).all()
        p = schema.presence
        last = conn.execute(
            select(p.c.online, p.c.cause, p.c.at)
            .where(p.c.cid == cid)
            .order_by(p.c.at.desc(), p.c.id.desc())
            .limit(1)
        ).first()
    out = dict(row._mapping)
    out["values"] = [dict(r._mapping) for r in values]
    out["last_presence"] = dict(last._mapping) if last else None
    return out


def device_exists(engine: Engine, cid: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(d.c.cid).where(d.c.cid == cid)).first() is not None


def presence(
    engine: Engine, cid: str, start: float, end: float, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    p = schema.presence
    where = and_(p.c.cid == cid, p.c.at >= start, p.c.at <= end)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(p).where(where)).scalar_one()
        rows = conn.execute(
            select(p.c.online, p.c.cause, p.c.at)
            .where(where)
            .order_by(p.c.at.desc(), p.c.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    return [dict(r._mapping) for r in rows], total


def history_rows(
    engine: Engine, cid: str, dp_id: str, start: float, end: float, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    r = schema.reports
    where = and_(r.c.cid == cid, r.c.dp_id == dp_id, r.c.t >= start, r.c.t <= end)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(r).where(where)).scalar_one()
        rows = conn.execute(
            select(r.c.t, r.c.value, r.c.num, r.c.received_at)
            .where(where)
            .order_by(r.c.t, r.c.id)
            .limit(limit)
            .offset(offset)
        ).all()
    return [dict(x._mapping) for x in rows], total


def history_points(
    engine: Engine, cid: str, dp_id: str, start: float, end: float, with_value: bool
) -> list[tuple[float, Any]]:
    """``(t, num)`` (or ``(t, value)`` for phase fields) of every report in ``[start, end]``, by t."""
    r = schema.reports
    col = r.c.value if with_value else r.c.num
    with engine.connect() as conn:
        rows = conn.execute(
            select(r.c.t, col)
            .where(r.c.cid == cid, r.c.dp_id == dp_id, r.c.t >= start, r.c.t <= end)
            .order_by(r.c.t, r.c.id)
        ).all()
    return [(t, x) for t, x in rows]


def history_rollup_buckets(
    engine: Engine,
    cid: str,
    dp_id: str,
    start: float,
    end: float,
    width: float,
    count: int,
    res: int,
    zone: Any,
) -> list[rollups.Agg] | None:
    """Chart buckets from rollups of resolution ``res`` plus raw rows (PostgreSQL); None elsewhere."""
    with engine.connect() as conn:
        if not rollups.uses_rollups(conn):
            return None
        return rollups.history_buckets(conn, cid, dp_id, start, end, width, count, res, zone)


# --- commands ------------------------------------------------------------------------------------


def commands(engine: Engine, cid: str, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    c = schema.commands
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(c).where(c.c.cid == cid)).scalar_one()
        rows = conn.execute(
            select(c)
            .where(c.c.cid == cid)
            .order_by(c.c.created_at.desc(), c.c.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    return [dict(r._mapping) for r in rows], total


def command(engine: Engine, request_id: str) -> dict[str, Any] | None:
    c = schema.commands
    with engine.connect() as conn:
        row = conn.execute(select(c).where(c.c.request_id == request_id)).first()
    return dict(row._mapping) if row else None


# --- products ------------------------------------------------------------------------------------


def products(engine: Engine) -> list[dict[str, Any]]:
    p = schema.products
    counts = select(d.c.product_id, func.count().label("devices")).group_by(d.c.product_id).subquery()
    with engine.connect() as conn:
        rows = conn.execute(
            select(p, func.coalesce(counts.c.devices, 0).label("devices"))
            .select_from(p.outerjoin(counts, counts.c.product_id == p.c.product_id))
            .order_by(p.c.product_id)
        ).all()
    return [dict(r._mapping) for r in rows]


def gateway_devices(engine: Engine, gateway_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(d.c.cid).where(d.c.gateway_id == gateway_id)).scalars())


# --- alarms --------------------------------------------------------------------------------------


def alarms(
    engine: Engine,
    *,
    cid: str | None,
    level: str | None,
    kind: str | None,
    active: bool | None,
    limit: int,
    offset: int,
) -> tuple[list[dict[str, Any]], int]:
    a = schema.alarms
    conds = []
    if cid is not None:
        conds.append(a.c.cid == cid)
    if level is not None:
        conds.append(a.c.level == level)
    if kind is not None:
        conds.append(a.c.kind == kind)
    if active is not None:
        conds.append(a.c.cleared_at.is_(None) if active else a.c.cleared_at.is_not(None))
    where = and_(*conds) if conds else None
    count = select(func.count()).select_from(a)
    q = select(a)
    if where is not None:
        count = count.where(where)
        q = q.where(where)
    with engine.connect() as conn:
        total = conn.execute(count).scalar_one()
        rows = conn.execute(q.order_by(a.c.raised_at.desc(), a.c.id.desc()).limit(limit).offset(offset)).all()
    return [dict(r._mapping) for r in rows], total


def alarm(engine: Engine, alarm_id: int) -> dict[str, Any] | None:
    a = schema.alarms
    with engine.connect() as conn:
        row = conn.execute(select(a).where(a.c.id == alarm_id)).first()
    return dict(row._mapping) if row else None


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(select(1)).scalar_one()
