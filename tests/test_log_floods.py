"""Repeated errors of one kind are logged once per interval, with a count.

The flood test runs a real ``meterhub serve``, makes its storage fail for real (a SQLite trigger that
aborts every report insert, as a full disk would) and sends 1,000 reports from a real gateway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import Client, cli_add_vendor, free_port, wait_for
from meterhub.core.auth import gateway_password
from meterhub.logs import RateLimitedLog, set_repeat_interval

REPORTS = 1000
INTERVAL = 2.0


class Sink:
    """Collects what a logger is asked to write (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str, dict[str, Any]]] = []

    def log(self, level: int, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))


def test_rate_limited_log_counts_what_it_holds_back() -> None:
    set_repeat_interval(10.0)
    now = [1000.0]
    sink = Sink()
    limited = RateLimitedLog(sink, clock=lambda: now[0])
    try:
        assert limited.error("k", "write failed", n=0) is True
        for n in range(1, 500):
            assert limited.error("k", "write failed", n=n) is False
        limited.warning("other", "something else")  # another kind has its own first line
        assert [(e, f) for _, e, f in sink.lines] == [("write failed", {"n": 0}), ("something else", {})]
        assert limited.flush() == 0  # the interval is not over yet
        now[0] += 10.0
        assert limited.flush() == 1
        assert sink.lines[-1] == (logging.ERROR, "write failed", {"n": 499, "repeated": 499})
        # within the next interval: counted again; the next event after it carries the count
        limited.error("k", "write failed", n=500)
        now[0] += 10.0
        assert limited.error("k", "write failed", n=501) is True
        assert sink.lines[-1] == (logging.ERROR, "write failed", {"n": 501, "repeated": 2})
        # a whole quiet interval: the key is forgotten, the next event is a first line again
        now[0] += 10.0
        limited.flush()
        now[0] += 10.0
        limited.flush()
        assert limited.error("k", "write failed", n=502) is True
        assert sink.lines[-1] == (logging.ERROR, "write failed", {"n": 502})
        assert len(sink.lines) == 5
    finally:
        set_repeat_interval(60.0)


def test_rate_limited_log_keeps_a_bounded_number_of_kinds(monkeypatch) -> None:
    import meterhub.logs

    monkeypatch.setattr(meterhub.logs, "MAX_KEYS", 10)
    set_repeat_interval(10.0)
    try:
        sink = Sink()
        limited = RateLimitedLog(sink, clock=lambda: 0.0)
        for gw in range(1000):  # one kind of event from 1,000 gateways, keyed per gateway
            limited.warning(("refused", gw), "sync refused", gateway_id=gw)
        # the first 10 keys each got their first line; the other 990 share one overflow key
        assert [f["gateway_id"] for _, _, f in sink.lines] == [*range(10), 10]
        assert len(limited._entries) == 11
    finally:
        set_repeat_interval(60.0)


