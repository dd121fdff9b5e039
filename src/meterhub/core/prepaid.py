"""Prepaid meters: a credit balance per meter that falls with consumption, top-ups, a low-credit alarm,
and the meter's switch (dp 1) turned off at zero and on again after a top-up.

State is in the database (``prepaid_accounts``, ``prepaid_topups``, ``audit_log``), not in one process:

- **Balance** in the site's currency (``mode = "currency"``) or in kWh (``mode = "kwh"``), a decimal
  string kept exact (never rounded; shown rounded to the currency's minor unit). Consumption is charged
  from the cumulative counters (:class:`meterhub.billing.meter.CounterSeries`: resets, rebases and
  glitches as the energy service sees them) up to the newest reading, at the meter's tariff (the unit's,
  else the site's): each time-of-use band at its rate, tax included; no standing charge (documented
  in docs/operators.md). ``charged_t`` says up to when; an update only applies if ``charged_t`` is still
  what it read, so two nodes never charge the same energy twice.
- **Low credit**: balance at or below ``low_threshold`` raises a ``threshold`` alarm labelled
  ``low_credit`` (through the alarm monitor, so it is listed with the others); a top-up above the
  threshold clears it.
- **Switch**: at a balance of 0 or less the meter is switched off (``switch = false``) unless a grace
  rule holds (``{"nights": {"from": "20:00", "to": "08:00"}, "weekends": true, "holidays":
  ["2026-12-25"]}``, in the site's zone); when the balance is above 0 again it is switched on (only if
  prepaid switched it off). Commands go through ``ProtocolService.send_command``. A meter that is offline
  is not sent anything; the command is retried when it comes back online (presence event) and every
  ``retry_interval`` seconds while it is online but does not answer. Every attempt and its outcome
  is in ``command_attempts`` / ``last_command_status`` and in the audit log (and in the command log).
- **When**: an account is processed when its meter reports energy to this node, comes back online,
  has a switch command due, or after a top-up or a change; every account once a minute
  (``sweep_interval``: readings stored by other nodes, a grace window that ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, insert, select, update

from meterhub.billing.engine import BillError, energy_charge
from meterhub.billing.meter import CounterSeries
from meterhub.billing.money import MoneyError, parse_decimal, round_money
from meterhub.core import sites
from meterhub.core.sites import PMError, audit
from meterhub.logs import get_logger
from meterhub.storage import schema

log = get_logger(__name__)

P, TU = schema.prepaid_accounts, schema.prepaid_topups
MODES = ("currency", "kwh")
SWITCH_DP = "1"
ENERGY_DPS = frozenset({"44", "50"})
LOW_LABEL = "low_credit"


# --- grace rules ---------------------------------------------------------------------------------


def parse_grace(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PMError(422, "grace: expected an object like {'nights': {'from': '20:00', 'to': '08:00'}}")
    out: dict[str, Any] = {}
    unknown = set(data) - {"nights", "weekends", "holidays"}
    if unknown:
        raise PMError(422, f"grace: unknown rule(s) {sorted(unknown)} (nights, weekends, holidays)")
    nights = data.get("nights")
    if nights is not None:
        if not isinstance(nights, dict):
            raise PMError(422, "grace.nights: expected {'from': 'HH:MM', 'to': 'HH:MM'}")
        from meterhub.billing.tariff import TariffError, _minutes

        try:
            a = _minutes(nights.get("from"), "grace.nights.from")
            b = _minutes(nights.get("to"), "grace.nights.to")
        except TariffError as exc:
            raise PMError(422, str(exc)) from None
        if a == b:
            raise PMError(422, "grace.nights: from and to are the same time")
        out["nights"] = {"from": nights["from"], "to": nights["to"], "_a": a, "_b": b}
    if data.get("weekends") is not None:
        if not isinstance(data["weekends"], bool):
            raise PMError(422, "grace.weekends: true or false")
        out["weekends"] = data["weekends"]
    holidays = data.get("holidays")
    if holidays is not None:
        if not isinstance(holidays, list) or len(holidays) > 366:
            raise PMError(422, "grace.holidays: a list of up to 366 dates YYYY-MM-DD")
        days = []
        for h in holidays:
            try:
                days.append(dt.date.fromisoformat(h).isoformat())
            except (TypeError, ValueError):
                raise PMError(422, f"grace.holidays: {h!r} is not a date YYYY-MM-DD") from None
        out["holidays"] = sorted(set(days))
    return out


def grace_reason(grace: dict[str, Any], t: float, tz: ZoneInfo) -> str | None:
    """Why the meter must stay on at ``t`` (a grace rule that holds), or None."""
    local = dt.datetime.fromtimestamp(t, tz)
    if local.date().isoformat() in grace.get("holidays", ()):
        return "public holiday"
    if grace.get("weekends") and local.weekday() >= 5:
        return "weekend"
    nights = grace.get("nights")
    if nights:
        m = local.hour * 60 + local.minute
        a, b = nights["_a"], nights["_b"]
        inside = (a <= m < b) if a < b else (m >= a or m < b)
        if inside:
            return "night"
    return None


def _public_grace(grace: dict[str, Any]) -> dict[str, Any]:
    out = dict(grace)
    if "nights" in out:
        out["nights"] = {"from": out["nights"]["from"], "to": out["nights"]["to"]}
    return out


# --- accounts ------------------------------------------------------------------------------------


def _account_row(conn: Any, cid: str) -> dict[str, Any]:
    row = conn.execute(select(P).where(P.c.cid == cid)).first()
    if row is None:
        raise PMError(404, f"meter {cid!r} has no prepaid account")
    return dict(row._mapping)


def account_out(row: dict[str, Any], currency: str) -> dict[str, Any]:
    balance = Decimal(row["balance"])
    shown = (
        round_money(balance, currency) if row["mode"] == "currency" else balance.quantize(Decimal("0.0001"))
    )
    return {
        "cid": row["cid"],
        "site_id": row["site_id"],
        "mode": row["mode"],
        "unit": currency if row["mode"] == "currency" else "kWh",
        "balance": str(shown),
        "balance_exact": str(balance),
        "low_threshold": row["low_threshold"],
        "low_credit": bool(row["low_alarm"]),
        "grace": _public_grace(row["grace"] or {}),
        "charged_until": row["charged_t"],
        "switch_wanted": row["switch_wanted"],
        "switch_state": row["switch_state"],
        "command_attempts": row["command_attempts"],
        "last_command_at": row["last_command_at"],
        "last_command_status": row["last_command_status"],
    }


def _site_currency(conn: Any, site_id: int) -> tuple[str, ZoneInfo]:
    site = conn.execute(select(schema.sites).where(schema.sites.c.id == site_id)).first()
    return site.currency, ZoneInfo(site.timezone)


def get_account(engine: Engine, cid: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = _account_row(conn, cid)
        return account_out(row, _site_currency(conn, row["site_id"])[0])


def list_accounts(engine: Engine, site_id: int | None = None) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        q = select(P).order_by(P.c.cid)
        if site_id is not None:
            q = q.where(P.c.site_id == site_id)
        return [
            account_out(dict(r._mapping), _site_currency(conn, r.site_id)[0]) for r in conn.execute(q).all()
        ]


def configure(
    engine: Engine,
    cid: str,
    *,
    mode: str,
    low_threshold: Any,
    grace: Any,
    balance: Any,
    actor: str,
    now: float | None = None,
) -> dict[str, Any]:
    """Make ``cid`` prepaid (or change its settings). Consumption counts from the latest reading."""
    if mode not in MODES:
        raise PMError(422, f"mode: one of {', '.join(MODES)}")
    try:
        threshold = parse_decimal(low_threshold, "low_threshold", minimum=Decimal(0))
        initial = None if balance is None else parse_decimal(balance, "balance")
    except MoneyError as exc:
        raise PMError(422, str(exc)) from None
    rules = parse_grace(grace)
    now = time.time() if now is None else now
    info = sites.meter(engine, cid)
    if info["site_id"] is None:
        raise PMError(409, f"meter {cid!r} is in no unit: assign it to a unit (and so a site) first")
    with engine.begin() as conn:
        row = conn.execute(select(P).where(P.c.cid == cid)).first()
        # consumption is charged from the meter's latest reading (or from now, without one)
        latest = sites.meter_readings(conn, cid, now, now)
        since = latest[0].t if latest and latest[0].t <= now else now
        values = {"mode": mode, "low_threshold": str(threshold), "grace": rules, "updated_at": now}
        if row is None:
            conn.execute(
                insert(P).values(
                    cid=cid,
                    site_id=info["site_id"],
                    balance=str(initial or Decimal(0)),
                    charged_t=since,
                    low_alarm=False,
                    command_attempts=0,
                    created_at=now,
                    **values,
                )
            )
        else:
            if row.mode != mode and initial is None:
                raise PMError(409, "changing the mode needs a new balance (in the new unit)")
            if initial is not None:
                values["balance"] = str(initial)
            conn.execute(update(P).where(P.c.cid == cid).values(site_id=info["site_id"], **values))
        audit(
            conn,
            actor,
            "prepaid.configure",
            site_id=info["site_id"],
            target=cid,
            details={
                "mode": mode,
                "low_threshold": str(threshold),
                "grace": _public_grace(rules),
                "balance": balance,
            },
            at=now,
        )
        row2 = _account_row(conn, cid)
        return account_out(row2, _site_currency(conn, row2["site_id"])[0])


def topup(
    engine: Engine, cid: str, amount: Any, reference: str | None, actor: str, now: float | None = None
) -> dict[str, Any]:
    """Add credit: ``amount`` > 0 (currency or kWh, as the account). Recorded with who, when, reference."""
    try:
        value = parse_decimal(amount, "amount", positive=True)
    except MoneyError as exc:
        raise PMError(422, str(exc)) from None
    now = time.time() if now is None else now
    with engine.begin() as conn:
        row = _account_row(conn, cid)
        new = Decimal(row["balance"]) + value
        # conditional on the balance read, so a concurrent charge or top-up is never lost
        res = conn.execute(
            update(P)
            .where(P.c.cid == cid, P.c.balance == row["balance"])
            .values(balance=str(new), updated_at=now)
        )
        if res.rowcount != 1:
            raise PMError(409, "the balance changed meanwhile; try again")
        tid = conn.execute(
            insert(TU).values(
                cid=cid, amount=str(value), balance_after=str(new), reference=reference, actor=actor, at=now
            )
        ).inserted_primary_key[0]
        audit(
            conn,
            actor,
            "prepaid.topup",
            site_id=row["site_id"],
            target=cid,
            details={"id": tid, "amount": str(value), "reference": reference, "balance_after": str(new)},
            at=now,
        )
        out = account_out(_account_row(conn, cid), _site_currency(conn, row["site_id"])[0])
    out["topup_id"] = tid
    return out


def list_topups(engine: Engine, cid: str, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        _account_row(conn, cid)
        rows = conn.execute(
            select(TU).where(TU.c.cid == cid).order_by(TU.c.id.desc()).limit(limit).offset(offset)
        ).all()
    return [dict(r._mapping) for r in rows]


def _tariff_versions_for(conn: Any, cid: str) -> list[Any]:
    ma, u, s = schema.meter_assignments, schema.units, schema.sites
    row = conn.execute(
        select(u.c.tariff_id, s.c.tariff_id.label("site_tariff"))
        .select_from(ma.join(u, u.c.id == ma.c.unit_id).join(s, s.c.id == ma.c.site_id))
        .where(ma.c.cid == cid, ma.c.end_t.is_(None))
    ).first()
    tariff_id = None if row is None else (row.tariff_id or row.site_tariff)
    if tariff_id is None:
        return []
    return sites.tariff_versions(conn, tariff_id)


def charge(engine: Engine, cid: str) -> dict[str, Any] | None:
    """Charge the consumption since ``charged_t`` up to the newest reading; the account after it
    (None when there was nothing to charge or another node did it)."""
    with engine.connect() as conn:
        row = _account_row(conn, cid)
        tz = _site_currency(conn, row["site_id"])[1]
        since = row["charged_t"]
        readings = sites.meter_readings(conn, cid, since, 1e11)
        if not readings or readings[-1].t <= since:
            return None
        upto = readings[-1].t
        versions = _tariff_versions_for(conn, cid)
    series = CounterSeries(readings)
    if row["mode"] == "kwh":
        a, b = series.at(since), series.at(upto)
        assert a is not None and b is not None
        kwh = Decimal(b.cum - a.cum).scaleb(-4)
        debit = kwh
    else:
        if not versions:
            log.warning("prepaid meter without a tariff: nothing charged", cid=cid)
            return None
        try:
            kwh, debit = energy_charge(series, since, upto, versions, tz)
        except BillError as exc:
            log.warning("prepaid charge impossible", cid=cid, error=str(exc))
            return None
    new = Decimal(row["balance"]) - debit
    with engine.begin() as conn:
        res = conn.execute(
            update(P)
            .where(P.c.cid == cid, P.c.charged_t == since, P.c.balance == row["balance"])
            .values(balance=str(new), charged_t=upto, updated_at=time.time())
        )
        if res.rowcount != 1:
            return None
        out = dict(row)
        out.update(balance=str(new), charged_t=upto)
    out["_kwh"] = kwh
    return out


# --- the service ---------------------------------------------------------------------------------


class PrepaidService:
    """Charges prepaid accounts as readings arrive, raises low-credit alarms and switches meters."""

    interval = 5.0  # seconds between rounds over the accounts that need it (new readings, commands due)
    sweep_interval = 60.0  # seconds between rounds over every account (readings stored by other nodes)
    retry_interval = 30.0  # seconds between attempts at a command to an online meter that failed

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.engine: Engine = hub.engine
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()
        self._came_online: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._full = True
        self._last_sweep = 0.0
        self.rounds = 0

    async def start(self) -> None:
        handler = self.hub.handler
        if handler is not None and hasattr(handler, "listeners"):
            handler.listeners.append(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="meterhub-prepaid")

    async def stop(self) -> None:
        handler = self.hub.handler
        if handler is not None and self._on_event in getattr(handler, "listeners", []):
            handler.listeners.remove(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _on_event(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "report" and event["dp"].id_str in ENERGY_DPS:
            if len(self._dirty) < 100_000:
                self._dirty.add(event["cid"])
            self._wake.set()
        elif kind == "presence" and event.get("online"):
            if len(self._came_online) < 100_000:
                self._came_online.add(event["cid"])
            self._wake.set()

    def kick(self) -> None:
        """Process every account now (after a top-up or a configuration change)."""
        self._full = True
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            online, self._came_online = self._came_online, set()
            dirty, self._dirty = self._dirty, set()
            now = time.monotonic()
            full = self._full or now - self._last_sweep >= self.sweep_interval
            self._full = False
            if full:
                self._last_sweep = now
            try:
                if dirty and self.hub.writer is not None:
                    # Report events come when a report is submitted, not committed: wait until what
                    # was submitted so far is committed (a barrier), so charge() reads those readings.
                    await self.hub.writer.write([])
                cids = await asyncio.to_thread(self._cids, None if full else dirty | online)
                for cid in cids:
                    await self.process(cid, came_online=cid in online)
            except Exception:
                log.exception("prepaid round failed")
            self.rounds += 1

    def _cids(self, some: set[str] | None) -> list[str]:
        """Every account (``some`` None), or those in ``some`` and those with a switch command due."""
        with self.engine.connect() as conn:
            q = select(P.c.cid).order_by(P.c.cid)
            if some is not None:
                due = P.c.switch_wanted.is_not(None) & (
                    P.c.switch_state.is_(None) | (P.c.switch_state != P.c.switch_wanted)
                )
                q = q.where(due | P.c.cid.in_(sorted(some)[:10_000]) if some else due)
            return [r.cid for r in conn.execute(q)]

    async def process(self, cid: str, *, came_online: bool = False) -> None:
        await asyncio.to_thread(charge, self.engine, cid)
        row, _currency, tz = await asyncio.to_thread(self._read, cid)
        now = time.time()
        balance = Decimal(row["balance"])
        threshold = Decimal(row["low_threshold"])
        await self._low_alarm(row, balance, threshold, now)
        want: bool | None = row["switch_wanted"]
        reason = grace_reason(row["grace"] or {}, now, tz)
        if balance <= 0:
            # off, unless a grace rule holds it on (a meter already off stays off)
            want = False if reason is None or row["switch_state"] is False else None
        elif row["switch_state"] is False or row["switch_wanted"] is False:
            want = True  # credit again: on (only a meter prepaid switched off)
        if balance <= 0 and want is None and reason is not None:
            held = f"held on: {reason}"
            if row["last_command_status"] != held:
                await asyncio.to_thread(self._hold, cid, row, held)
            return
        if want != row["switch_wanted"]:
            await asyncio.to_thread(self._set_wanted, cid, want, row, reason)
            row["switch_wanted"] = want
            row["command_attempts"] = 0
            row["last_command_at"] = None
        if want is None or want == row["switch_state"]:
            return
        await self._command(cid, row, want, now, came_online)

    def _read(self, cid: str) -> tuple[dict[str, Any], str, ZoneInfo]:
        with self.engine.connect() as conn:
            row = _account_row(conn, cid)
            currency, tz = _site_currency(conn, row["site_id"])
        return row, currency, tz

    def _set_wanted(self, cid: str, want: bool | None, row: dict[str, Any], reason: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(P)
                .where(P.c.cid == cid)
                .values(
                    switch_wanted=want, command_attempts=0, last_command_at=None, last_command_status=None
                )
            )
            action = {True: "prepaid.switch_on_wanted", False: "prepaid.switch_off_wanted"}.get(
                want, "prepaid.switch_held"
            )
            audit(
                conn,
                "prepaid",
                action,
                site_id=row["site_id"],
                target=cid,
                details={"balance": row["balance"], "grace": reason},
            )

    def _hold(self, cid: str, row: dict[str, Any], held: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(P).where(P.c.cid == cid).values(last_command_status=held))
            audit(
                conn,
                "prepaid",
                "prepaid.switch_held",
                site_id=row["site_id"],
                target=cid,
                details={"balance": row["balance"], "grace": held},
            )

    async def _low_alarm(self, row: dict[str, Any], balance: Decimal, threshold: Decimal, now: float) -> None:
        low = balance <= threshold
        if low == bool(row["low_alarm"]):
            return
        if not await asyncio.to_thread(self._store_low, row, low, balance, threshold):
            return
        row["low_alarm"] = low
        monitor = getattr(self.hub, "alarms", None)
        if monitor is None:
            return
        # the alarm monitor's state lives in the event loop: raised / cleared here, written by its writer
        from meterhub.core.alarms import THRESHOLD, THRESHOLD_LEVEL

        await monitor.ensure(row["cid"])  # its stored alarms first (the monitor loads on demand)
        if low:
            details = {"balance": str(balance), "low_threshold": str(threshold), "mode": row["mode"]}
            monitor.raise_now(row["cid"], THRESHOLD, LOW_LABEL, THRESHOLD_LEVEL, now, details)
        else:
            monitor.clear_now(row["cid"], THRESHOLD, LOW_LABEL, now)

    def _store_low(self, row: dict[str, Any], low: bool, balance: Decimal, threshold: Decimal) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(
                update(P)
                .where(P.c.cid == row["cid"], P.c.low_alarm == bool(row["low_alarm"]))
                .values(low_alarm=low)
            )
            if res.rowcount != 1:
                return False  # another node saw it first
            audit(
                conn,
                "prepaid",
                "prepaid.low_credit" if low else "prepaid.credit_ok",
                site_id=row["site_id"],
                target=row["cid"],
                details={"balance": str(balance), "threshold": str(threshold)},
            )
        return True

    async def _command(
        self, cid: str, row: dict[str, Any], want: bool, now: float, came_online: bool
    ) -> None:
        handler = self.hub.handler
        dev = getattr(handler, "devices", {}).get(cid)
        online = dev is not None and dev.online
        if not online:
            if row["last_command_status"] != "waiting: meter offline":
                await asyncio.to_thread(self._record, cid, row, want, "waiting: meter offline", False)
            return
        last = row["last_command_at"]
        if last is not None and now - last < self.retry_interval and not came_online:
            return
        claimed = await asyncio.to_thread(self._claim, cid, last, now)
        if not claimed:
            return
        result = await handler.send_command(cid, SWITCH_DP, want)
        status = result.status if result.status == "ok" else f"{result.status}: {result.msg}"
        await asyncio.to_thread(
            self._record, cid, row, want, status, result.status == "ok", result.request_id
        )

    def _claim(self, cid: str, last: float | None, now: float) -> bool:
        """Take the next attempt (one node at a time: conditional on the last attempt's time)."""
        with self.engine.begin() as conn:
            cond = P.c.last_command_at.is_(None) if last is None else P.c.last_command_at == last
            res = conn.execute(
                update(P)
                .where(P.c.cid == cid, cond)
                .values(last_command_at=now, command_attempts=P.c.command_attempts + 1)
            )
            return res.rowcount == 1

    def _record(
        self, cid: str, row: dict[str, Any], want: bool, status: str, ok: bool, request_id: str | None = None
    ) -> None:
        with self.engine.begin() as conn:
            values: dict[str, Any] = {"last_command_status": status}
            if ok:
                values["switch_state"] = want
            conn.execute(update(P).where(P.c.cid == cid).values(**values))
            audit(
                conn,
                "prepaid",
                ("prepaid.switched_on" if want else "prepaid.switched_off")
                if ok
                else "prepaid.command_failed",
                site_id=row["site_id"],
                target=cid,
                details={
                    "switch": want,
                    "status": status,
                    "request_id": request_id,
                    "balance": row["balance"],
                },
            )
        log.info("prepaid switch", cid=cid, switch=want, status=status)
