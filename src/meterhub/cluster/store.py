"""Cluster state in the database: nodes and their heartbeats, gateway ownership, the dead-node sweep.

Blocking functions (SQLAlchemy Core); the node calls them through ``asyncio.to_thread``. Times are
Unix seconds from each node's clock (nodes' clocks must agree to well within ``node_timeout``).

Ownership: ``gateways.owner_node`` is the node that last accepted the gateway's CONNECT and
``gateways.session_gen`` rises with every accepted CONNECT, so the newest session always has the
highest generation. A clean disconnect keeps ``owner_node`` (the last holder) and clears
``connected``; the dead-node sweep sets ``owner_node`` to NULL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from meterhub.core.device_cache import read_devices
from meterhub.storage import schema
from meterhub.storage.database import upsert

#: PostgreSQL advisory lock key of the dead-node sweep (``pg_try_advisory_xact_lock``).
SWEEP_LOCK = 0x6D68_0001
_CHUNK = 1000

g = schema.gateways
d = schema.devices
n = schema.nodes


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def try_lock(conn: Connection, key: int) -> bool:
    """Take a transaction-scoped advisory lock if free (PostgreSQL); other databases have one node."""
    if conn.dialect.name != "postgresql":
        return True
    return bool(conn.execute(select(func.pg_try_advisory_xact_lock(key))).scalar())


# --- nodes ---------------------------------------------------------------------------------------


def register_node(engine: Engine, row: dict[str, Any]) -> None:
    """Insert or refresh this node's row as alive (a restarted node keeps its id and row)."""
    row = {**row, "state": "alive", "stopped_at": None, "links": 0}
    cols = [c for c in row if c != "node_id"]
    with engine.begin() as conn:
        upsert(conn, n, ["node_id"], [row], cols)


def heartbeat(engine: Engine, node_id: str, now: float, values: dict[str, Any]) -> str | None:
    """Record a heartbeat (and ``values``: links, ports); returns the state the row had before
    (``lost``: another node swept us). A node that has ``stopped`` is left so: a beat still under way
    when the node stopped (its thread outlives the cancelled task) must not make it alive again, or
    the others would sweep it as dead (``node-lost``) a moment later."""
    with engine.begin() as conn:
        state = conn.execute(select(n.c.state).where(n.c.node_id == node_id)).scalar()
        conn.execute(
            update(n)
            .where(n.c.node_id == node_id, n.c.state != "stopped")
            .values(heartbeat_at=now, state="alive", **values)
        )
    return state


def stop_node(engine: Engine, node_id: str, now: float) -> None:
    with engine.begin() as conn:
        conn.execute(update(n).where(n.c.node_id == node_id).values(state="stopped", stopped_at=now))


def others_alive(conn: Connection, node_id: str, now: float, timeout: float) -> bool:
    """Whether another node has a fresh heartbeat."""
    row = conn.execute(
        select(n.c.node_id)
        .where(n.c.node_id != node_id, n.c.state == "alive", n.c.heartbeat_at >= now - timeout)
        .limit(1)
    ).first()
    return row is not None


@dataclass(slots=True)
class NodeInfo:
    node_id: str
    host: str | None
    version: str | None
    mqtt_port: int | None
    http_port: int | None
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    state: str
    links: int
    gateways: int


def list_nodes(engine: Engine) -> list[NodeInfo]:
    """Every node row, with the number of gateways it holds (connected, owned)."""
    with engine.connect() as conn:
        held = dict(
            conn.execute(
                select(g.c.owner_node, func.count())
                .where(g.c.connected.is_(True), g.c.owner_node.is_not(None))
                .group_by(g.c.owner_node)
            ).all()
        )
        rows = conn.execute(select(n).order_by(n.c.node_id)).all()
    return [
        NodeInfo(
            r.node_id,
            r.host,
            r.version,
            r.mqtt_port,
            r.http_port,
            r.started_at,
            r.heartbeat_at,
            r.stopped_at,
            r.state,
            r.links,
            int(held.get(r.node_id, 0)),
        )
        for r in rows
    ]


# --- gateway ownership ---------------------------------------------------------------------------


