"""One bill: energy per tariff band and version, standing charges, tax, total; all Decimal.

Inputs are plain data (no database): the bill's span ``[start, end)``, the site's zone and currency,
the meter intervals that count (a meter in the unit, intersected with the tenant's occupancy), the
tariff's versions, and the occupied spans (for standing charges).

- Energy of a meter interval ``[s, e)`` is ``E(e) - E(s)`` of its :class:`CounterSeries`; the interval
  is cut at every tariff-version start and every time-of-use window edge, and each piece is billed at
  its version's band rate. Readings at the cuts are interpolated (and marked so).
- Tiered tariffs: the kWh of the bill, in time order, fill the tiers of the version in effect.
- Standing charge: one per local day whose midnight falls inside an occupied span (so on a move-in
  or move-out day exactly one of the two tenants pays it), at the version in effect that day.
- Tax: per tax rate, rate x the sum of the rounded net lines, rounded once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from meterhub.billing.meter import CounterSeries, Point
from meterhub.billing.money import KWH, round_money
from meterhub.billing.tariff import TariffSpec, band_segments, local_instant
from meterhub.core.energy import SCALE, Reading

__all__ = [
    "Bill",
    "BillError",
    "MeterInterval",
    "TariffVersion",
    "compute_bill",
    "energy_charge",
    "version_spans",
]


class BillError(ValueError):
    """A bill that cannot be computed (e.g. no tariff in effect)."""


@dataclass(slots=True, frozen=True)
class TariffVersion:
    effective_from: dt.date
    spec: TariffSpec
    tariff: str = "tariff"


@dataclass(slots=True)
class MeterInterval:
    """Meter ``cid`` counts for ``[start, end)``; ``readings`` include the neighbours outside it."""

    cid: str
    start: float
    end: float
    readings: Sequence[Reading]


@dataclass(slots=True)
class Bill:
    currency: str
    start: float
    end: float
    meters: list[dict[str, Any]] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)
    kwh_total: Decimal = Decimal(0)
    net_total: Decimal = Decimal(0)
    tax_total: Decimal = Decimal(0)
    total: Decimal = Decimal(0)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "start": self.start,
            "end": self.end,
            "meters": self.meters,
            "lines": self.lines,
            "kwh_total": str(self.kwh_total),
            "net_total": str(self.net_total),
            "tax_total": str(self.tax_total),
            "total": str(self.total),
            "warnings": self.warnings,
        }


def version_spans(
    versions: Sequence[TariffVersion], start: float, end: float, tz: ZoneInfo
) -> list[tuple[float, float, int]]:
    """``[start, end)`` cut at the versions' effective dates: ``(from, to, index into versions)``."""
    if not versions:
        raise BillError("no tariff: give the site (or the unit) a tariff first")
    order = sorted(range(len(versions)), key=lambda i: versions[i].effective_from)
    starts = [local_instant(versions[i].effective_from, 0, tz) for i in order]
    if starts[0] > start:
        first = dt.datetime.fromtimestamp(start, tz).isoformat()
        raise BillError(
            f"tariff {versions[order[0]].tariff!r} has no version in effect at {first} "
            f"(its first starts {versions[order[0]].effective_from})"
        )
    out: list[tuple[float, float, int]] = []
    for k, i in enumerate(order):
        s = max(starts[k], start)
        e = min(starts[k + 1] if k + 1 < len(order) else end, end)
        if e > s:
            out.append((s, e, i))
    return out


def _kwh(raw: int) -> Decimal:
    return Decimal(raw).scaleb(-SCALE)


def _point(p: Point | None, tz: ZoneInfo) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "t": p.t,
        "t_iso": dt.datetime.fromtimestamp(p.t, tz).isoformat(),
        "kwh": str(_kwh(p.counter)),
        "source": p.source,
        "interpolated": p.source == "interpolated",
    }


