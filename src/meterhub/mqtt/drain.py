"""Draining the MQTT server before a shutdown (SIGTERM, a rolling restart).

1. stop accepting: the listeners close (a balancer's health check fails, new connections go to
   other nodes) and a CONNECT still arriving is refused (0x03, ``shutting down``);
2. stop reading: every connection is paused (:data:`PAUSE_DRAIN`), so nothing new comes in; what
   a client sent and meterhub has not read stays unacknowledged, and the client sends it again
   after reconnecting (QoS 1);
3. finish what was read: wait (at most ``timeout`` s) until every connection's messages read so
   far are handled and acknowledged (PUBACK after the durable commit, reports answered) and its
   bytes are written to the socket;
4. close every connection (reason ``node-drain``, no will), so gateways reconnect elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from meterhub.logs import get_logger

log = get_logger(__name__)

#: A read pause of the server's own (see meterhub.mqtt.session's PAUSE_* bits): draining.
PAUSE_DRAIN = 1 << 8
DRAIN_REASON = "node-drain"


def busy(conn: Any) -> bool:
    """Whether a connection still has read work unanswered or bytes unsent."""
    if conn.state == "connecting":  # its CONNECT is being authenticated: wait for the CONNACK
        return True
    if conn.state != "connected":
        return False
    transport = conn.transport
    if conn.out or (transport is not None and transport.get_write_buffer_size()):
        return True
    session = conn.session
    if session is None or session.connection is not conn:
        return False
    return bool(session.acks or session.held or session.out)


async def drain(server: Any, timeout: float) -> dict[str, int]:
    """Drain ``server`` (a :class:`~meterhub.mqtt.server.MQTTServer`); returns counts for the log."""
    server.accepting = False
    for srv in server._servers:
        srv.close()
    for conn in list(server.connections):
        conn._pause_reading(PAUSE_DRAIN)
    started = time.monotonic()
    deadline = started + timeout
    while any(busy(c) for c in server.connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    unfinished = sum(1 for c in server.connections if busy(c))
    server.stats["drain.unfinished"] += unfinished
    closing = list(server.connections)
    for conn in closing:
        conn.will = None
        conn.close(DRAIN_REASON)
    server.stats["drain.closed"] += len(closing)
    end = time.monotonic() + 2.0  # the closes complete (connection_lost) before the node leaves
    while server.connections and time.monotonic() < end:
        await asyncio.sleep(0.02)
    for conn in list(server.connections):
        conn.abort(DRAIN_REASON)
    result = {
        "closed": len(closing),
        "unfinished": unfinished,
        "ms": int((time.monotonic() - started) * 1000),
    }
    log.info("mqtt drained", **result)
    return result
