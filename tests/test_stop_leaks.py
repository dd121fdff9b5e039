"""A stopped hub gives back what it took: descriptors and threads back to where they were.

One process runs many hubs (the test suite; a server restarted in-process): a stop that left a
socket, a database connection, a loop or a thread behind would add up until paho's select() fails
on descriptors above 1024 (see tests/leakcheck.py, ``METERHUB_TEST_LEAKS=1``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_DB, Client, RunningHub, drop_postgres, fresh_postgres_url, make_settings
from leakcheck import live_threads, open_fds
from meterhub.app import Hub, run
from meterhub.core.auth import gateway_password
from meterhub.storage import registry

CYCLES = 4


@pytest.fixture
def database() -> Iterator[dict[str, Any]]:
    """The settings of the database the hubs share: PostgreSQL on the PostgreSQL pass, else SQLite."""
    if TEST_DB != "postgresql":
        yield {}
        return
    url = fresh_postgres_url()
    yield {"database_url": url}
    drop_postgres(url)


def _snapshot() -> tuple[Counter[str], Counter[str]]:
    return open_fds(), live_threads()


def _assert_back(before: tuple[Counter[str], Counter[str]], cycles: int) -> None:
    """Descriptors and threads are where they were ``before`` the last ``cycles`` runs."""
    fds, threads = _snapshot()
    extra_fds, extra_threads = fds - before[0], threads - before[1]
    # a descriptor or two may be in flight (a log file, the test's own reads), never one per cycle
    assert extra_fds.total() < cycles, f"descriptors left after {cycles} runs: {dict(extra_fds)}"
    assert not extra_threads, f"threads left after {cycles} runs: {dict(extra_threads)}"


def test_hubs_served_one_after_another_leave_no_descriptors_or_threads(
    tmp_path: Path, database: dict[str, Any]
) -> None:
    """As ``meterhub serve`` runs one (its own loop, closed after the stop): every listener (MQTT,
    WebSocket, HTTP), the writer thread, the database connections, the cluster bus are given back."""
    settings = make_settings(tmp_path / "data", ws_port=0, **database)
    ports: list[int] = []

    async def cycle() -> None:
        hub = Hub(settings)
        await hub.start()
        try:
            assert hub.mqtt_port and hub.http_port
            ports.append(hub.mqtt_port)
        finally:
            await hub.stop()

    run(cycle())  # the first one loads modules and makes the process's lasting threads
    before = _snapshot()
    for _ in range(CYCLES):
        run(cycle())
    assert len(ports) == CYCLES + 1
    _assert_back(before, CYCLES)


def test_test_hubs_with_a_client_each_leave_no_descriptors_or_threads(
    tmp_path: Path, database: dict[str, Any]
) -> None:
    """The tests' :class:`RunningHub` (a loop of its own in a thread) and :class:`Client` (paho with
    its network thread): stopped and closed, nothing of either is left."""
    settings = make_settings(tmp_path / "data", **database)

    def cycle(n: int) -> None:
        hub = RunningHub(settings).start()
        try:
            vendor = registry.add_vendor(hub.engine, f"vendor-{n}")
            gw = f"gw-{n}"
            c = Client(hub.port, gw, vendor.username, gateway_password(gw, vendor.username))
            try:
                rc, _ = c.connect()
                assert rc == 0
            finally:
                c.close()
        finally:
            hub.stop()

    cycle(0)
    before = _snapshot()
    for n in range(1, CYCLES + 1):
        cycle(n)
    _assert_back(before, CYCLES)


def test_cli_commands_run_in_process_leave_no_database_connections(tmp_path: Path) -> None:
    """A command's engine is disposed when the command ends (click's context closes), not whenever
    the collector gets to it: commands run in-process (``CliRunner``) as well as on their own."""
    from click.testing import CliRunner

    from meterhub.cli import main

    def add(n: int) -> None:
        out = CliRunner().invoke(main, ["vendor", "add", f"vendor-{n}", "--data-dir", str(tmp_path / "data")])
        assert out.exit_code == 0, out.output

    add(0)
    before = _snapshot()
    for n in range(1, CYCLES + 1):
        add(n)
    _assert_back(before, CYCLES)
