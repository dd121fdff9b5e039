"""Alarm notifications: webhooks and e-mail, through a durable outbox (table ``notify_outbox``).

The alarm monitor adds one outbox row per fitting target (``notify_targets``: per site, level and
event -- ``raise``, ``escalate``, ``clear``) in the same group commit as the alarm change, so a restart
loses nothing. :class:`Notifier` runs the outbox: it claims due rows (a lease: ``next_at`` moves
forward; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL so the nodes of a cluster never send one row twice
at once), sends them, and marks them ``sent``, or retries with exponential backoff and jitter
(``backoff * 2^(attempt-1) * U(1, 1.25)``), or after ``max_attempts`` marks them ``dead`` (the
dead-letter list). The outbox rows are the notification log.

Webhook: ``POST`` of a JSON body, ``X-Meterhub-Timestamp`` (Unix seconds, also ``delivery.timestamp``
in the body) and ``X-Meterhub-Signature: sha256=<hex HMAC-SHA256 of the body with the target's
secret>``; any 2xx is success. E-mail: SMTP with STARTTLS (unless ``starttls`` is false), optional
login, one plain-text message per notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import smtplib
import ssl
import time
from email.message import EmailMessage
from typing import Any

import httpx
from sqlalchemy import Engine, delete, insert, select, update

from meterhub.logs import get_logger
from meterhub.storage import schema

log = get_logger(__name__)

OB = schema.notify_outbox
T = schema.notify_targets
EVENTS = ("raise", "escalate", "clear")
LEVELS = ("general", "serious", "urgent")
LEASE = 120.0


class TargetError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff_delay(base: float, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before retry number ``attempt`` (1: the first retry)."""
    return base * 2 ** (attempt - 1) * (1.0 + 0.25 * (rng or random).random())


# --- targets (API / CLI, blocking) ------------------------------------------------------------------


def _check_target(data: dict[str, Any]) -> dict[str, Any]:
    kind = data.get("kind")
    cfg = data.get("config") or {}
    if kind == "webhook":
        url = cfg.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise TargetError(422, "a webhook needs config.url (http:// or https://)")
        if not cfg.get("secret"):
            raise TargetError(422, "a webhook needs config.secret (the HMAC key)")
    elif kind == "email":
        for name in ("host", "sender", "to"):
            if not cfg.get(name):
                raise TargetError(422, f"an email target needs config.{name}")
        port = cfg.get("port", 587)
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise TargetError(422, "config.port must be 1..65535")
    else:
        raise TargetError(422, "kind must be webhook or email")
    for name, allowed in (("levels", LEVELS), ("events", EVENTS)):
        values = data.get(name)
        if not isinstance(values, list) or not values or any(v not in allowed for v in values):
            raise TargetError(422, f"{name}: a non-empty list of {', '.join(allowed)}")
    name = data.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 128:
        raise TargetError(422, "name: 1 to 128 characters")
    return data


def target_out(row: dict[str, Any]) -> dict[str, Any]:
    """A target without its secrets."""
    cfg = {k: ("***" if k in ("secret", "password") and v else v) for k, v in (row["config"] or {}).items()}
    return {**row, "config": cfg}


def create_target(engine: Engine, data: dict[str, Any]) -> dict[str, Any]:
    row = {
        "name": data.get("name"),
        "kind": data.get("kind"),
        "site_id": data.get("site_id"),
        "levels": data.get("levels") or list(LEVELS),
        "events": data.get("events") or list(EVENTS),
        "config": data.get("config") or {},
        "enabled": data.get("enabled", True),
    }
    _check_target(row)
    with engine.begin() as conn:
        if conn.execute(select(T.c.id).where(T.c.name == row["name"])).first() is not None:
            raise TargetError(409, f"target {row['name']!r} exists")
        new_id = conn.execute(insert(T).values(**row, created_at=time.time())).inserted_primary_key[0]
        return dict(conn.execute(select(T).where(T.c.id == new_id)).one()._mapping)


def list_targets(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(T).order_by(T.c.id)).all()]


def delete_target(engine: Engine, target_id: int) -> None:
    with engine.begin() as conn:
        if conn.execute(delete(T).where(T.c.id == target_id)).rowcount != 1:
            raise TargetError(404, f"target {target_id} not found")


def outbox(
    engine: Engine, status: str | None = None, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    """The notification log (newest first); ``status="dead"``: the dead letters."""
    q = select(OB).order_by(OB.c.id.desc()).limit(limit).offset(offset)
    if status is not None:
        q = q.where(OB.c.status == status)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q).all()]


def retry_dead(engine: Engine, outbox_id: int) -> dict[str, Any]:
    """Put a dead letter back in the queue (attempts start again)."""
    with engine.begin() as conn:
        res = conn.execute(
            update(OB)
            .where(OB.c.id == outbox_id, OB.c.status == "dead")
            .values(status="pending", attempts=0, next_at=time.time(), done_at=None)
        )
        if res.rowcount != 1:
            raise TargetError(404, f"no dead letter {outbox_id}")
        return dict(conn.execute(select(OB).where(OB.c.id == outbox_id)).one()._mapping)


# --- the outbox runner --------------------------------------------------------------------------------


