"""amqtt 0.12.1 broker with an in-process echo plugin (the amqtt side of the transport benchmark).

Run it with the interpreter of its own virtualenv (amqtt's dependencies may conflict with meterhub's)::

    bench/setup-amqtt.sh                                   # once: creates bench/.venv-amqtt
    bench/.venv-amqtt/bin/python bench/amqtt_echo.py --port 18830

How the echo works: amqtt fires ``on_broker_message_received(client_id, message)`` on every plugin for
each message a client publishes (``amqtt.plugins.manager.PluginManager.fire_event``; the method name is
``on_`` + ``BrokerEvents.MESSAGE_RECEIVED``). The plugin re-broadcasts it on ``<topic>/echo`` at QoS 1
through ``BrokerContext.broadcast_message``; only the requesting client subscribes to that topic.
Messages the broker broadcasts itself do not fire the event again, so there is no loop.

Configuration: only the anonymous-auth plugin and this one (the default event/packet logger and
``$SYS`` plugins are left out, to give amqtt its best case); logging at WARNING; uvloop, as meterhub.
Listens on 127.0.0.1 only; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BasePlugin


class EchoPlugin(BasePlugin):  # type: ignore[type-arg]
    """Publish every client message back on ``<topic>/echo`` (QoS 1)."""

    async def on_broker_message_received(self, *, client_id: str, message: Any) -> None:
        if message is None:
            return
        topic = message.topic
        if topic.endswith("/echo"):
            return
        await self.context.broadcast_message(topic + "/echo", bytes(message.data), qos=1)


async def main(port: int) -> None:
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 0}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            "amqtt_echo.EchoPlugin": {},
        },
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so "amqtt_echo.EchoPlugin" imports
    try:
        import uvloop

        uvloop.run(main(args.port))
    except ImportError:
        asyncio.run(main(args.port))
