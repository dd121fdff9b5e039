"""Shared fixtures: a real meterhub running in a background thread, and real MQTT clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from meterhub.app import Hub
from meterhub.config import Settings, load_settings
from meterhub.core.auth import gateway_password
from meterhub.storage import registry


def pytest_configure(config: pytest.Config) -> None:
    """``METERHUB_TEST_LEAKS=1``: report the tests that leave descriptors or threads (leakcheck.py)."""
    if os.environ.get("METERHUB_TEST_LEAKS"):
        from leakcheck import LeakCheck

        config.pluginmanager.register(LeakCheck(), "meterhub-leakcheck")


def cli_add_vendor(data: Path, name: str) -> str:
    """Add a vendor with the real CLI (``meterhub vendor add``), as an operator would; its username."""
    return subprocess.run(
        [sys.executable, "-m", "meterhub", "vendor", "add", name, "--data-dir", str(data)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningHub:
    """A :class:`meterhub.app.Hub` on its own event loop thread, for tests to talk to over loopback."""

    def __init__(self, settings: Settings, handler: str = "protocol") -> None:
        self.settings = settings
        self.hub = Hub(settings, handler=handler)
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()  # what `meterhub serve` runs on
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hub-loop", daemon=True)

    def start(self) -> RunningHub:
        """Start the loop thread and the hub; a hub that fails to start is stopped again (as
        ``meterhub serve`` does, app.start_or_explain) and leaves no loop behind."""
        self._thread.start()
        try:
            self.call(self.hub.start())
        except BaseException:
            try:
                with contextlib.suppress(Exception):
                    self.call(self.hub.stop())
            finally:
                self.close_loop()
            raise
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine in the hub's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run a plain function in the hub's loop thread (to read state safely)."""
        fut: Future[Any] = Future()

        def wrapper() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(wrapper)
        return fut.result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.hub.stop())
        finally:
            self.close_loop()

    def close_loop(self) -> None:
        """Join the loop's executor threads, stop the loop thread and close the loop: a loop left
        open keeps its descriptors (epoll, eventfd, io_uring, pipes) and its executor's threads."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.call(self.loop.shutdown_default_executor(), 10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()

    @property
    def port(self) -> int:
        assert self.hub.mqtt_port is not None
        return self.hub.mqtt_port

    @property
    def engine(self) -> Any:
        return self.hub.engine

    @property
    def stats(self) -> Any:
        assert self.hub.mqtt is not None
        return self.hub.mqtt.stats


#: ``METERHUB_TEST_DB=postgresql`` runs the hub fixtures on a fresh PostgreSQL database each
#: (server from ``METERHUB_TEST_PG``, default the local one); anything else: SQLite in a temp dir.
TEST_DB = os.environ.get("METERHUB_TEST_DB", "sqlite")
TEST_PG = os.environ.get("METERHUB_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


def fresh_postgres_url() -> str:
    """Create an empty database on the test PostgreSQL server and return its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    name = f"meterhub_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{TEST_PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{TEST_PG}/{name}"


def drop_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    admin = create_engine(f"{TEST_PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "mqtt_host": "127.0.0.1",
        "mqtt_port": 0,
        "http_port": 0,
        "sqlite_synchronous": "NORMAL",
        # alarms raised and cleared at once unless a test asks for debouncing (core/alarms.py)
        "alarm_raise_after": 0.0,
        "alarm_clear_after": 0.0,
    }
    base.update(overrides)
    return load_settings(None, **base)


@pytest.fixture
def shared_postgres() -> Iterator[str]:
    """A fresh PostgreSQL database for several hubs at once (nodes of one cluster), whatever
    ``METERHUB_TEST_DB`` says: an embedded SQLite database is locked to one server. Request it
    before ``hub_factory`` so that the hubs are stopped before it is dropped."""
    url = fresh_postgres_url()
    yield url
    drop_postgres(url)


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., RunningHub]]:
    started: list[RunningHub] = []

    def factory(handler: str = "protocol", **overrides: Any) -> RunningHub:
        if TEST_DB == "postgresql" and "database_url" not in overrides:
            overrides["database_url"] = fresh_postgres_url()
            databases.append(overrides["database_url"])
        settings = make_settings(tmp_path / f"data{len(started)}", **overrides)
        hub = RunningHub(settings, handler=handler)
        hub.start()
        assert hub.hub.mqtt is not None
        hub.hub.mqtt.limits.sweep_interval = 0.1
        started.append(hub)
        return hub

    databases: list[str] = []
    yield factory
    for hub in started:
        hub.stop()
    for url in databases:
        drop_postgres(url)


