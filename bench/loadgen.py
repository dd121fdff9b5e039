"""The MQTT load generator shared by every benchmark: several processes, each an asyncio client pool.

Each worker process runs uvloop and drives its share of the connections with a lean
``asyncio.Protocol`` client built on ``meterhub.mqtt.codec`` (no paho, no streams): every
``data_received`` call decodes what arrived, and all replies it causes (PUBACKs, next requests) go out
in one ``transport.write``. Timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in
every process), so a request can carry its send time in its payload and latency is measured without a
lookup table.

Timeline of one run (all workers share the absolute times the parent sets):
``go`` -> start sending at ``t_start`` -> warm-up -> measurement window ``[t0, t1)`` -> stop sending
-> drain. Only round trips *completed* inside the window are counted, and the parent reads the server's
CPU time at ``t0`` and ``t1``, so CPU-per-round-trip covers the same interval.

Drivers (what a connection does):

* ``EchoClosedLoop`` - each connection keeps ``window`` requests outstanding (a request is done when
  its echo arrives); "flat out".
* ``EchoRate``       - open loop at a fixed total rate: requests go out on schedule whether or not
  earlier ones were answered (the sender never waits for the server, so a stalled server cannot hide
  its stall); each request is stamped when it is written, which is at most ~1 ms (the event loop's
  timer resolution) after its scheduled time.
* ``EchoFlood``      - overload: each connection keeps ``window`` publishes un-PUBACKed, whatever
  happens to the echoes; shows whether a server keeps acknowledging publishers while it cannot
  deliver, and what its memory does meanwhile.
* ``EchoStall``      - stalled consumers: each connection stops reading its socket, publishes
  ``burst`` requests, and resumes reading later; counts what was delivered.
* ``Idle``           - connect + subscribe, then nothing (memory per idle connection).

Run standalone against a server that is already running (loopback only), e.g.::

    .venv/bin/python bench/loadgen.py --port 1883 --connections 100 --processes 2 --mode flat
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import struct
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meterhub.core.auth import gateway_password
from meterhub.mqtt import codec

HOST = "127.0.0.1"
_PUBACK = b"\x40\x02"
_PACK_D = struct.Struct("<d")
_pack_d = _PACK_D.pack
_unpack_d = _PACK_D.unpack_from
Publish = codec.Publish
PubAck = codec.PubAck


# --------------------------------------------------------------------------------------- the client


class Conn(asyncio.Protocol):
    """One MQTT 3.1.1 client connection; the driver decides what to send and what to do on receipt."""

    def __init__(self, cid: str, username: str | None, password: bytes | None, driver: Driver) -> None:
        loop = asyncio.get_running_loop()
        self.cid = cid
        self.username = username
        self.password = password
        self.driver = driver
        self.decoder = codec.Decoder(server_side=False, max_packet_size=1 << 24)
        self.connack: asyncio.Future[int] = loop.create_future()
        self.suback: asyncio.Future[list[int]] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.pid = 0
        self.lost = False
        self.error: str | None = None
        # per-connection driver state
        self.topic = f"gateway_id/{cid}/req"
        self.outstanding = 0
        self.sent = 0
        self.extra: Any = None

    def next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(  # type: ignore[attr-defined]
            codec.encode(codec.Connect(self.cid, True, 0, self.username, self.password))
        )

    def subscribe(self, topics: list[str]) -> None:
        assert self.transport is not None
        self.transport.write(codec.encode(codec.Subscribe(self.next_pid(), [(t, 1) for t in topics])))

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except codec.MQTTProtocolError as exc:
            self.error = f"protocol error from server: {exc}"
            assert self.transport is not None
            self.transport.abort()
            return
        now = time.monotonic()
        out: list[bytes] = []
        driver = self.driver
        for p in packets:
            tp = type(p)
            if tp is Publish:
                if p.qos:
                    out.append(_PUBACK + p.packet_id.to_bytes(2, "big"))  # type: ignore[union-attr]
                driver.on_message(self, p.topic, p.payload, now, out)  # type: ignore[union-attr]
            elif tp is PubAck:
                driver.on_puback(self, now, out)
            elif tp is codec.ConnAck:
                if not self.connack.done():
                    self.connack.set_result(p.return_code)  # type: ignore[union-attr]
            elif tp is codec.SubAck and not self.suback.done():
                self.suback.set_result(p.return_codes)  # type: ignore[union-attr]
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for fut in (self.connack, self.suback):
            if not fut.done():
                fut.set_exception(ConnectionError(self.error or f"connection lost: {exc}"))
                fut.exception()  # marks it retrieved: the connect code may not be awaiting this one


# --------------------------------------------------------------------------------------- drivers


class Driver:
    """What the connections of one worker do. Subclasses override the hooks they need."""

    def __init__(self, worker: int, params: dict[str, Any]) -> None:
        self.worker = worker
        self.params = params
        self.t0 = float("inf")
        self.t1 = float("inf")

    def subscriptions(self, conn: Conn) -> list[str]:
        return [conn.topic + "/echo"]

    async def prepare(self, conns: list[Conn]) -> dict[str, Any]:
        """After every connection is up, before the measurement (e.g. register devices)."""
        return {}

    def on_message(self, conn: Conn, topic: str, payload: bytes, now: float, out: list[bytes]) -> None:
        pass

    def on_puback(self, conn: Conn, now: float, out: list[bytes]) -> None:
        pass

    async def run(self, conns: list[Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        return {}


async def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def sleep_next(t_first: float, rate: float, k: int) -> None:
    """Sleep until request ``k`` is due (at least 1 ms: the event loop's timer resolution; no spinning)."""
    await asyncio.sleep(max(0.001, t_first + k / rate - time.monotonic()))


async def measure_cpu(t0: float, t1: float) -> float:
    """This process's CPU seconds between the absolute times ``t0`` and ``t1``."""
    await sleep_until(t0)
    c0 = time.process_time()
    await sleep_until(t1)
    return time.process_time() - c0


async def drain(conns: list[Conn], timeout: float) -> bool:
    """Wait until no connection has anything outstanding; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.outstanding <= 0 or c.lost for c in conns):
            return True
        await asyncio.sleep(0.02)
    return False


class EchoBase(Driver):
    """Requests carry their send time in the first 8 bytes; the echo gives the round-trip time."""

    def __init__(self, worker: int, params: dict[str, Any]) -> None:
        super().__init__(worker, params)
        self.pad = b"\x00" * max(0, int(params.get("payload", 64)) - 8)
        self.latencies = array("d")
        self.done = 0  # round trips completed inside the window
        self.echoes = 0  # all echoes
        self.acks = 0  # all PUBACKs for our requests
        self.sent = 0
        self.sending = True

    def request(self, conn: Conn, t: float) -> bytes:
        conn.outstanding += 1
        self.sent += 1
        return codec.encode_publish(conn.topic, _pack_d(t) + self.pad, 1, conn.next_pid())

    def echo_received(self, conn: Conn, payload: bytes, now: float) -> None:
        conn.outstanding -= 1
        self.echoes += 1
        if self.t0 <= now < self.t1:
            self.done += 1
            self.latencies.append(now - _unpack_d(payload)[0])

    def on_puback(self, conn: Conn, now: float, out: list[bytes]) -> None:
        self.acks += 1

    def result(self, conns: list[Conn], cpu: float, drained: bool) -> dict[str, Any]:
        return {
            "done": self.done,
            "latencies": self.latencies,
            "sent": self.sent,
            "acks": self.acks,
            "echoes": self.echoes,
            "cpu": cpu,
            "drained": drained,
            "outstanding": sum(max(0, c.outstanding) for c in conns),
        }


class EchoClosedLoop(EchoBase):
    """Each connection keeps ``window`` requests outstanding until the window ends."""

    def on_message(self, conn: Conn, topic: str, payload: bytes, now: float, out: list[bytes]) -> None:
        self.echo_received(conn, payload, now)
        if now < self.t1:
            out.append(self.request(conn, now))

    async def run(self, conns: list[Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        self.t0, self.t1 = t0, t1
        window = int(self.params.get("window", 1))
        await sleep_until(t_start)
        for conn in conns:
            now = time.monotonic()
            assert conn.transport is not None
            conn.transport.write(b"".join(self.request(conn, now) for _ in range(window)))
        cpu = await measure_cpu(t0, t1)
        drained = await drain(conns, 10)
        return self.result(conns, cpu, drained)


class EchoRate(EchoBase):
    """Open loop: ``rate`` requests/s in total (this worker sends ``rate / processes``)."""

    def on_message(self, conn: Conn, topic: str, payload: bytes, now: float, out: list[bytes]) -> None:
        self.echo_received(conn, payload, now)

    async def run(self, conns: list[Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        self.t0, self.t1 = t0, t1
        rate = float(self.params["rate"]) / int(self.params["processes"])
        # Interleave the workers: worker w sends at t_start + (k + w / P) / rate.
        offset = self.worker / int(self.params["processes"]) / rate
        n = len(conns)
        k = 0
        cpu_task = asyncio.ensure_future(measure_cpu(t0, t1))
        await sleep_until(t_start)
        while True:
            now = time.monotonic()
            if now >= t1:
                break
            due = int((now - t_start - offset) * rate) + 1
            batch: dict[Conn, list[bytes]] = {}
            while k < due:
                conn = conns[k % n]
                batch.setdefault(conn, []).append(self.request(conn, now))
                k += 1
            for conn, parts in batch.items():
                assert conn.transport is not None
                conn.transport.write(b"".join(parts))
            await sleep_next(t_start + offset, rate, k)
        cpu = await cpu_task
        drained = await drain(conns, 10)
        return self.result(conns, cpu, drained)


class EchoFlood(EchoBase):
    """Overload: ``window`` un-PUBACKed publishes per connection, refilled on every PUBACK."""

    def __init__(self, worker: int, params: dict[str, Any]) -> None:
        super().__init__(worker, params)
        self.acks_in_window = 0

    def on_message(self, conn: Conn, topic: str, payload: bytes, now: float, out: list[bytes]) -> None:
        self.echo_received(conn, payload, now)

    def on_puback(self, conn: Conn, now: float, out: list[bytes]) -> None:
        self.acks += 1
        if self.t0 <= now < self.t1:
            self.acks_in_window += 1
        if now < self.t1:
            out.append(self.request(conn, now))

    async def run(self, conns: list[Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        self.t0, self.t1 = t0, t1
        window = int(self.params.get("window", 200))
        await sleep_until(t_start)
        for conn in conns:
            now = time.monotonic()
            assert conn.transport is not None
            conn.transport.write(b"".join(self.request(conn, now) for _ in range(window)))
        cpu = await measure_cpu(t0, t1)
        drained = await drain(conns, float(self.params.get("drain", 15)))
        res = self.result(conns, cpu, drained)
        res["acks_in_window"] = self.acks_in_window
        return res


class EchoStall(EchoBase):
    """Stalled consumers: stop reading, publish ``burst`` requests, resume reading at ``t1``."""

    def on_message(self, conn: Conn, topic: str, payload: bytes, now: float, out: list[bytes]) -> None:
        conn.outstanding -= 1
        self.echoes += 1
        self.latencies.append(now - _unpack_d(payload)[0])

    async def run(self, conns: list[Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        burst = int(self.params.get("burst", 2000))
        await sleep_until(t_start)
        for conn in conns:
            assert conn.transport is not None
            conn.transport.pause_reading()
        for conn in conns:
            now = time.monotonic()
            assert conn.transport is not None
            conn.transport.write(b"".join(self.request(conn, now) for _ in range(burst)))
        await sleep_until(t1)
        for conn in conns:
            assert conn.transport is not None
            if not conn.lost:
                conn.transport.resume_reading()
        # Echoes may have been dropped by the server: wait until nothing more arrives for 2 s.
        last, last_change = -1, time.monotonic()
        deadline = time.monotonic() + float(self.params.get("drain", 30))
        while time.monotonic() < deadline:
            if self.echoes != last:
                last, last_change = self.echoes, time.monotonic()
            elif time.monotonic() - last_change > 2 or all(c.outstanding <= 0 for c in conns):
                break
            await asyncio.sleep(0.05)
        res = self.result(conns, 0.0, all(c.outstanding <= 0 for c in conns))
        res["lost_connections_during_stall"] = sum(c.lost for c in conns)
        return res


class Idle(Driver):
    async def run(self, conns: list[Conn], t_start: float, t0: float, t1: float) -> dict[str, Any]:
        return {}


DRIVERS: dict[str, type[Driver]] = {
    "flat": EchoClosedLoop,
    "rate": EchoRate,
    "flood": EchoFlood,
    "stall": EchoStall,
    "idle": Idle,
}


# --------------------------------------------------------------------------------------- the fleet


@dataclass
class FleetSpec:
    port: int
    connections: int
    processes: int
    driver: Callable[[int, dict[str, Any]], Driver]
    params: dict[str, Any] = field(default_factory=dict)
    username: str | None = None
    md5_password: bool = False  # meterhub's gateway rule: md5 hex(clientId + username)
    prefix: str = "bench"
    warmup: float = 2.0
    duration: float = 10.0
    connect_concurrency: int = 64
    connect_timeout: float = 60.0


def _wait_event(ev: Any) -> Any:
    async def waiter() -> None:
        while not ev.is_set():
            await asyncio.sleep(0.02)

    return waiter()


async def _worker_main(index: int, spec: FleetSpec, cids: list[str], q: Any, ctl: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    params = dict(spec.params, processes=spec.processes)
    driver = spec.driver(index, params)
    conns: list[Conn] = []
    failures: list[str] = []
    sem = asyncio.Semaphore(spec.connect_concurrency)

    async def connect(cid: str) -> None:
        password = None
        if spec.username is not None:
            password = gateway_password(cid, spec.username).encode() if spec.md5_password else b"x"
        async with sem:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Conn(cid, spec.username, password, driver), HOST, spec.port
                    ),
                    spec.connect_timeout,
                )
                code = await asyncio.wait_for(conn.connack, spec.connect_timeout)
                if code != 0:
                    raise ConnectionError(f"CONNACK {code}")
                topics = driver.subscriptions(conn)
                if topics:
                    conn.subscribe(topics)
                    codes = await asyncio.wait_for(conn.suback, spec.connect_timeout)
                    if 0x80 in codes:
                        raise ConnectionError(f"SUBACK refused {codes}")
                conns.append(conn)
            except Exception as exc:
                failures.append(f"{cid}: {exc!r}")

    await asyncio.gather(*(connect(c) for c in cids))
    conns.sort(key=lambda c: c.cid)
    try:
        prep = await driver.prepare(conns) if conns else {}
    except Exception as exc:
        prep = {"error": repr(exc)}
    q.put(("ready", index, len(conns), len(failures), failures[:3], prep))
    await _wait_event(ctl["go"])
    t_start = ctl["t_start"].value
    try:
        result = await driver.run(
            conns, t_start, t_start + spec.warmup, t_start + spec.warmup + spec.duration
        )
    except Exception as exc:
        result = {"error": repr(exc)}
    result["lost_connections"] = sum(c.lost for c in conns)
    result["errors"] = [c.error for c in conns if c.error][:3]
    q.put(("result", index, result))
    await _wait_event(ctl["stop"])
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0.2)


def _worker(index: int, spec: FleetSpec, cids: list[str], q: Any, ctl: dict[str, Any]) -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(_worker_main(index, spec, cids, q, ctl))
    except ImportError:
        asyncio.run(_worker_main(index, spec, cids, q, ctl))


class Fleet:
    """``processes`` worker processes sharing ``connections`` client connections."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.ctx = mp.get_context("fork")  # the parent never runs an event loop, so fork is safe
        self.q = self.ctx.Queue()
        self.ctl = {"go": self.ctx.Event(), "stop": self.ctx.Event(), "t_start": self.ctx.Value("d", 0.0)}
        self.procs: list[Any] = []
        self.connected = 0
        self.failed = 0
        self.failures: list[str] = []
        self.prepared: list[dict[str, Any]] = []

    def _get(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.q.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError("load generator workers did not answer in time") from None
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"load generator worker died (exit {dead[0].exitcode})") from None

    def start(self, timeout: float = 300.0) -> int:
        spec = self.spec
        cids = [f"{spec.prefix}-{i:05d}" for i in range(spec.connections)]
        for w in range(spec.processes):
            mine = cids[w :: spec.processes]
            p = self.ctx.Process(target=_worker, args=(w, spec, mine, self.q, self.ctl), daemon=True)
            p.start()
            self.procs.append(p)
        for _ in range(spec.processes):
            _, _w, ok, failed, failures, prep = self._get(timeout)
            self.connected += ok
            self.failed += failed
            self.failures += failures
            self.prepared.append(prep)
        return self.connected

    def go(self, delay: float = 0.3) -> float:
        t_start = time.monotonic() + delay
        self.ctl["t_start"].value = t_start
        self.ctl["go"].set()
        return t_start

    def results(self, timeout: float) -> list[dict[str, Any]]:
        out = [self._get(timeout)[2] for _ in range(self.spec.processes)]
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise RuntimeError(f"load generator failed: {errors[0]}")
        return out

    def close(self) -> None:
        self.ctl["stop"].set()
        for p in self.procs:
            p.join(10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counters of all workers, pool their latencies, keep the busiest worker's CPU."""
    merged: dict[str, Any] = {}
    lat: list[float] = []
    for r in results:
        for k, v in r.items():
            if k == "latencies":
                lat.extend(v)
            elif isinstance(v, bool):
                merged[k] = merged.get(k, True) and v
            elif isinstance(v, int | float):
                merged[k] = merged.get(k, 0) + v
    lat.sort()
    merged["latencies"] = lat
    merged["cpu_max"] = max((r.get("cpu", 0.0) for r in results), default=0.0)
    return merged


# --------------------------------------------------------------------------------------- standalone CLI


def main(argv: list[str] | None = None) -> int:
    from common import percentile, raise_nofile, table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    ap.add_argument("--mode", choices=sorted(DRIVERS), default="flat")
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--username", default=None, help="meterhub vendor username (password = md5 rule)")
    args = ap.parse_args(argv)
    raise_nofile()
    spec = FleetSpec(
        port=args.port,
        connections=args.connections,
        processes=args.processes,
        driver=DRIVERS[args.mode],
        params={"window": args.window, "rate": args.rate},
        username=args.username,
        md5_password=args.username is not None,
        warmup=args.warmup,
        duration=args.duration,
    )
    fleet = Fleet(spec)
    try:
        fleet.start()
        print(f"connected {fleet.connected}, failed {fleet.failed} {fleet.failures[:1]}", file=sys.stderr)
        fleet.go()
        res = merge(fleet.results(args.warmup + args.duration + 120))
    finally:
        fleet.close()
    lat = res["latencies"]
    print(
        table(
            ["mode", "round trips/s", "p50 ms", "p99 ms", "generator CPU max %"],
            [
                [
                    args.mode,
                    res.get("done", 0) / args.duration,
                    percentile(lat, 50) * 1e3,
                    percentile(lat, 99) * 1e3,
                    100 * res["cpu_max"] / args.duration,
                ]
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
