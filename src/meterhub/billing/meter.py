"""A meter's cumulative consumption as a function of time, for bills split at any instant.

The counter logic is the energy service's (:func:`meterhub.core.energy.attribute`): readings sorted by
measurement time, a drop below 10 % of the previous reading is a reset (counted from 0), a smaller drop
a rebase (nothing counted), a low reading followed by a recovery a glitch (skipped). Here the result is
turned into a cleaned cumulative series ``E(t)`` (raw units, 0.0001 kWh) at the reading times; between
two readings ``E`` is interpolated linearly and rounded to a whole raw unit (ROUND_HALF_EVEN). Before
the first and after the last reading it is held (no consumption known there) and marked so.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from meterhub.core.energy import SCALE, EnergyEvent, Reading, attribute

__all__ = ["DIVISOR", "CounterSeries", "Point"]

DIVISOR = 10**SCALE


@dataclass(slots=True, frozen=True)
class Point:
    """The meter at one instant: ``counter`` is its register (raw units), ``cum`` the cleaned
    cumulative consumption; ``source`` is reading | interpolated | before_first | after_last."""

    t: float
    counter: int
    cum: int
    source: str

    @property
    def counter_kwh(self) -> Decimal:
        return Decimal(self.counter).scaleb(-SCALE)


class CounterSeries:
    def __init__(self, readings: Sequence[Reading]) -> None:
        self.events: list[EnergyEvent] = []
        self.times: list[float] = []
        self.counters: list[int] = []
        self.cums: list[int] = []
        if not readings:
            return
        ordered = sorted(readings, key=lambda r: r.t)
        times = sorted({r.t for r in ordered})
        att = attribute(ordered, [*times, times[-1] + 1.0])
        self.events = att.events
        glitches = {e.t for e in att.events if e.kind == "glitch"}
        last_raw = {r.t: r.raw for r in ordered}  # the last reading at each time wins
        cum = 0
        for i, t in enumerate(times):
            cum += int(att.sums[i] or 0)
            if t in glitches and 0 < i < len(times) - 1:
                continue
            self.times.append(t)
            self.counters.append(last_raw[t])
            self.cums.append(cum)

    def __bool__(self) -> bool:
        return bool(self.times)

    def at(self, t: float) -> Point | None:
        """The meter at instant ``t`` (None when there is no reading at all)."""
        times = self.times
        if not times:
            return None
        if t <= times[0]:
            return Point(t, self.counters[0], self.cums[0], "reading" if t == times[0] else "before_first")
        if t >= times[-1]:
            return Point(t, self.counters[-1], self.cums[-1], "reading" if t == times[-1] else "after_last")
        i = bisect.bisect_right(times, t) - 1
        if times[i] == t:
            return Point(t, self.counters[i], self.cums[i], "reading")
        t0, t1 = times[i], times[i + 1]
        c0, c1 = self.cums[i], self.cums[i + 1]
        exact = c0 + (c1 - c0) * (Fraction(t) - Fraction(t0)) / (Fraction(t1) - Fraction(t0))
        cum = int(
            (Decimal(exact.numerator) / Decimal(exact.denominator)).quantize(Decimal(1), ROUND_HALF_EVEN)
        )
        counter = self.counters[i + 1] - (c1 - cum)
        if counter < 0:
            counter = self.counters[i] + (cum - c0)
        return Point(t, counter, cum, "interpolated")

    def events_in(self, start: float, end: float) -> list[EnergyEvent]:
        return [e for e in self.events if start <= e.t < end]