def compute_bill(
    *,
    start: float,
    end: float,
    tz: ZoneInfo,
    currency: str,
    intervals: Sequence[MeterInterval],
    versions: Sequence[TariffVersion],
    occupied: Sequence[tuple[float, float]],
) -> Bill:
    bill = Bill(currency, start, end)
    spans = version_spans(versions, start, end, tz)
    # (t, version index, band, raw kWh) pieces, in time order
    pieces: list[tuple[float, int, str, int]] = []
    for iv in sorted(intervals, key=lambda iv: (iv.start, iv.cid)):
        s, e = max(iv.start, start), min(iv.end, end)
        if e <= s:
            continue
        series = CounterSeries(iv.readings)
        opening, closing = series.at(s), series.at(e)
        entry: dict[str, Any] = {
            "cid": iv.cid,
            "from": s,
            "to": e,
            "opening": _point(opening, tz),
            "closing": _point(closing, tz),
            "kwh": "0",
            "events": [
                {
                    "t": ev.t,
                    "kind": ev.kind,
                    "before_kwh": str(_kwh(ev.before)),
                    "after_kwh": str(_kwh(ev.after)),
                }
                for ev in series.events_in(s, e)
            ],
        }
        bill.meters.append(entry)
        if opening is None or closing is None:
            bill.warnings.append(f"meter {iv.cid} has no energy readings: nothing billed for it")
            continue
        if opening.source == "before_first" or closing.source == "after_last":
            bill.warnings.append(
                f"meter {iv.cid}: no reading on one side of the period; consumption there is unknown"
            )
        entry["kwh"] = str(_kwh(closing.cum - opening.cum))
        pieces.extend(_pieces(series, s, e, spans, versions, tz))
    pieces.sort(key=lambda p: p[0])

    # energy lines, keyed (version, band or tier) in order of first appearance
    energy: dict[tuple[int, str], tuple[Decimal, Decimal]] = {}
    tier_used = Decimal(0)
    for _t, vi, band, raw in pieces:
        spec = versions[vi].spec
        kwh = _kwh(raw)
        if spec.kind == "tiered":
            remaining = kwh
            for k, tier in enumerate(spec.tiers):
                if remaining <= 0:
                    break
                top = tier.up_to_kwh
                room = remaining if top is None else min(remaining, max(Decimal(0), top - tier_used))
                if room > 0:
                    key = (vi, f"tier {k + 1}")
                    q, _ = energy.get(key, (Decimal(0), tier.rate))
                    energy[key] = (q + room, tier.rate)
                    remaining -= room
                    tier_used += room
        else:
            q, _ = energy.get((vi, band), (Decimal(0), spec.energy_rate(band)))
            energy[(vi, band)] = (q + kwh, spec.energy_rate(band))
        bill.kwh_total += kwh

    net_by_tax: dict[Decimal, Decimal] = {}
    for (vi, band), (qty, rate) in energy.items():
        v = versions[vi]
        amount = round_money(qty * rate, currency)
        qty = qty.quantize(KWH)  # exact already: multiples of 0.0001
        bill.lines.append(_line("energy", f"Energy, {band}", v, band, qty, "kWh", rate, amount))
        net_by_tax[v.spec.tax_rate] = net_by_tax.get(v.spec.tax_rate, Decimal(0)) + amount

    for vs, ve, vi in spans:
        v = versions[vi]
        if v.spec.standing_charge_per_day == 0:
            continue
        days = _occupied_midnights(vs, ve, occupied, tz)
        if days == 0:
            continue
        rate = v.spec.standing_charge_per_day
        amount = round_money(rate * days, currency)
        bill.lines.append(_line("standing", "Standing charge", v, None, Decimal(days), "day", rate, amount))
        net_by_tax[v.spec.tax_rate] = net_by_tax.get(v.spec.tax_rate, Decimal(0)) + amount

    bill.net_total = sum((line_amount(line) for line in bill.lines), Decimal(0))
    for rate, net in net_by_tax.items():
        if rate == 0:
            continue
        tax = round_money(net * rate, currency)
        bill.lines.append(
            {
                "kind": "tax",
                "description": f"Tax {(rate * 100).normalize():f} % of {net}",
                "tariff": None,
                "effective_from": None,
                "band": None,
                "quantity": str(net),
                "unit": currency,
                "unit_price": str(rate),
                "amount": str(tax),
            }
        )
        bill.tax_total += tax
    bill.total = bill.net_total + bill.tax_total
    return bill


def _pieces(
    series: CounterSeries,
    s: float,
    e: float,
    spans: Sequence[tuple[float, float, int]],
    versions: Sequence[TariffVersion],
    tz: ZoneInfo,
) -> list[tuple[float, int, str, int]]:
    """``[s, e)`` of one meter cut at version starts and band edges: ``(from, version, band, raw kWh)``."""
    out: list[tuple[float, int, str, int]] = []
    for vs, ve, vi in spans:
        a, b = max(vs, s), min(ve, e)
        if b <= a:
            continue
        for ps, pe, band in band_segments(versions[vi].spec, a, b, tz):
            p0, p1 = series.at(ps), series.at(pe)
            assert p0 is not None and p1 is not None
            out.append((ps, vi, band, p1.cum - p0.cum))
    return out


def energy_charge(
    series: CounterSeries, start: float, end: float, versions: Sequence[TariffVersion], tz: ZoneInfo
) -> tuple[Decimal, Decimal]:
    """Exact (unrounded) ``(kWh, cost including tax)`` of ``[start, end)`` for prepaid accounts: each
    band at its version's rate (tiered: the first tier's rate), times ``1 + tax_rate``. No standing
    charge. The products of 0.0001 kWh and decimal prices are exact, so nothing is rounded."""
    if not series or end <= start:
        return Decimal(0), Decimal(0)
    spans = version_spans(versions, start, end, tz)
    kwh = cost = Decimal(0)
    for _t, vi, band, raw in _pieces(series, start, end, spans, versions, tz):
        spec = versions[vi].spec
        k = _kwh(raw)
        kwh += k
        cost += k * spec.energy_rate(band) * (1 + spec.tax_rate)
    return kwh, cost


def line_amount(line: dict[str, Any]) -> Decimal:
    return Decimal(line["amount"])


def _line(
    kind: str,
    description: str,
    v: TariffVersion,
    band: str | None,
    qty: Decimal,
    unit: str,
    price: Decimal,
    amount: Decimal,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "description": f"{description} ({v.tariff} from {v.effective_from.isoformat()})",
        "tariff": v.tariff,
        "effective_from": v.effective_from.isoformat(),
        "band": band,
        "quantity": str(qty),
        "unit": unit,
        "unit_price": str(price),
        "amount": str(amount),
    }


def _occupied_midnights(
    start: float, end: float, occupied: Sequence[tuple[float, float]], tz: ZoneInfo
) -> int:
    """Local midnights in ``[start, end)`` that fall inside an occupied span ``[from, to)``."""
    day = dt.datetime.fromtimestamp(start, tz).date()
    count = 0
    while True:
        m = local_instant(day, 0, tz)
        if m >= end:
            return count
        if m >= start and any(a <= m < b for a, b in occupied):
            count += 1
        day += dt.timedelta(days=1)