class Notifier:
    """Fills the outbox from alarm changes (:meth:`outbox_ops`, in the event loop) and sends it."""

    def __init__(
        self,
        engine: Engine,
        node: str = "local",
        backoff: float = 5.0,
        max_attempts: int = 6,
        poll: float = 1.0,
    ) -> None:
        self.engine = engine
        self.node = node
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.poll = poll
        self.targets: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.client: httpx.AsyncClient | None = None
        self.sent = 0
        self.failed = 0
        self.dead = 0
        self._refreshed = 0.0

    def load_targets(self) -> None:
        """Read the targets (blocking)."""
        self.targets = [t for t in list_targets(self.engine) if t["enabled"]]
        self._refreshed = time.monotonic()

    def outbox_ops(self, event: str, alarm: Any, site_id: int | None) -> list[tuple[str, dict[str, Any]]]:
        now = time.time()
        level = alarm.level or "general"
        payload = {"event": event, "site_id": site_id, "alarm": alarm.as_dict()}
        ops = []
        for t in self.targets:
            if t["site_id"] is not None and t["site_id"] != site_id:
                continue
            if level not in t["levels"] or event not in t["events"]:
                continue
            ops.append(
                (
                    "notify",
                    {
                        "target_id": t["id"],
                        "alarm_id": alarm.id,
                        "event": event,
                        "payload": payload,
                        "status": "pending",
                        "attempts": 0,
                        "next_at": now,
                        "created_at": now,
                    },
                )
            )
        if ops:
            with contextlib.suppress(RuntimeError):  # no loop: the poll finds them
                asyncio.get_running_loop().call_later(0.05, self.wake.set)  # after the commit, usually
        return ops

    async def start(self) -> None:
        await asyncio.to_thread(self.load_targets)
        self.client = httpx.AsyncClient(timeout=10.0)
        self.task = asyncio.get_running_loop().create_task(self._run(), name="meterhub-notify")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.client is not None:
            await self.client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                if time.monotonic() - self._refreshed > 10.0:
                    await asyncio.to_thread(self.load_targets)
                while await self.run_once():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("notification outbox failed")
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll)

    async def run_once(self) -> int:
        """Claim and send the due rows; returns how many were claimed."""
        rows = await asyncio.to_thread(self._claim, 20)
        if rows:
            await asyncio.gather(*(self._deliver(row) for row in rows))
        return len(rows)

    def _claim(self, limit: int) -> list[dict[str, Any]]:
        now = time.time()
        with self.engine.begin() as conn:
            q = select(OB).where(OB.c.status == "pending", OB.c.next_at <= now).order_by(OB.c.id).limit(limit)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            rows = [dict(r._mapping) for r in conn.execute(q).all()]
            if not rows:
                return []
            ids = [r["id"] for r in rows]
            conn.execute(update(OB).where(OB.c.id.in_(ids)).values(next_at=now + LEASE, claimed_by=self.node))
            targets = {
                r.id: dict(r._mapping)
                for r in conn.execute(select(T).where(T.c.id.in_({r["target_id"] for r in rows}))).all()
            }
        for row in rows:
            row["target"] = targets.get(row["target_id"])
        return rows

    async def _deliver(self, row: dict[str, Any]) -> None:
        target = row["target"]
        attempt = row["attempts"] + 1
        error: str | None = None
        try:
            if target is None:
                error = "target deleted"
            elif target["kind"] == "webhook":
                error = await self._webhook(target, row, attempt)
            else:
                error = await asyncio.to_thread(self._email, target, row)
        except Exception as exc:  # a target's failure is recorded, never raised
            error = f"{type(exc).__name__}: {exc}"
        await asyncio.to_thread(self._record, row, attempt, error)

    async def _webhook(self, target: dict[str, Any], row: dict[str, Any], attempt: int) -> str | None:
        assert self.client is not None
        cfg = target["config"]
        ts = str(int(time.time()))
        body = json.dumps(
            {**row["payload"], "delivery": {"id": row["id"], "attempt": attempt, "timestamp": int(ts)}},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "meterhub",
            "X-Meterhub-Timestamp": ts,
            "X-Meterhub-Signature": sign(cfg["secret"], body),
            "X-Meterhub-Event": row["event"],
        }
        resp = await self.client.post(cfg["url"], content=body, headers=headers)
        return None if 200 <= resp.status_code < 300 else f"HTTP {resp.status_code}"

    def _email(self, target: dict[str, Any], row: dict[str, Any]) -> str | None:
        cfg = target["config"]
        alarm = row["payload"]["alarm"]
        msg = EmailMessage()
        msg["From"] = cfg["sender"]
        to = cfg["to"] if isinstance(cfg["to"], list) else [cfg["to"]]
        msg["To"] = ", ".join(to)
        msg["Subject"] = (
            f"[meterhub] {row['event']}: {alarm['label']} ({alarm['level'] or 'general'}) on {alarm['cid']}"
        )
        msg.set_content(json.dumps(row["payload"], indent=2, sort_keys=True))
        context = ssl.create_default_context(cafile=cfg.get("ca_file"))
        with smtplib.SMTP(cfg["host"], int(cfg.get("port", 587)), timeout=15) as smtp:
            smtp.ehlo()
            if cfg.get("starttls", True):
                smtp.starttls(context=context)
                smtp.ehlo()
            if cfg.get("username"):
                smtp.login(cfg["username"], cfg.get("password") or "")
            smtp.send_message(msg)
        return None

    def _record(self, row: dict[str, Any], attempt: int, error: str | None) -> None:
        now = time.time()
        if error is None:
            values: dict[str, Any] = {
                "status": "sent",
                "attempts": attempt,
                "done_at": now,
                "last_error": None,
            }
            self.sent += 1
        elif attempt >= self.max_attempts:
            values = {"status": "dead", "attempts": attempt, "done_at": now, "last_error": error[:2000]}
            self.dead += 1
            log.warning("notification dead", id=row["id"], target=row["target_id"], error=error[:200])
        else:
            delay = backoff_delay(self.backoff, attempt)
            values = {"attempts": attempt, "next_at": now + delay, "last_error": error[:2000]}
            self.failed += 1
        with self.engine.begin() as conn:
            mine = (OB.c.id == row["id"]) & (OB.c.claimed_by == self.node)
            conn.execute(update(OB).where(mine).values(**values))
