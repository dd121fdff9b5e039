"""Tariff specifications: what one version of a tariff charges, and its bands over time.

A specification (JSON, every number a decimal string)::

    {"kind": "flat", "rate": "0.30", "standing_charge_per_day": "0.45", "tax_rate": "0.19"}
    {"kind": "tou", "bands": {"peak": "0.40", "offpeak": "0.20"},
     "windows": [{"days": "mon-fri", "start": "07:00", "end": "22:00", "band": "peak"},
                 {"days": "mon-fri", "start": "22:00", "end": "24:00", "band": "offpeak"},
                 {"days": "mon-fri", "start": "00:00", "end": "07:00", "band": "offpeak"},
                 {"days": "sat-sun", "start": "00:00", "end": "24:00", "band": "offpeak"}], ...}
    {"kind": "tiered", "tiers": [{"up_to_kwh": "100", "rate": "0.25"}, {"up_to_kwh": null, "rate": "0.35"}]}

Time-of-use windows are ``[start, end)`` in local wall-clock time of the site's zone, per weekday; for
every weekday they must cover 00:00-24:00 exactly once (an overlap or a gap is refused). A wall-clock
time is turned into an instant with ``zoneinfo`` (``fold=0``): on the day clocks go forward, a window
edge inside the skipped hour falls on the change itself; on the day they go back, an edge in the
repeated hour is its first occurrence. So a day has 23 or 25 hours and every instant is in exactly one
band. Tiers are cumulative kWh within one billing period; the last tier has no upper bound.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from meterhub.billing.money import MoneyError, parse_decimal

__all__ = ["KINDS", "TariffError", "TariffSpec", "Tier", "Window", "band_segments", "parse_spec"]

KINDS = ("flat", "tou", "tiered")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WINDOWS = 100
MAX_TIERS = 20
DAY_MINUTES = 1440


class TariffError(ValueError):
    """A tariff specification that cannot be used (the message says why)."""


@dataclass(slots=True, frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after local midnight
    end: int  # exclusive, up to 1440
    band: str


@dataclass(slots=True, frozen=True)
class Tier:
    up_to_kwh: Decimal | None
    rate: Decimal


@dataclass(slots=True, frozen=True)
class TariffSpec:
    kind: str
    rate: Decimal | None
    bands: dict[str, Decimal]
    windows: tuple[Window, ...]
    tiers: tuple[Tier, ...]
    standing_charge_per_day: Decimal
    tax_rate: Decimal

    def energy_rate(self, band: str) -> Decimal:
        """The price per kWh of a band (flat: the rate; tiered: the first tier's)."""
        if self.kind == "tou":
            return self.bands[band]
        if self.kind == "tiered":
            return self.tiers[0].rate
        assert self.rate is not None
        return self.rate

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "flat":
            out["rate"] = str(self.rate)
        elif self.kind == "tou":
            out["bands"] = {k: str(v) for k, v in self.bands.items()}
            out["windows"] = [
                {
                    "days": [DAYS[d] for d in sorted(w.days)],
                    "start": _hhmm(w.start),
                    "end": _hhmm(w.end),
                    "band": w.band,
                }
                for w in self.windows
            ]
        else:
            out["tiers"] = [
                {"up_to_kwh": None if t.up_to_kwh is None else str(t.up_to_kwh), "rate": str(t.rate)}
                for t in self.tiers
            ]
        out["standing_charge_per_day"] = str(self.standing_charge_per_day)
        out["tax_rate"] = str(self.tax_rate)
        return out


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _num(data: dict[str, Any], key: str, *, default: str | None = None) -> Decimal:
    value = data.get(key, default)
    if value is None:
        raise TariffError(f"{key} is required")
    try:
        return parse_decimal(value, key, minimum=Decimal(0))
    except MoneyError as exc:
        raise TariffError(str(exc)) from None


def _minutes(text: Any, name: str) -> int:
    if not isinstance(text, str) or len(text) != 5 or text[2] != ":":
        raise TariffError(f"{name}: expected HH:MM, got {text!r}")
    try:
        h, m = int(text[:2]), int(text[3:])
    except ValueError:
        raise TariffError(f"{name}: expected HH:MM, got {text!r}") from None
    if not (0 <= m < 60 and (0 <= h < 24 or (h == 24 and m == 0))):
        raise TariffError(f"{name}: {text!r} is not a time of day (00:00 to 24:00)")
    return h * 60 + m


def _days(value: Any) -> frozenset[int]:
    items = value if isinstance(value, list) else [value]
    out: set[int] = set()
    for item in items:
        if not isinstance(item, str):
            raise TariffError(f"days: expected names like 'mon' or ranges like 'mon-fri', got {item!r}")
        word = item.strip().lower()
        if word in ("all", "daily", "every day"):
            out.update(range(7))
            continue
        a, _, b = word.partition("-")
        if a not in DAYS or (b and b not in DAYS):
            raise TariffError(f"days: {item!r} is not a weekday (mon..sun) or a range like 'mon-fri'")
        i, j = DAYS.index(a), DAYS.index(b or a)
        if j < i:
            raise TariffError(f"days: range {item!r} runs backwards")
        out.update(range(i, j + 1))
    if not out:
        raise TariffError("days: empty")
    return frozenset(out)


def parse_spec(data: Any) -> TariffSpec:
    """Validate a specification (see the module docstring); raises :class:`TariffError`."""
    if not isinstance(data, dict):
        raise TariffError("a tariff specification is a JSON object")
    kind = data.get("kind")
    if kind not in KINDS:
        raise TariffError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    standing = _num(data, "standing_charge_per_day", default="0")
    tax = _num(data, "tax_rate", default="0")
    if tax > 1:
        raise TariffError(f"tax_rate is a fraction (0.19 for 19 %), got {tax}")
    rate: Decimal | None = None
    bands: dict[str, Decimal] = {}
    windows: list[Window] = []
    tiers: list[Tier] = []
    if kind == "flat":
        rate = _num(data, "rate")
    elif kind == "tou":
        raw_bands = data.get("bands")
        if not isinstance(raw_bands, dict) or not raw_bands:
            raise TariffError("bands: a time-of-use tariff needs an object of band name -> rate")
        for name, value in raw_bands.items():
            if not isinstance(name, str) or not 1 <= len(name) <= 32:
                raise TariffError("bands: a band name is 1 to 32 characters")
            try:
                bands[name] = parse_decimal(value, f"bands.{name}", minimum=Decimal(0))
            except MoneyError as exc:
                raise TariffError(str(exc)) from None
        raw_windows = data.get("windows")
        if not isinstance(raw_windows, list) or not raw_windows or len(raw_windows) > MAX_WINDOWS:
            raise TariffError(f"windows: a list of 1 to {MAX_WINDOWS} windows is required")
        for k, w in enumerate(raw_windows):
            if not isinstance(w, dict):
                raise TariffError(f"windows[{k}]: expected an object")
            start = _minutes(w.get("start"), f"windows[{k}].start")
            end = _minutes(w.get("end"), f"windows[{k}].end")
            if end <= start:
                raise TariffError(
                    f"windows[{k}]: end {_hhmm(end)} is not after start {_hhmm(start)} "
                    "(split a window across midnight into two)"
                )
            band = w.get("band")
            if band not in bands:
                raise TariffError(f"windows[{k}]: band {band!r} is not one of the bands")
            windows.append(Window(_days(w.get("days", "all")), start, end, band))
        _check_coverage(windows)
    else:
        raw_tiers = data.get("tiers")
        if not isinstance(raw_tiers, list) or not raw_tiers or len(raw_tiers) > MAX_TIERS:
            raise TariffError(f"tiers: a list of 1 to {MAX_TIERS} tiers is required")
        last: Decimal = Decimal(0)
        for k, t in enumerate(raw_tiers):
            if not isinstance(t, dict):
                raise TariffError(f"tiers[{k}]: expected an object")
            up = t.get("up_to_kwh")
            final = k == len(raw_tiers) - 1
            if up is None:
                if not final:
                    raise TariffError(f"tiers[{k}]: only the last tier may be open-ended (up_to_kwh null)")
                limit = None
            else:
                if final:
                    raise TariffError(f"tiers[{k}]: the last tier must be open-ended (up_to_kwh null)")
                limit = _num(t, "up_to_kwh")
                if limit <= last:
                    raise TariffError(f"tiers[{k}]: up_to_kwh must grow from tier to tier")
                last = limit
            tiers.append(Tier(limit, _num(t, "rate")))
    return TariffSpec(kind, rate, bands, tuple(windows), tuple(tiers), standing, tax)


def _check_coverage(windows: list[Window]) -> None:
    for day in range(7):
        spans = sorted((w.start, w.end) for w in windows if day in w.days)
        at = 0
        for start, end in spans:
            if start < at:
                raise TariffError(
                    f"windows overlap on {DAYS[day]} between {_hhmm(start)} and {_hhmm(min(at, end))}"
                )
            if start > at:
                raise TariffError(f"windows leave a gap on {DAYS[day]} from {_hhmm(at)} to {_hhmm(start)}")
            at = end
        if at < DAY_MINUTES:
            raise TariffError(f"windows leave a gap on {DAYS[day]} from {_hhmm(at)} to 24:00")


def local_instant(day: dt.date, minutes: int, tz: ZoneInfo) -> float:
    """The instant of wall-clock ``minutes`` after midnight on ``day`` (1440: the next midnight)."""
    if minutes >= DAY_MINUTES:
        day, minutes = day + dt.timedelta(days=1), minutes - DAY_MINUTES
    return dt.datetime(day.year, day.month, day.day, minutes // 60, minutes % 60, tzinfo=tz).timestamp()


def band_segments(spec: TariffSpec, start: float, end: float, tz: ZoneInfo) -> list[tuple[float, float, str]]:
    """``[start, end)`` cut into ``(from, to, band)`` pieces (one piece named "energy" unless time-of-use)."""
    if end <= start:
        return []
    if spec.kind != "tou":
        return [(start, end, "energy")]
    out: list[tuple[float, float, str]] = []
    day = dt.datetime.fromtimestamp(start, tz).date() - dt.timedelta(days=1)
    last = dt.datetime.fromtimestamp(end, tz).date()
    while day <= last:
        weekday = day.weekday()
        for w in sorted((w for w in spec.windows if weekday in w.days), key=lambda w: w.start):
            s = max(local_instant(day, w.start, tz), start)
            e = min(local_instant(day, w.end, tz), end)
            if e <= s:
                continue
            if out and out[-1][2] == w.band and out[-1][1] == s:
                out[-1] = (out[-1][0], e, w.band)
            else:
                out.append((s, e, w.band))
        day += dt.timedelta(days=1)
    return out