def claim_gateways(
    engine: Engine, gateway_ids: Sequence[str], node_id: str, now: float
) -> list[tuple[str | None, int]]:
    """:func:`claim_gateway` for each of ``gateway_ids`` in order, in one transaction (one commit for
    a whole storm of CONNECTs: meterhub.cluster.claims)."""
    out: list[tuple[str | None, int]] = []
    with engine.begin() as conn:
        for gateway_id in gateway_ids:
            out.append(_claim_in(conn, gateway_id, node_id, now))
    return out


def claim_gateway(engine: Engine, gateway_id: str, node_id: str, now: float) -> tuple[str | None, int]:
    """Make this node the gateway's owner with the next session generation.

    Returns ``(previous owner, new generation)``. The row is locked (PostgreSQL ``FOR UPDATE``;
    SQLite serialises writers), so two nodes claiming at once get different generations.
    """
    with engine.begin() as conn:
        return _claim_in(conn, gateway_id, node_id, now)


def _claim_in(conn: Connection, gateway_id: str, node_id: str, now: float) -> tuple[str | None, int]:
    row = conn.execute(
        select(g.c.owner_node, g.c.session_gen).where(g.c.gateway_id == gateway_id).with_for_update()
    ).first()
    if row is None:
        # The gateway's first connection: the writer's upsert may not have created the row yet.
        upsert(
            conn,
            g,
            ["gateway_id"],
            [{"gateway_id": gateway_id, "enabled": True, "allowed": False, "connected": True}],
            ["gateway_id"],
        )
        row = conn.execute(
            select(g.c.owner_node, g.c.session_gen).where(g.c.gateway_id == gateway_id).with_for_update()
        ).one()
    gen = int(row.session_gen or 0) + 1
    conn.execute(
        update(g)
        .where(g.c.gateway_id == gateway_id)
        .values(owner_node=node_id, session_gen=gen, connected=True, last_connected_at=now)
    )
    return row.owner_node, gen


def not_owned(engine: Engine, node_id: str, gateway_ids: Sequence[str]) -> list[str]:
    """The gateways among ``gateway_ids`` whose owner is no longer this node."""
    out: list[str] = []
    with engine.connect() as conn:
        for chunk in _chunks(list(gateway_ids)):
            out += conn.execute(
                select(g.c.gateway_id).where(
                    g.c.gateway_id.in_(chunk), or_(g.c.owner_node.is_(None), g.c.owner_node != node_id)
                )
            ).scalars()
    return out


@dataclass(slots=True)
class Route:
    """Where a device's gateway is held."""

    gateway_id: str
    owner_node: str | None
    connected: bool
    owner_alive: bool


def route_of(engine: Engine, cid: str, now: float, timeout: float) -> Route | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(g.c.gateway_id, g.c.owner_node, g.c.connected, n.c.state, n.c.heartbeat_at)
            .select_from(
                d.join(g, g.c.gateway_id == d.c.gateway_id).outerjoin(n, n.c.node_id == g.c.owner_node)
            )
            .where(d.c.cid == cid)
        ).first()
    if row is None:
        return None
    alive = row.state == "alive" and row.heartbeat_at is not None and row.heartbeat_at >= now - timeout
    return Route(row.gateway_id, row.owner_node, bool(row.connected), alive)


def load_devices(engine: Engine, gateway_id: str | None, cids: Sequence[str] = ()) -> list[Any]:
    """Device rows of a gateway and/or with the given cids (what a node caches about them), each once."""
    rows = read_devices(engine, [gateway_id] if gateway_id is not None else [], list(cids))
    return list({r.cid: r for r in rows}.values())


