"""Energy per day and month: the rules (pure), and the API over stored reports, in Europe/Berlin."""

from __future__ import annotations

import datetime as dt
import random
import time
import uuid
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from conftest import RunningHub
from meterhub.core.energy import Reading, attribute, buckets_for, parse_period_key
from meterhub.storage import schema
from test_api import Api

BERLIN = ZoneInfo("Europe/Berlin")
D = dt.date


def local(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, fold: int = 0) -> float:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=BERLIN, fold=fold).timestamp()


def kwh(sums: list[float | None]) -> list[float | None]:
    return [None if s is None else round(s / 10_000, 4) for s in sums]


def bounds_of(period: str, first: dt.date, last: dt.date) -> list[float]:
    b = buckets_for(period, first, last, BERLIN)
    return [x.start for x in b] + [b[-1].end]


# --- calendar ------------------------------------------------------------------------------------


def test_days_follow_the_zone_including_dst_changes() -> None:
    autumn = buckets_for("day", D(2026, 10, 24), D(2026, 10, 26), BERLIN)
    assert [b.key for b in autumn] == ["2026-10-24", "2026-10-25", "2026-10-26"]
    assert [b.end - b.start for b in autumn] == [86400, 90000, 86400]  # 25 h on Oct 25
    assert autumn[0].start == dt.datetime(2026, 10, 23, 22, tzinfo=dt.UTC).timestamp()  # 00:00 CEST
    spring = buckets_for("day", D(2026, 3, 29), D(2026, 3, 29), BERLIN)
    assert spring[0].end - spring[0].start == 82800  # 23 h
    months = buckets_for("month", D(2026, 10, 5), D(2027, 1, 1), BERLIN)
    assert [b.key for b in months] == ["2026-10", "2026-11", "2026-12", "2027-01"]
    assert months[0].end - months[0].start == 31 * 86400 + 3600
    assert months[0].end == months[1].start == local(2026, 11, 1)
    assert parse_period_key("2026-11", "month") == D(2026, 11, 1)
    assert parse_period_key("2026-11-17", "month") == D(2026, 11, 1)
    with pytest.raises(ValueError):
        parse_period_key("2026-13-01", "day")
    with pytest.raises(ValueError):
        buckets_for("day", D(2026, 1, 2), D(2026, 1, 1), BERLIN)


# --- the rules -----------------------------------------------------------------------------------

# Oct 24-26 2026 in Berlin: across midnights, the DST-end day (25 h) and a meter reset.
AUTUMN_BASELINE = Reading(local(2026, 10, 23, 23), 1_000_000)  # 100 kWh, the day before
AUTUMN = [
    Reading(local(2026, 10, 24, 0, 0, 0), 1_010_000),  # +1.0 exactly at midnight: Oct 24
    Reading(local(2026, 10, 24, 12), 1_025_000),  # +1.5
    Reading(local(2026, 10, 24, 23, 59, 59), 1_030_000),  # +0.5            Oct 24 = 3.0
    Reading(local(2026, 10, 25, 2, 30, fold=1), 1_040_000),  # +1.0 (02:30 CET, the 2nd one)
    Reading(local(2026, 10, 25, 23), 1_060_000),  # +2.0            Oct 25 = 3.0
    Reading(local(2026, 10, 26, 10), 20_000),  # reset: counted from 0, +2.0
    Reading(local(2026, 10, 26, 20), 35_000),  # +1.5            Oct 26 = 3.5
]


def test_days_across_midnight_dst_and_a_reset() -> None:
    bounds = bounds_of("day", D(2026, 10, 24), D(2026, 10, 26))
    att = attribute(AUTUMN, bounds, baseline=AUTUMN_BASELINE)
    assert kwh(att.sums) == [3.0, 3.0, 3.5]
    assert att.readings == [3, 2, 2]
    assert [(e.kind, e.before, e.after) for e in att.events] == [("reset", 1_060_000, 20_000)]
    # Arrival order does not matter (buffered reports): readings are sorted by t.
    shuffled = AUTUMN[:]
    random.Random(7).shuffle(shuffled)
    assert kwh(attribute(shuffled, bounds, baseline=AUTUMN_BASELINE).sums) == [3.0, 3.0, 3.5]
    # Without the baseline the first reading only starts the count.
    assert kwh(attribute(AUTUMN, bounds).sums) == [2.0, 3.0, 3.5]
    # In UTC the midnight reading belongs to Oct 23 (22:00 UTC) and Oct 25 ends an hour later.
    utc = ZoneInfo("UTC")
    b = buckets_for("day", D(2026, 10, 24), D(2026, 10, 26), utc)
    att_utc = attribute(AUTUMN, [x.start for x in b] + [b[-1].end], baseline=AUTUMN_BASELINE)
    assert kwh(att_utc.sums) == [2.0, 3.0, 3.5]
    # Months: all of it in October.
    months = attribute(AUTUMN, bounds_of("month", D(2026, 10, 1), D(2026, 11, 1)), baseline=AUTUMN_BASELINE)
    assert kwh(months.sums) == [9.5, None]


