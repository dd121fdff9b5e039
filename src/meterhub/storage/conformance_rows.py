"""The stored conformance record of a gateway (table ``conformance_records``): its JSON form, how a
node's delta is merged into it, and the group-commit writer's op that does so.

Each node keeps in memory only what it observed since its last flush (a *delta*: counters since
then, the newest timestamps, the latest keep-alive and subscriptions) and adds it to the stored
record: counters add up, timestamp lists are merged and cut to their bound, scalars take the newest
value. So what two nodes saw of one gateway (before and after a move) is summed, never overwritten,
and the record of a gateway stays bounded whatever it does (:data:`BOUNDS`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from meterhub.storage import schema

_encode = msgspec.json.encode
_decode = msgspec.json.decode

#: Counters (added up).
COUNTERS = ("request_id_reused", "status_rejected", "unknown_topic", "acl_rejected", "keepalive_expired")
#: Lists and how many of their newest items are kept.
BOUNDS = {"status_times": 64, "command_latencies": 256, "connects": 64, "subscriptions": 64}
#: Error codes kept per kind (answers are protocol codes: a handful; a bound all the same).
MAX_CODES = 64


def empty() -> dict[str, Any]:
    """A record with nothing observed."""
    return {
        "codes": {"sync": {}, "report": {}},
        **dict.fromkeys(COUNTERS, 0),
        "commands": {},
        "qos": [0, 0, 0],
        "status_times": [],
        "command_latencies": [],
        "connects": [],
        "keepalive": None,
        "clean_session": None,
        "subscriptions": None,  # the filters at the last flush by the node holding the gateway
        "gateway_seen": False,  # the protocol service saw it (a GatewayRecord)
        "client_seen": False,  # the MQTT server saw it (a ClientRecord)
        "updated_at": None,
    }


def _add(into: dict[str, int], more: dict[str, int], limit: int = MAX_CODES) -> None:
    for key, n in more.items():
        if key in into or len(into) < limit:
            into[key] = into.get(key, 0) + int(n)


def merge(stored: dict[str, Any] | None, delta: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with ``delta`` added (a new dict; neither argument is changed)."""
    out = empty()
    for rec in (stored or {}, delta):
        codes = rec.get("codes") or {}
        for kind in ("sync", "report"):
            _add(out["codes"][kind], codes.get(kind) or {})
        for name in COUNTERS:
            out[name] += int(rec.get(name) or 0)
        _add(out["commands"], rec.get("commands") or {})
        qos = rec.get("qos") or (0, 0, 0)
        out["qos"] = [a + int(b) for a, b in zip(out["qos"], qos, strict=False)]
        for flag in ("gateway_seen", "client_seen"):
            out[flag] = out[flag] or bool(rec.get(flag))
        for name in ("keepalive", "clean_session", "updated_at"):
            if rec.get(name) is not None:
                out[name] = rec[name]
        if rec.get("subscriptions") is not None:
            out["subscriptions"] = list(rec["subscriptions"])[: BOUNDS["subscriptions"]]
    for name in ("status_times", "connects"):  # timestamps (connects: [time, code]): in time order
        both = [*((stored or {}).get(name) or ()), *(delta.get(name) or ())]
        both.sort(key=lambda x: x[0] if isinstance(x, list | tuple) else x)
        out[name] = both[-BOUNDS[name] :]
    lat = [*((stored or {}).get("command_latencies") or ()), *(delta.get("command_latencies") or ())]
    out["command_latencies"] = lat[-BOUNDS["command_latencies"] :]
    return out


def decode(text: str | None) -> dict[str, Any] | None:
    return None if text is None else _decode(text)


def apply_deltas(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Writer op ``conformance`` (``{"gateway_id", "delta"}``): add each delta to the stored record,
    in one transaction with row locks (PostgreSQL), so deltas of two nodes for one gateway both
    count. Only registered gateways get a record (a refused CONNECT can carry any client id)."""
    deltas: dict[str, dict[str, Any]] = {}
    for row in rows:
        gw = row["gateway_id"]
        deltas[gw] = merge(deltas[gw], row["delta"]) if gw in deltas else row["delta"]
    g, t = schema.gateways, schema.conformance_records
    ids = sorted(deltas)
    known = set(conn.execute(select(g.c.gateway_id).where(g.c.gateway_id.in_(ids))).scalars())
    ids = [gw for gw in ids if gw in known]
    if not ids:
        return
    postgres = conn.dialect.name == "postgresql"
    new = (pg_insert if postgres else sqlite_insert)(t).on_conflict_do_nothing(index_elements=["gateway_id"])
    conn.execute(new, [{"gateway_id": gw, "record": None} for gw in ids])
    query = select(t.c.gateway_id, t.c.record).where(t.c.gateway_id.in_(ids)).order_by(t.c.gateway_id)
    if postgres:
        query = query.with_for_update()
    stored = {row.gateway_id: decode(row.record) for row in conn.execute(query)}
    conn.execute(
        update(t).where(t.c.gateway_id == bindparam("b_gw")).values(record=bindparam("b_record")),
        [{"b_gw": gw, "b_record": _encode(merge(stored.get(gw), deltas[gw])).decode()} for gw in ids],
    )


def read(conn: Connection, gateway_id: str) -> tuple[dict[str, Any] | None, Any]:
    """The stored record of ``gateway_id`` (or None) and its gateways row (or None)."""
    t, g = schema.conformance_records, schema.gateways
    text = conn.execute(select(t.c.record).where(t.c.gateway_id == gateway_id)).scalar_one_or_none()
    gw = conn.execute(
        select(g.c.connected, g.c.client_address, g.c.owner_node).where(g.c.gateway_id == gateway_id)
    ).first()
    return decode(text), gw
