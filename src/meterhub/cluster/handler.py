"""The application handler as the MQTT server sees it in a cluster: the protocol service plus ownership.

:class:`ClusterHandler` wraps the :class:`~meterhub.core.service.ProtocolService` (it implements the
same :class:`~meterhub.transport.ApplicationHandler`):

- an accepted gateway CONNECT makes this node claim the gateway (session generation + 1) and tell
  the other nodes (takeover); until the claim is stored, the gateway's messages wait here in order
  (so a device synced through another node is known before its first report is checked);
- a disconnect of a gateway this node no longer holds (taken over by another node, or freed by the
  dead-node sweep) is not recorded: the new holder owns its devices' presence now.
"""

from __future__ import annotations

import asyncio
from typing import Any

from meterhub.logs import get_logger
from meterhub.transport import ApplicationHandler, Principal

log = get_logger(__name__)

#: Most messages of one gateway waiting for its claim; past that they go through unwaited.
MAX_WAITING = 10_000


class ClusterHandler:
    def __init__(self, inner: ApplicationHandler, node: Any) -> None:
        self.inner = inner
        self.node = node

    def client_connected(self, principal: Principal, peer: str) -> None:
        self.inner.client_connected(principal, peer)
        if principal.kind == "gateway":
            self.node.gateway_connected(principal.client_id)

    def client_disconnected(self, principal: Principal, reason: str) -> None:
        if principal.kind == "gateway" and not self.node.gateway_disconnected(principal.client_id, reason):
            if reason != "node-drain":  # (a drain's gateways are the node's finish_drain)
                log.info(
                    "disconnect of a gateway held elsewhere not recorded", gateway_id=principal.client_id
                )
            return
        self.inner.client_disconnected(principal, reason)

    def message(self, principal: Principal, topic: str, payload: bytes) -> Any:
        waiting = self.node.waiting.get(principal.client_id)
        if waiting is None or len(waiting) >= MAX_WAITING:
            return self.inner.message(principal, topic, payload)
        outer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting.append((principal, topic, payload, outer))
        return outer

    def release(self, waiting: list[tuple[Principal, str, bytes, asyncio.Future[Any]]]) -> None:
        """Hand the messages that waited for a claim to the service, in arrival order."""
        for principal, topic, payload, outer in waiting:
            try:
                result = self.inner.message(principal, topic, payload)
            except Exception as exc:
                outer.set_exception(exc)
                continue
            if result is None:
                outer.set_result(None)
            else:
                asyncio.ensure_future(result).add_done_callback(_copy_to(outer))


def _copy_to(outer: asyncio.Future[Any]) -> Any:
    def done(fut: asyncio.Future[Any]) -> None:
        if outer.done():
            return
        if fut.cancelled():
            outer.cancel()
        elif fut.exception() is not None:
            outer.set_exception(fut.exception())  # type: ignore[arg-type]
        else:
            outer.set_result(fut.result())

    return done