def release_drained(
    engine: Engine, node_id: str, gateway_ids: Sequence[str], now: float
) -> tuple[list[tuple[str, str]], list[str]]:
    """Gateways a draining node closed that no other node claimed since: their online devices go
    offline (cause ``node-drain``) and they are recorded disconnected, in one transaction with the
    rows locked (a claim arriving meanwhile waits and wins after). Returns (devices, gateways)."""
    devices: list[tuple[str, str]] = []
    gateways: list[str] = []
    with engine.begin() as conn:
        for chunk in _chunks(list(gateway_ids)):
            mine = conn.execute(
                select(g.c.gateway_id)
                .where(g.c.gateway_id.in_(chunk), g.c.owner_node == node_id, g.c.connected.is_(True))
                .with_for_update()
            ).scalars()
            ids = list(mine)
            if not ids:
                continue
            devices += _set_offline(conn, g.c.gateway_id.in_(ids), "node-drain", now)
            conn.execute(
                update(g)
                .where(g.c.gateway_id.in_(ids))
                .values(connected=False, last_disconnected_at=now, last_seen=now)
            )
            gateways += ids
    return devices, gateways


# --- start-up and the dead-node sweep ------------------------------------------------------------


def _set_offline(conn: Connection, gateway_filter: Any, cause: str, now: float) -> list[tuple[str, str]]:
    """Devices of the matching gateways that are online: set offline, presence recorded."""
    owned = select(g.c.gateway_id).where(gateway_filter)
    rows = conn.execute(
        select(d.c.cid, d.c.product_id).where(d.c.online.is_(True), d.c.gateway_id.in_(owned))
    ).all()
    found = [(r.cid, r.product_id) for r in rows]
    for chunk in _chunks([c for c, _ in found]):
        conn.execute(update(d).where(d.c.cid.in_(chunk)).values(online=False))
        conn.execute(
            insert(schema.presence), [{"cid": c, "online": False, "cause": cause, "at": now} for c in chunk]
        )
    return found


def reset_at_start(conn: Connection, now: float, node_id: str | None, timeout: float = 15.0) -> list[str]:
    """Devices left online by a previous run are set offline (cause ``server-restart``).

    ``node_id`` None (one node: the embedded default and any single node): every device and gateway.
    Otherwise only the gateways this node held, plus gateways nobody holds when no other node is
    alive (rows from before cluster mode); other nodes' gateways are left alone (a dead node's are
    the sweep's, cause ``node-lost``).
    """
    if node_id is None:
        cids = list(conn.execute(select(d.c.cid).where(d.c.online.is_(True))).scalars())
        if cids:
            conn.execute(update(d).where(d.c.online.is_(True)).values(online=False))
            conn.execute(
                schema.presence.insert(),
                [{"cid": c, "online": False, "cause": "server-restart", "at": now} for c in cids],
            )
        conn.execute(update(g).values(connected=False))
        return cids
    mine: Any = g.c.owner_node == node_id
    if not others_alive(conn, node_id, now, timeout):
        mine = or_(mine, g.c.owner_node.is_(None))
    found = _set_offline(conn, mine, "server-restart", now)
    conn.execute(update(g).where(mine).values(connected=False))
    return [c for c, _ in found]


@dataclass(slots=True)
class Swept:
    nodes: list[str]
    devices: list[tuple[str, str]]  # (cid, product_id) set offline
    gateways: list[str]


def sweep_dead(engine: Engine, node_id: str, now: float, timeout: float) -> Swept | None:
    """Under the sweep's advisory lock (one node at a time): every node silent for ``timeout`` is
    marked lost, its devices offline (cause ``node-lost``) and its gateways freed. None when another
    node holds the lock."""
    swept = Swept([], [], [])
    with engine.begin() as conn:
        if not try_lock(conn, SWEEP_LOCK):
            return None
        dead = list(
            conn.execute(
                select(n.c.node_id).where(
                    n.c.node_id != node_id, n.c.state == "alive", n.c.heartbeat_at < now - timeout
                )
            ).scalars()
        )
        for dead_id in dead:
            held = g.c.owner_node == dead_id
            swept.devices += _set_offline(conn, held, "node-lost", now)
            swept.gateways += conn.execute(
                select(g.c.gateway_id).where(held, g.c.connected.is_(True))
            ).scalars()
            conn.execute(update(g).where(held, g.c.connected.is_(True)).values(last_disconnected_at=now))
            conn.execute(update(g).where(held).values(owner_node=None, connected=False))
            conn.execute(update(n).where(n.c.node_id == dead_id).values(state="lost", stopped_at=now))
        swept.nodes = dead
    return swept