def test_gap_goes_to_the_later_day_or_is_spread() -> None:
    # Nov 30 10:00 -> 22:00 (+1.0), then nothing until Dec 2 22:00 (+48.0 over exactly 48 h).
    readings = [
        Reading(local(2026, 11, 30, 10), 990_000),
        Reading(local(2026, 11, 30, 22), 1_000_000),
        Reading(local(2026, 12, 2, 22), 1_480_000),
    ]
    days = bounds_of("day", D(2026, 11, 30), D(2026, 12, 2))
    assert kwh(attribute(readings, days).sums) == [1.0, None, 48.0]  # Dec 1 has no data
    assert kwh(attribute(readings, days, spread=True).sums) == [3.0, 24.0, 22.0]
    months = bounds_of("month", D(2026, 11, 1), D(2026, 12, 1))
    assert kwh(attribute(readings, months).sums) == [1.0, 48.0]
    assert kwh(attribute(readings, months, spread=True).sums) == [3.0, 46.0]
    # Spreading from a baseline before the range: the part before the range is left out.
    dec = bounds_of("day", D(2026, 12, 1), D(2026, 12, 2))
    assert kwh(attribute(readings[2:], dec, baseline=readings[1], spread=True).sums) == [24.0, 22.0]


def test_drops_reset_rebase_glitch() -> None:
    day = bounds_of("day", D(2026, 11, 10), D(2026, 11, 10))

    def at(h: int) -> float:
        return local(2026, 11, 10, h)

    # A single bad low reading between two good ones: skipped (glitch), the consumption spans it.
    att = attribute([Reading(at(1), 1_000_000), Reading(at(2), 0), Reading(at(3), 1_010_000)], day)
    assert kwh(att.sums) == [1.0] and [e.kind for e in att.events] == ["glitch"]
    # A moderate drop (meter replaced / counter set): nothing counted, counting restarts from it.
    att = attribute([Reading(at(1), 1_000_000), Reading(at(2), 950_000), Reading(at(3), 960_000)], day)
    assert kwh(att.sums) == [1.0] and [e.kind for e in att.events] == ["rebase"]
    # A drop to near zero: reset, the new reading is consumption since the reset.
    att = attribute([Reading(at(1), 1_000_000), Reading(at(2), 5_000), Reading(at(3), 15_000)], day)
    assert kwh(att.sums) == [1.5] and [e.kind for e in att.events] == ["reset"]
    # A drop at the very end: the first reading after the range decides.
    end_drop = [Reading(at(1), 1_000_000), Reading(at(23), 5_000)]
    assert kwh(attribute(end_drop, day).sums) == [0.5]  # reset
    back_up = attribute(end_drop, day, lookahead=Reading(local(2026, 11, 11, 1), 1_001_000))
    assert kwh(back_up.sums) == [0.0] and [e.kind for e in back_up.events] == ["glitch"]


# --- through the database and the API ------------------------------------------------------------


def insert(hub: RunningHub, cid: str, rows: list[tuple[str, float, int]], gateway: str = "gw-e") -> None:
    """Hand-made stored reports (older than the 30 days the protocol accepts): (dp, t, raw)."""
    now = time.time()
    with hub.engine.begin() as conn:
        exists = conn.execute(schema.devices.select().where(schema.devices.c.cid == cid)).first()
        if exists is None:
            conn.execute(
                schema.devices.insert().values(
                    cid=cid,
                    gateway_id=gateway,
                    product_id="pid",
                    model="smart-meter",
                    online=False,
                    first_seen=now,
                    last_seen=now,
                    synced_at=now,
                )
            )
        conn.execute(
            schema.reports.insert(),
            [
                {
                    "gateway_id": gateway,
                    "request_id": str(uuid.uuid4()),
                    "cid": cid,
                    "dp_id": dp,
                    "value": raw,
                    "num": raw / 10_000,
                    "t": t,
                    "received_at": now,
                    "digest": schema.report_digest(cid, dp, str(raw), t),
                }
                for dp, t, raw in rows
            ],
        )


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Any) -> Any:
    a = Api(hub_factory("protocol", timezone="Europe/Berlin"), clients)
    yield a
    a.close()


