"""meterhub's gateway SDK: connect a meter gateway to meterhub (or any server of the edge protocol).

Example::

    from meterhub.sdk import Gateway

    async with Gateway("edge.example", 21883, "gw-0001", "<vendor username>") as gw:

        @gw.on_command
        async def command(cid, dp, value):  # value in real units
            print(cid, dp.code, value)
            return 0  # success

        await gw.sync("meter-1", "my-product-id")
        code = await gw.report("meter-1", "voltage_current", 230.1)  # -> raw 2301000 on the wire
        gw.report_nowait("meter-1", "phase_a", {"voltage": 230.1, "current": 5.2, "power": 1150})

It needs aiomqtt and msgspec only (not the server's dependencies). See ``meterhub.sdk.gateway`` for the
behaviour and the choices made, and docs/sdk.md.
"""

from meterhub.sdk.gateway import (
    STATUS_CHUNK,
    CommandHandler,
    Gateway,
    GatewayConnectError,
    GatewayStats,
    ReportDropped,
    gateway_password,
)
from meterhub.sdk.values import PHASE_ENCODINGS, InvalidValue, resolve, to_real, to_wire

__all__ = [
    "PHASE_ENCODINGS",
    "STATUS_CHUNK",
    "CommandHandler",
    "Gateway",
    "GatewayConnectError",
    "GatewayStats",
    "InvalidValue",
    "ReportDropped",
    "gateway_password",
    "resolve",
    "to_real",
    "to_wire",
]
