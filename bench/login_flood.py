"""Wrong-password CONNECT flood: how many are checked per second, and do correct logins suffer?

Starts ``meterhub serve --handler echo`` on a fresh data dir, then for ``--duration`` seconds
``--concurrency`` loopback connections from 127.0.0.1 each loop: connect, CONNECT with one client id
and a wrong password, read the CONNACK, close. Meanwhile one client on 127.0.0.2 logs in correctly
every 50 ms (fresh client id each time) and its CONNACK latency is recorded.

"checked" are the wrong passwords the authenticator looked at (``auth.failed`` from /metrics; a
server without that counter checks every one); "refused unchecked" were answered by a ban
(``auth.throttled.*``) without a lookup.

    .venv/bin/python bench/login_flood.py --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time

from common import HOST, start_meterhub, table, wait_port


def _s(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_frame(client_id: str, username: str, password: str) -> bytes:
    body = _s("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")
    body += _s(client_id) + _s(username) + _s(password)
    return bytes([0x10, len(body)]) + body  # < 128 bytes: one length byte


async def one_connect(port: int, frame: bytes, source: str) -> int:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        writer.write(frame)
        ack = await reader.readexactly(4)
        return ack[3]
    finally:
        writer.close()


async def flood(port: int, username: str, duration: float, concurrency: int) -> dict[str, object]:
    codes: dict[int, int] = {}
    good_latency: list[float] = []
    good_codes: dict[int, int] = {}
    stop = time.monotonic() + duration
    bad = connect_frame("victim-gw", username, "0" * 32)

    async def attacker() -> None:
        while time.monotonic() < stop:
            code = await one_connect(port, bad, "127.0.0.1")
            codes[code] = codes.get(code, 0) + 1

    async def honest() -> None:
        i = 0
        while time.monotonic() < stop:
            cid = f"honest-{i}"
            i += 1
            pw = hashlib.md5((cid + username).encode()).hexdigest()
            t0 = time.monotonic()
            code = await one_connect(port, connect_frame(cid, username, pw), "127.0.0.2")
            good_latency.append(time.monotonic() - t0)
            good_codes[code] = good_codes.get(code, 0) + 1
            await asyncio.sleep(0.05)

    await asyncio.gather(honest(), *(attacker() for _ in range(concurrency)))
    return {"codes": codes, "good_latency": sorted(good_latency), "good_codes": good_codes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="one second")
    args = ap.parse_args()
    duration = 1.0 if args.smoke else args.duration
    server = start_meterhub("echo")
    try:
        assert server.http_port is not None
        wait_port(server.http_port, server.procs[0])
        before = server.metrics()
        out = asyncio.run(flood(server.port, server.username or "", duration, args.concurrency))
        after = server.metrics()
        server.check_alive()
    finally:
        server.stop()

    def delta(event: str) -> float:
        key = f'meterhub_mqtt_events_total{{event="{event}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    codes: dict[int, int] = out["codes"]  # type: ignore[assignment]
    answered = sum(codes.values())
    has_counter = any("auth.failed" in k for k in after) or any("auth.throttled" in k for k in after)
    checked = delta("auth.failed") if has_counter else codes.get(4, 0)
    unchecked = delta("auth.throttled.client") + delta("auth.throttled.source")
    lat: list[float] = out["good_latency"]  # type: ignore[assignment]
    p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
    print(
        table(
            [
                "seconds",
                "wrong CONNECTs answered/s",
                "checked/s",
                "refused unchecked/s",
                "correct logins from 127.0.0.2 (codes)",
                "their CONNACK p50 / p99 ms",
            ],
            [
                [
                    duration,
                    round(answered / duration),
                    round(checked / duration, 1),
                    round(unchecked / duration),
                    str(out["good_codes"]),
                    f"{p50:.1f} / {p99:.1f}",
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