def test_device_energy_endpoint(api: Api) -> None:
    rows = [("44", AUTUMN_BASELINE.t, AUTUMN_BASELINE.raw)] + [("44", r.t, r.raw) for r in AUTUMN]
    # What the meter says itself (electric_daily, dp 45): last value of each day wins.
    rows += [
        ("45", local(2026, 10, 24, 12), 15_000),
        ("45", local(2026, 10, 24, 23, 30), 29_000),
        ("45", local(2026, 10, 26, 20), 34_000),
    ]
    rows += [("46", local(2026, 10, 26, 20), 94_000)]
    insert(api.hub, "e1", rows)
    r = api.read.get(
        "/api/v1/devices/e1/energy", params={"period": "day", "from": "2026-10-24", "to": "2026-10-26"}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["timezone"], out["unit"], out["from"], out["to"]) == (
        "Europe/Berlin",
        "kWh",
        "2026-10-24",
        "2026-10-26",
    )
    assert out["source"] == {"dp_id": "44", "code": "electric_total"}
    got = [(b["period"], b["consumption_kwh"], b["readings"], b["reported_kwh"]) for b in out["buckets"]]
    assert got == [
        ("2026-10-24", 3.0, 3, 2.9),
        ("2026-10-25", 3.0, 2, None),
        ("2026-10-26", 3.5, 2, 3.4),
    ]
    assert out["total_kwh"] == 9.5
    assert out["buckets"][1]["end"] - out["buckets"][1]["start"] == 90000
    assert [(e["kind"], e["before_kwh"], e["after_kwh"]) for e in out["events"]] == [("reset", 106.0, 2.0)]
    month = api.read.get(
        "/api/v1/devices/e1/energy", params={"period": "month", "from": "2026-09", "to": "2026-10"}
    ).json()
    assert [(b["period"], b["consumption_kwh"], b["reported_kwh"]) for b in month["buckets"]] == [
        ("2026-09", None, None),
        ("2026-10", 9.5, 9.4),
    ]
    assert api.read.get("/api/v1/devices/e1/energy", params={"period": "year"}).status_code == 422
    bad = api.read.get("/api/v1/devices/e1/energy", params={"from": "2026-10-30", "to": "2026-10-01"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == 1101
    assert api.read.get("/api/v1/devices/nobody/energy").json()["error"]["code"] == 2003


def test_group_energy_and_forward_total_fallback(api: Api) -> None:
    # e2 reports only forward_energy_total (dp 50); e3 electric_total. Month end Nov -> Dec.
    insert(
        api.hub,
        "e2",
        [
            ("50", local(2026, 11, 30, 20), 500_000),
            ("50", local(2026, 11, 30, 23, 59), 510_000),  # +1.0 Nov 30
            ("50", local(2026, 12, 1, 0, 1), 512_500),  # +0.25 Dec 1
        ],
        gateway="gw-g",
    )
    insert(
        api.hub,
        "e3",
        [
            ("44", local(2026, 11, 30, 1), 2_000_000),
            ("44", local(2026, 12, 1, 1), 2_030_000),  # +3.0 Dec 1
        ],
        gateway="gw-g",
    )
    params: dict[str, Any] = {"period": "day", "from": "2026-11-30", "to": "2026-12-01"}
    one = api.read.get("/api/v1/devices/e2/energy", params=params).json()
    assert one["source"] == {"dp_id": "50", "code": "forward_energy_total"}
    assert [b["consumption_kwh"] for b in one["buckets"]] == [1.0, 0.25]
    by_cid = api.read.get("/api/v1/energy", params={**params, "cid": ["e2", "e3"]}).json()
    assert [(b["period"], b["consumption_kwh"], b["devices_with_data"]) for b in by_cid["buckets"]] == [
        ("2026-11-30", 1.0, 2),
        ("2026-12-01", 3.25, 2),
    ]
    assert by_cid["total_kwh"] == 4.25
    assert [(d["cid"], d["total_kwh"]) for d in by_cid["devices"]] == [("e2", 1.25), ("e3", 3.0)]
    by_gw = api.read.get("/api/v1/energy", params={**params, "gateway": "gw-g"}).json()
    assert by_gw["buckets"] == by_cid["buckets"]
    months = api.read.get(
        "/api/v1/energy", params={"period": "month", "from": "2026-11", "to": "2026-12", "gateway": "gw-g"}
    ).json()
    assert [b["consumption_kwh"] for b in months["buckets"]] == [1.0, 3.25]
    assert (
        api.read.get("/api/v1/energy", params={**params, "cid": ["e2", "nobody"]}).json()["error"]["code"]
        == 2003
    )
    assert api.read.get("/api/v1/energy", params=params).status_code == 422


def test_energy_from_live_mqtt_reports(api: Api) -> None:
    """Reports through the protocol (two days back, within the accepted 30 days) count the same way."""
    gw = api.gateway()
    gw.sync("live")
    today = dt.datetime.now(BERLIN).date()
    day1, day2 = today - dt.timedelta(days=3), today - dt.timedelta(days=2)
    noon = [dt.datetime(d.year, d.month, d.day, 12, tzinfo=BERLIN).timestamp() for d in (day1, day2)]
    gw.report("live", "44", 1_234_567, t=noon[0])
    gw.report("live", "44", 1_244_567, t=noon[0] + 3600)  # +1.0
    gw.report("live", "44", 1_259_567, t=noon[1])  # +1.5, on day 2
    gw.report("live", "45", 22_000, t=noon[1])
    out = api.read.get(
        "/api/v1/devices/live/energy", params={"from": day1.isoformat(), "to": day2.isoformat()}
    ).json()
    assert [(b["consumption_kwh"], b["reported_kwh"]) for b in out["buckets"]] == [(1.0, None), (1.5, 2.2)]