@pytest.fixture
def echo_hub(hub_factory: Callable[..., RunningHub]) -> RunningHub:
    return hub_factory("echo")


@pytest.fixture
def vendor(echo_hub: RunningHub) -> registry.Vendor:
    return registry.add_vendor(echo_hub.engine, "acme")


class Client:
    """A paho-mqtt client (MQTT 3.1.1) with a message queue and blocking helpers."""

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        *,
        clean_session: bool = True,
        keepalive: int = 60,
        tls_ca: str | None = None,
        will: tuple[str, bytes, int] | None = None,
    ) -> None:
        self.client_id = client_id
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.port = port
        self.keepalive = keepalive
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            c.username_pw_set(username, password)
        if tls_ca:
            c.tls_set(ca_certs=tls_ca)
        if will:
            c.will_set(will[0], will[1], will[2])
        c.on_connect = lambda _c, _u, flags, rc, _p: self.connack.put((rc, flags))
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.put(rc)
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.put(rcs)
        self.c = c

    def connect(self, timeout: float = 5) -> tuple[Any, Any]:
        self.c.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.c.loop_start()
        return self.connack.get(timeout=timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5) -> list[Any]:
        self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 5) -> None:
        info = self.c.publish(topic, payload, qos)
        if qos:
            info.wait_for_publish(timeout)
            assert info.is_published(), "publish not acknowledged"

    def get(self, timeout: float = 5) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        close_paho(self.c)


def close_paho(c: mqtt.Client) -> None:
    """Disconnect a paho client and stop its network thread, and close its wake-up socket pair:
    paho (2.2) closes that pair (two loopback TCP sockets) only when the client is collected, and
    the callbacks' reference cycles leave that to the cyclic collector, whenever it runs."""
    try:
        c.disconnect()
    finally:
        c.loop_stop()
        c._reset_sockets()  # no public call closes the pair


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(
        port: int,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        **kw: Any,
    ) -> Client:
        cid = client_id or f"gw-{uuid.uuid4().hex[:8]}"
        if username is not None and password is None:
            password = gateway_password(cid, username)
        c = Client(port, cid, username, password, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        with contextlib.suppress(Exception):
            c.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@contextlib.contextmanager
def storage_held(engine: Any) -> Iterator[None]:
    """Block every writer of ``engine``'s database (readers go on) until the block ends: a storage
    that is slower than the offered load, on SQLite (an exclusive transaction from another
    connection; the writer waits in its busy timeout) or PostgreSQL (EXCLUSIVE table locks)."""
    if engine.dialect.name == "sqlite":
        import sqlite3

        conn = sqlite3.connect(engine.url.database, isolation_level=None, timeout=30)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            yield
            conn.execute("COMMIT")
        finally:
            conn.close()
        return
    from sqlalchemy import text

    from meterhub.storage import schema

    with engine.connect() as conn, conn.begin():
        names = ", ".join(t.name for t in schema.metadata.sorted_tables)
        conn.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))
        yield


#: The NATS server the cluster tests start for themselves (the Debian package ``nats-server``).
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """A nats-server of the test module's own, on a free port (cluster tests)."""
    port = free_port()
    proc = subprocess.Popen(
        [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        assert proc.poll() is None, "nats-server exited"
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        return False

    wait_for(listening, timeout=10)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def refuse_marked_reports(engine: Any, marker: str = "poison-") -> None:
    """Make the database itself refuse every report whose request_id starts with ``marker`` (a real
    database error the validator cannot foresee): a CHECK constraint on PostgreSQL, a trigger that
    raises on SQLite (which cannot add constraints to a table)."""
    from sqlalchemy import text

    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_marked BEFORE INSERT ON reports "
                    f"WHEN NEW.request_id LIKE '{marker}%' BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "ALTER TABLE reports ADD CONSTRAINT refuse_marked "
                    f"CHECK (request_id NOT LIKE '{marker}%')"
                )
            )
