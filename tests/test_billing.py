"""The tariff and bill engine (meterhub.billing), pure: exact bills computed by hand.

Every expected number below is worked out in the comments; money is compared as Decimal strings.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from meterhub.billing.engine import BillError, MeterInterval, TariffVersion, compute_bill
from meterhub.billing.meter import CounterSeries
from meterhub.billing.tariff import TariffError, band_segments, parse_spec
from meterhub.core.energy import Reading

BERLIN = ZoneInfo("Europe/Berlin")


def at(y: int, mo: int, d: int, h: int = 0, mi: int = 0, fold: int = 0) -> float:
    return dt.datetime(y, mo, d, h, mi, tzinfo=BERLIN, fold=fold).timestamp()


def kwh(x: str) -> int:
    return int(Decimal(x) * 10000)


def flat(rate: str, standing: str = "0", tax: str = "0") -> dict:
    return {"kind": "flat", "rate": rate, "standing_charge_per_day": standing, "tax_rate": tax}


def lines(bill) -> list[tuple[str, str | None, str, str, str]]:
    return [(ln["kind"], ln["band"], ln["quantity"], ln["unit_price"], ln["amount"]) for ln in bill.lines]


def test_tariff_change_mid_month_over_the_dst_change():
    # October 2026 in Berlin: clocks go back on Sunday the 25th, so the month has 745 hours but 31 days.
    # v1 (0.30/kWh, 0.50/day) until the 15th, v2 (0.40/kWh, 0.60/day) from the 16th; tax 19 %.
    v1 = TariffVersion(dt.date(2026, 1, 1), parse_spec(flat("0.30", "0.50", "0.19")), "home")
    v2 = TariffVersion(dt.date(2026, 10, 16), parse_spec(flat("0.40", "0.60", "0.19")), "home")
    start, end = at(2026, 10, 1), at(2026, 11, 1)
    assert end - start == 745 * 3600
    readings = [
        Reading(at(2026, 10, 1), kwh("1000")),
        Reading(at(2026, 10, 15, 12), kwh("1140")),
        Reading(at(2026, 10, 16, 12), kwh("1160")),  # 16th 00:00 interpolated: 1150 (mid-way)
        Reading(at(2026, 11, 1), kwh("1310")),
    ]
    bill = compute_bill(
        start=start,
        end=end,
        tz=BERLIN,
        currency="EUR",
        intervals=[MeterInterval("m1", start, end, readings)],
        versions=[v2, v1],
        occupied=[(start, end)],
    )
    # energy v1: 1150 - 1000 = 150 kWh x 0.30 = 45.00; v2: 1310 - 1150 = 160 kWh x 0.40 = 64.00
    # standing: 1st-15th = 15 days x 0.50 = 7.50; 16th-31st = 16 days x 0.60 = 9.60
    # net 126.10; tax 19 % = 23.959 -> 23.96; total 150.06
    assert lines(bill) == [
        ("energy", "energy", "150.0000", "0.30", "45.00"),
        ("energy", "energy", "160.0000", "0.40", "64.00"),
        ("standing", None, "15", "0.50", "7.50"),
        ("standing", None, "16", "0.60", "9.60"),
        ("tax", None, "126.10", "0.19", "23.96"),
    ]
    assert (bill.kwh_total, bill.net_total, bill.tax_total, bill.total) == (
        Decimal("310.0000"),
        Decimal("126.10"),
        Decimal("23.96"),
        Decimal("150.06"),
    )
    assert bill.meters[0]["opening"]["kwh"] == "1000.0000"
    assert bill.meters[0]["opening"]["source"] == "reading"
    assert bill.meters[0]["closing"]["kwh"] == "1310.0000"


TOU = {
    "kind": "tou",
    "bands": {"day": "0.30", "night": "0.10"},
    "windows": [
        {"days": "all", "start": "00:00", "end": "06:00", "band": "night"},
        {"days": "all", "start": "06:00", "end": "22:00", "band": "day"},
        {"days": "all", "start": "22:00", "end": "24:00", "band": "night"},
    ],
}


def test_time_of_use_on_the_25_hour_day():
    # Sunday 25 October 2026 has 25 hours: the hour 02:00-03:00 happens twice. A meter using exactly
    # 1 kWh per real hour (hourly readings) uses 7 kWh from 00:00 to 06:00 (night), 16 kWh from 06:00
    # to 22:00 (day), 2 kWh from 22:00 to 24:00 (night): night 9 x 0.10 = 0.90, day 16 x 0.30 = 4.80.
    start, end = at(2026, 10, 25), at(2026, 10, 26)
    assert end - start == 25 * 3600
    readings = [Reading(start + h * 3600, kwh(str(500 + h))) for h in range(26)]
    v = TariffVersion(dt.date(2026, 1, 1), parse_spec(TOU), "tou")
    bill = compute_bill(
        start=start,
        end=end,
        tz=BERLIN,
        currency="EUR",
        intervals=[MeterInterval("m1", start, end, readings)],
        versions=[v],
        occupied=[(start, end)],
    )
    assert lines(bill) == [
        ("energy", "night", "9.0000", "0.10", "0.90"),
        ("energy", "day", "16.0000", "0.30", "4.80"),
    ]
    assert bill.total == Decimal("5.70")


def test_time_of_use_window_edges():
    # Readings at 05:00 (10.0000) and 07:00 (12.0001): at the 06:00 edge the meter is interpolated to
    # 11.00005, rounded half-even to 11.0000, so night gets 1.0000 and day 1.0001. A reading exactly at
    # 22:00 (20.0001) ends the day band; the next 2 kWh (to 24:00) are night.
    start, end = at(2026, 11, 3, 5), at(2026, 11, 4)
    readings = [
        Reading(at(2026, 11, 3, 5), kwh("10")),
        Reading(at(2026, 11, 3, 7), kwh("12.0001")),
        Reading(at(2026, 11, 3, 22), kwh("20.0001")),
        Reading(at(2026, 11, 4), kwh("22.0001")),
    ]
    series = CounterSeries(readings)
    edge = series.at(at(2026, 11, 3, 6))
    assert edge is not None and edge.source == "interpolated" and edge.counter == kwh("11")
    v = TariffVersion(dt.date(2026, 1, 1), parse_spec(TOU), "tou")
    bill = compute_bill(
        start=start,
        end=end,
        tz=BERLIN,
        currency="EUR",
        intervals=[MeterInterval("m1", start, end, readings)],
        versions=[v],
        occupied=[],
    )
    # night: 1.0000 (05-06) + 2.0000 (22-24) = 3.0000 x 0.10 = 0.30;
    # day: 1.0001 + 8 = 9.0001 x 0.30 = 2.70003 -> 2.70
    assert lines(bill) == [
        ("energy", "night", "3.0000", "0.10", "0.30"),
        ("energy", "day", "9.0001", "0.30", "2.70"),
    ]
    # the band edges themselves, in the zone: 05:00-06:00 night, 06:00-22:00 day, 22:00-24:00 night
    segs = band_segments(v.spec, start, end, BERLIN)
    assert segs == [
        (at(2026, 11, 3, 5), at(2026, 11, 3, 6), "night"),
        (at(2026, 11, 3, 6), at(2026, 11, 3, 22), "day"),
        (at(2026, 11, 3, 22), at(2026, 11, 4), "night"),
    ]


def test_counter_reset_meter_replaced_and_tenant_moving_out():
    # November 2026, flat 0.25/kWh, 1.00/day, tax 7 %. Unit U: meter A until the 10th 12:00, then
    # meter B. Tenant 1 from the 1st, moves out on the 15th at 12:00; tenant 2 moves in on the 16th.
    # Meter A: 5000 on the 1st, 5040 on the 5th, then reset: 2.0000 on the 6th (below 10 % of 5040, so
    # counted from 0: +2), 47.0000 on the 10th 12:00: A used 40 + 2 + 45 = 87 kWh.
    # Meter B: 0.5000 on the 10th 12:00, 95.5000 on the 20th 00:00 (228 hours later), 205.5000 on 1 Dec.
    v = TariffVersion(dt.date(2026, 11, 1), parse_spec(flat("0.25", "1.00", "0.07")), "basic")
    start, end = at(2026, 11, 1), at(2026, 12, 1)
    swap = at(2026, 11, 10, 12)
    a = [
        Reading(at(2026, 11, 1), kwh("5000")),
        Reading(at(2026, 11, 5), kwh("5040")),
        Reading(at(2026, 11, 6), kwh("2")),
        Reading(swap, kwh("47")),
    ]
    b = [Reading(swap, kwh("0.5")), Reading(at(2026, 11, 20), kwh("95.5")), Reading(end, kwh("205.5"))]
    out1 = at(2026, 11, 15, 12)
    in2 = at(2026, 11, 16)

    def bill_for(s: float, e: float):
        return compute_bill(
            start=start,
            end=end,
            tz=BERLIN,
            currency="EUR",
            intervals=[
                MeterInterval("A", max(s, start), min(e, swap), a),
                MeterInterval("B", max(s, swap), min(e, end), b),
            ],
            versions=[v],
            occupied=[(s, e)],
        )

    first = bill_for(start, out1)
    # B at the move-out, 120 of 228 hours after the swap: 0.5 + 95 x 120/228 = 50.5000 (interpolated)
    # tenant 1: 87 + 50 = 137 kWh x 0.25 = 34.25; 15 days (1st-15th) x 1.00 = 15.00; net 49.25;
    # tax 7 % = 3.4475 -> 3.45; total 52.70
    assert lines(first) == [
        ("energy", "energy", "137.0000", "0.25", "34.25"),
        ("standing", None, "15", "1.00", "15.00"),
        ("tax", None, "49.25", "0.07", "3.45"),
    ]
    assert first.total == Decimal("52.70")
    meter_a, meter_b = first.meters
    assert [e["kind"] for e in meter_a["events"]] == ["reset"]
    assert meter_a["kwh"] == "87.0000"
    assert meter_b["closing"] == {**meter_b["closing"], "kwh": "50.5000", "source": "interpolated"}
    assert meter_b["closing"]["interpolated"] is True

    second = bill_for(in2, end)
    # B on the 16th 00:00, 132 hours after the swap: 0.5 + 95 x 132/228 = 55.5000 (interpolated);
    # tenant 2: 205.5 - 55.5 = 150 kWh x 0.25 = 37.50; 15 days (16th-30th) = 15.00; net 52.50;
    # tax 3.675 -> 3.68; total 56.18
    assert lines(second) == [
        ("energy", "energy", "150.0000", "0.25", "37.50"),
        ("standing", None, "15", "1.00", "15.00"),
        ("tax", None, "52.50", "0.07", "3.68"),
    ]
    assert second.total == Decimal("56.18")
    assert [m["cid"] for m in second.meters] == ["B"]  # meter A does not count for tenant 2
    assert second.meters[0]["opening"]["kwh"] == "55.5000"
    assert second.meters[0]["opening"]["source"] == "interpolated"


def test_tiered_blocks_per_billing_period():
    # 250 kWh in the month: the first 100 at 0.20 = 20.00, the other 150 at 0.30 = 45.00.
    spec = parse_spec(
        {
            "kind": "tiered",
            "tiers": [{"up_to_kwh": "100", "rate": "0.20"}, {"up_to_kwh": None, "rate": "0.30"}],
        }
    )
    start, end = at(2026, 11, 1), at(2026, 12, 1)
    readings = [Reading(start, 0), Reading(at(2026, 11, 10), kwh("60")), Reading(end, kwh("250"))]
    bill = compute_bill(
        start=start,
        end=end,
        tz=BERLIN,
        currency="EUR",
        intervals=[MeterInterval("m", start, end, readings)],
        versions=[TariffVersion(dt.date(2026, 1, 1), spec)],
        occupied=[],
    )
    assert lines(bill) == [
        ("energy", "tier 1", "100.0000", "0.20", "20.00"),
        ("energy", "tier 2", "150.0000", "0.30", "45.00"),
    ]
    assert bill.total == Decimal("65.00")


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (
            [
                {"days": "all", "start": "00:00", "end": "08:00", "band": "night"},
                {"days": "all", "start": "07:00", "end": "24:00", "band": "day"},
            ],
            "windows overlap on mon between 07:00 and 08:00",
        ),
        (
            [
                {"days": "all", "start": "00:00", "end": "07:00", "band": "night"},
                {"days": "mon-fri", "start": "07:00", "end": "24:00", "band": "day"},
            ],
            "windows leave a gap on sat from 07:00 to 24:00",
        ),
        ([{"days": "all", "start": "08:00", "end": "07:00", "band": "day"}], "is not after start"),
        ([{"days": "someday", "start": "00:00", "end": "24:00", "band": "day"}], "is not a weekday"),
        ([{"days": "all", "start": "00:00", "end": "24:00", "band": "nope"}], "is not one of the bands"),
    ],
)
def test_bad_time_of_use_windows_are_refused(windows, message):
    with pytest.raises(TariffError, match=message):
        parse_spec({"kind": "tou", "bands": {"day": "0.3", "night": "0.1"}, "windows": windows})


def test_bad_specs_and_no_tariff_in_effect():
    with pytest.raises(TariffError, match="expected a decimal number as a string"):
        parse_spec({"kind": "flat", "rate": 0.3})  # a float is not exact: refused
    with pytest.raises(TariffError, match="must be at least 0"):
        parse_spec({"kind": "flat", "rate": "-1"})
    with pytest.raises(TariffError, match="last tier must be open-ended"):
        parse_spec({"kind": "tiered", "tiers": [{"up_to_kwh": "5", "rate": "1"}]})
    v = TariffVersion(dt.date(2026, 11, 15), parse_spec(flat("0.3")), "late")
    with pytest.raises(BillError, match="no version in effect"):
        compute_bill(
            start=at(2026, 11, 1),
            end=at(2026, 12, 1),
            tz=BERLIN,
            currency="EUR",
            intervals=[],
            versions=[v],
            occupied=[],
        )
