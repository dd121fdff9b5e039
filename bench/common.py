"""Helpers shared by the benchmark scripts: process accounting, server launchers, result tables.

Everything here talks to 127.0.0.1 only. Servers are started as child processes and always stopped
by their own pid (never by name).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent
RESULTS_DIR = BENCH_DIR / "results"
AMQTT_PYTHON = BENCH_DIR / ".venv-amqtt" / "bin" / "python"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
_TICK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------- /proc helpers


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal_guest = sum(fields[7:]) if len(fields) > 7 else 0  # steal, guest (guest is counted in user)
    return (sum(fields) - idle - steal_guest) / _TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def raise_nofile(wanted: int = 262_144) -> int:
    """Raise the open-files limit (children inherit it): both limits to ``wanted`` where allowed
    (root may raise the hard limit), else the soft one to the hard one; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout}s")


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# --------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    """A running server under test: one or more processes whose CPU and memory are counted."""

    name: str
    port: int
    procs: list[subprocess.Popen[Any]]
    username: str | None = None
    workdir: Path | None = None
    data_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    http_port: int | None = None
    token: str | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def main_pid(self) -> int:
        return self.procs[0].pid

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def rss(self) -> int:
        """RSS of the broker process only (the echo client of mosquitto does not hold connections)."""
        return rss_bytes(self.main_pid)

    def rss_all(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    def metrics(self) -> dict[str, float]:
        """meterhub's Prometheus counters (``/metrics`` on its loopback HTTP port); {} for other servers."""
        if self.http_port is None or self.token is None:
            return {}
        req = urllib.request.Request(
            f"http://{HOST}:{self.http_port}/metrics", headers={"Authorization": f"Bearer {self.token}"}
        )
        out: dict[str, float] = {}
        with urllib.request.urlopen(req, timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        out[name] = float(value)
        return out

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: process {p.pid} exited with {p.returncode}")

    def stop(self, cleanup: bool = True) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if cleanup:
            self.cleanup()

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _log(workdir: Path, name: str) -> Any:
    return open(workdir / f"{name}.log", "wb")


def meterhub_env() -> dict[str, str]:
    env = dict(os.environ)
    env["METERHUB_MQTT_HOST"] = HOST  # loopback only (the default listens on every address)
    env["METERHUB_LOG_LEVEL"] = "WARNING"
    return env


def product_adder(product_id: str) -> Callable[[str, str, dict[str, str]], None]:
    """A ``before_serve`` hook for :func:`start_meterhub`: register ``product_id`` (smart-meter model)."""

    def add(cli: str, data_dir: str, env: dict[str, str]) -> None:
        subprocess.run(
            [cli, "product", "add", product_id, "--model", "smart-meter", "--data-dir", data_dir],
            check=True,
            capture_output=True,
            env=env,
        )

    return add


def start_meterhub(
    handler: str,
    *,
    settings_env: dict[str, str] | None = None,
    before_serve: Callable[[str, str, dict[str, str]], None] | None = None,
) -> Server:
    """``meterhub vendor add bench`` then ``meterhub serve --handler H`` on a fresh data dir and free port."""
    workdir = Path(tempfile.mkdtemp(prefix=f"meterhub-bench-{handler}-"))
    data_dir = workdir / "data"
    cli = str(VENV_BIN / "meterhub")
    env = meterhub_env()
    if settings_env:
        env.update(settings_env)
    username = subprocess.run(
        [cli, "vendor", "add", "bench", "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    token = json.loads(
        subprocess.run(
            [cli, "token", "create", "bench", "--scope", "read", "--json", "--data-dir", str(data_dir)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    )["token"]
    if before_serve is not None:
        before_serve(cli, str(data_dir), env)
    port = free_port()
    http_port = free_port()
    cmd = [cli, "serve", "--handler", handler, "--data-dir", str(data_dir), "--mqtt-port", str(port)]
    cmd += ["--http-port", str(http_port)]
    proc = subprocess.Popen(cmd, stdout=_log(workdir, "meterhub"), stderr=subprocess.STDOUT, env=env)
    server = Server(f"meterhub ({handler})", port, [proc], username, workdir, data_dir, [], http_port, token)
    try:
        wait_port(port, proc)
    except Exception:
        server.stop()
        raise
    return server


MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
log_dest none
set_tcp_nodelay true
max_inflight_messages {inflight}
max_queued_messages {queued}
"""


def start_mosquitto_echo(echo_procs: int = 1, protocol: bool = False) -> Server:
    """Our own mosquitto on a free loopback port (the system one on 1883 is left alone) + echo client(s);
    ``protocol``: the echo clients are the edge protocol's ideal responder (bench/mosquitto_echo.py)."""
    workdir = Path(tempfile.mkdtemp(prefix="mosquitto-bench-"))
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # the responder takes every gateway's requests: a storm queues ~100,000 for it (1,000 would drop)
    conf.write_text(MOSQUITTO_CONF.format(port=port, inflight=200, queued=1_000_000 if protocol else 1000))
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=_log(workdir, "mosquitto"), stderr=subprocess.STDOUT
    )
    server = Server("mosquitto + echo client", port, [broker], None, workdir)
    try:
        wait_port(port, broker)
        for i in range(echo_procs):
            ready = workdir / f"echo-{i}.ready"
            echo = subprocess.Popen(
                [
                    sys.executable,
                    str(BENCH_DIR / "mosquitto_echo.py"),
                    "--port",
                    str(port),
                    "--client-id",
                    f"echo-{i}",
                    "--shared" if echo_procs > 1 else "--no-shared",
                    "--ready-file",
                    str(ready),
                    *(["--protocol"] if protocol else []),
                ],
                stdout=_log(workdir, f"echo-{i}"),
                stderr=subprocess.STDOUT,
            )
            server.procs.append(echo)
            deadline = time.monotonic() + 20
            while not ready.exists():
                if echo.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mosquitto echo client did not start")
                time.sleep(0.05)
    except Exception:
        server.stop()
        raise
    server.notes.append(
        "mosquitto 2.0 with set_tcp_nodelay true, max_inflight_messages 200; "
        f"echo: {echo_procs} Python process(es) (uvloop + meterhub.mqtt.codec)"
    )
    return server


def amqtt_available() -> bool:
    return AMQTT_PYTHON.exists()


def start_amqtt() -> Server:
    """amqtt 0.12.1 (its own virtualenv, bench/.venv-amqtt) with the in-process echo plugin."""
    if not amqtt_available():
        raise RuntimeError(f"{AMQTT_PYTHON} missing: run bench/setup-amqtt.sh first")
    workdir = Path(tempfile.mkdtemp(prefix="amqtt-bench-"))
    port = free_port()
    proc = subprocess.Popen(
        [str(AMQTT_PYTHON), str(BENCH_DIR / "amqtt_echo.py"), "--port", str(port)],
        stdout=_log(workdir, "amqtt"),
        stderr=subprocess.STDOUT,
    )
    server = Server("amqtt 0.12.1 (echo plugin)", port, [proc], None, workdir)
    try:
        wait_port(port, proc)
    except Exception:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------------------- output


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


class RawSubscriber(asyncio.Protocol):
    """A minimal MQTT 3.1.1 subscriber on meterhub's own codec, so that no client library sits in the
    measured path: CONNECT, SUBSCRIBE ``filters`` at QoS 1 once accepted, PUBACK every QoS 1 PUBLISH.

    Subclasses handle messages in :meth:`on_publish` (packets appended to ``out`` are sent with the
    acknowledgements, in one write). ``ready`` resolves at the SUBACK and fails on a refused CONNECT
    or SUBSCRIBE or a lost connection; ``closed`` resolves when the connection ends.
    """

    def __init__(
        self,
        client_id: str,
        filters: list[str],
        *,
        username: str | None = None,
        password: bytes | None = None,
        keepalive: int = 0,
    ) -> None:
        from meterhub.mqtt import codec

        self.codec = codec
        self.decoder = codec.Decoder(server_side=False, max_packet_size=1 << 24)
        self.connect_packet = codec.encode(codec.Connect(client_id, True, keepalive, username, password))
        self.filters = filters
        self.transport: asyncio.Transport | None = None
        self.pid = 0
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def on_publish(self, packet: Any, now: float, out: list[bytes]) -> None:
        """One PUBLISH received (already acknowledged)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.connect_packet)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        out: list[bytes] = []
        now = time.monotonic()
        for p in self.decoder.feed(data):
            tp = type(p)
            if tp is codec.Publish:
                if p.qos:
                    out.append(b"\x40\x02" + p.packet_id.to_bytes(2, "big"))
                self.on_publish(p, now, out)
            elif tp is codec.ConnAck:
                if p.return_code != 0:
                    self._fail(ConnectionError(f"CONNACK {p.return_code}"))
                    continue
                out.append(codec.encode(codec.Subscribe(1, [(f, 1) for f in self.filters])))
            elif tp is codec.SubAck:
                if 0x80 in p.return_codes:
                    self._fail(ConnectionError("SUBACK refused"))
                elif not self.ready.done():
                    self.ready.set_result(None)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _fail(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)