def test_a_storage_failure_flood_is_a_handful_of_lines_with_counts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    username = cli_add_vendor(data, "acme")
    mqtt_port, http_port = free_port(), free_port()
    log_path = tmp_path / "stderr.log"
    env = {
        **os.environ,
        "METERHUB_MQTT_HOST": "127.0.0.1",
        "METERHUB_LOG_FORMAT": "json",
        "METERHUB_LOG_REPEAT_INTERVAL": str(INTERVAL),
    }
    with log_path.open("w") as stderr:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "meterhub", "serve", "--data-dir", str(data)),
                *("--mqtt-port", str(mqtt_port), "--http-port", str(http_port)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    gw = Client(mqtt_port, "gw-1", username, gateway_password("gw-1", username))
    try:

        def healthy() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=30, interval=0.1)
        assert gw.connect()[0] == 0
        gw.subscribe("gateway_id/gw-1/#")
        sync = {"t": int(time.time()), "request_id": "s1", "param": {"cid": "m1", "product_id": "p1"}}
        gw.publish("gateway_id/gw-1/devices/sync", json.dumps(sync))
        assert json.loads(gw.get().payload)["param"]["code"] == 0

        # the database fails (not one row refused: storage.database.row_refused): every insert into
        # reports fails, in the running server's own database
        with contextlib.closing(sqlite3.connect(data / "meterhub.db")) as conn, conn:
            conn.execute("ALTER TABLE reports RENAME TO reports_away")
        before = len(log_path.read_text().splitlines())
        started = time.monotonic()
        for i in range(REPORTS):
            report = {
                "t": int(time.time()),
                "request_id": f"r{i}",
                "param": {"cid": "m1", "id": "1", "value": i % 2 == 0},
            }
            gw.c.publish("gateway_id/gw-1/properties/report", json.dumps(report), 1)
        codes: dict[str, int] = {}
        deadline = time.monotonic() + 120
        while len(codes) < REPORTS and time.monotonic() < deadline:
            answer = json.loads(gw.get(timeout=30).payload)
            codes[answer["request_id"]] = answer["param"]["code"]
        assert len(codes) == REPORTS and set(codes.values()) == {500}

        # the held-back counts are written within an interval (and about a second)
        def summarized() -> bool:
            return _count(_lines(log_path, before), "report not stored") == REPORTS

        wait_for(summarized, timeout=INTERVAL * 3 + 5, interval=0.2)
        lines = _lines(log_path, before)
        most = (time.monotonic() - started) / INTERVAL + 2  # lines of one kind: the first, one per interval
        mine = [line for line in lines if line["event"] == "report not stored"]
        assert 2 <= len(mine) <= most, mine
        assert mine[0].get("repeated") is None and all(m["repeated"] >= 1 for m in mine[1:])
        assert _count(lines, "report not stored") == REPORTS
        for event in ("storage write failed", "storage batch failed, trying again"):  # one a batch
            mine = [line for line in lines if line["event"] == event]
            assert 1 <= len(mine) <= most, mine
        # and short: the driver's message, not SQLAlchemy's statement with a batch of parameters
        for line in lines:
            if line["event"] in ("report not stored", "storage write failed"):
                assert line["error"] == "no such table: reports", line
            assert len(json.dumps(line)) < 1000, line
        # a handful of lines for 1,000 failed reports (before: 2 per report, plus one per batch)
        assert len(lines) <= 3 * most + 5, [line["event"] for line in lines]

        # a gateway sending rejected requests (reports for a device it never synced): same story
        before = len(log_path.read_text().splitlines())
        started = time.monotonic()
        for i in range(REPORTS):
            report = {
                "t": int(time.time()),
                "request_id": f"x{i}",
                "param": {"cid": "ghost", "id": "1", "value": 1},
            }
            gw.c.publish("gateway_id/gw-1/properties/report", json.dumps(report), 1)
        rejected: dict[str, int] = {}
        deadline = time.monotonic() + 120
        while len(rejected) < REPORTS and time.monotonic() < deadline:
            answer = json.loads(gw.get(timeout=30).payload)
            rejected[answer["request_id"]] = answer["param"]["code"]
        assert set(rejected.values()) == {2003}
        wait_for(
            lambda: _count(_lines(log_path, before), "request rejected") == REPORTS,
            timeout=INTERVAL * 3 + 5,
            interval=0.2,
        )
        lines = _lines(log_path, before)
        most = (time.monotonic() - started) / INTERVAL + 2
        assert 2 <= len(lines) <= most, lines
        assert {(line["event"], line["code"]) for line in lines} == {("request rejected", 2003)}
    finally:
        gw.close()
        proc.terminate()
        proc.wait(20)


def _lines(path: Path, skip: int) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_text().splitlines()[skip:]:
        try:
            out.append(json.loads(raw))
        except ValueError:
            out.append({"event": raw})
    return out


def _count(lines: list[dict[str, Any]], event: str) -> int:
    """Events of this kind that the lines stand for: 1 for a plain line, ``repeated`` for a summary."""
    return sum(line.get("repeated", 1) for line in lines if line.get("event") == event)
