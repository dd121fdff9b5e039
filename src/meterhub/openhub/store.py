"""Open hub state in the database: applications, users and bindings, API tokens, link credentials.

Synchronous functions on an Engine (the HTTP layer runs them in a worker thread; the CLI calls them).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError

from meterhub.openhub import schema as oh

_PBKDF2_ROUNDS = 60_000
_ALNUM = string.ascii_letters + string.digits


class OpenHubError(Exception):
    """A request the open hub refuses; ``code`` and ``msg`` follow Tuya's global error codes."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _kdf(salt: str, digest: str) -> str:
    return hashlib.pbkdf2_hmac("sha256", digest.lower().encode(), salt.encode(), _PBKDF2_ROUNDS).hex()


def random_text(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


# --- applications --------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class App:
    access_id: str
    secret: str
    name: str
    enabled: bool


def create_app(engine: Engine, name: str) -> App:
    app = App(random_text(20).lower(), random_text(32).lower(), name, True)
    try:
        with engine.begin() as conn:
            conn.execute(
                oh.apps.insert().values(
                    access_id=app.access_id,
                    secret=app.secret,
                    name=name,
                    enabled=True,
                    created_at=time.time(),
                )
            )
    except IntegrityError:
        raise OpenHubError(1109, f"an application named {name!r} already exists") from None
    return app


def get_app(engine: Engine, access_id: str) -> App | None:
    with engine.connect() as conn:
        row = conn.execute(select(oh.apps).where(oh.apps.c.access_id == access_id)).first()
    return App(row.access_id, row.secret, row.name, row.enabled) if row else None


# --- users and bindings --------------------------------------------------------------------------


def add_user(engine: Engine, username: str, password: str) -> str:
    """Create an end user; returns the uid."""
    uid = "u" + random_text(15).lower()
    salt = secrets.token_hex(16)
    md5 = hashlib.md5(password.encode()).hexdigest()
    try:
        with engine.begin() as conn:
            conn.execute(
                oh.users.insert().values(
                    uid=uid,
                    username=username,
                    salt=salt,
                    pw_md5=_kdf(salt, md5),
                    pw_sha256=_kdf(salt, _sha256(password)),
                    created_at=time.time(),
                )
            )
    except IntegrityError:
        raise OpenHubError(1109, f"a user named {username!r} already exists") from None
    return uid


def check_user(engine: Engine, username: str, digest: str, kind: str) -> str | None:
    """The uid if ``digest`` (md5 or sha256 hex of the password, per ``kind``) matches."""
    with engine.connect() as conn:
        row = conn.execute(select(oh.users).where(oh.users.c.username == username)).first()
    if row is None:
        _kdf("x" * 32, digest)  # same work either way
        return None
    stored = row.pw_md5 if kind == "md5" else row.pw_sha256
    return row.uid if hmac.compare_digest(stored, _kdf(row.salt, digest)) else None


def user_exists(engine: Engine, uid: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(oh.users.c.uid).where(oh.users.c.uid == uid)).first() is not None


def list_users(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(oh.users.c.uid, oh.users.c.username, oh.users.c.created_at)).all()
        bound = conn.execute(select(oh.bindings.c.uid, oh.bindings.c.cid)).all()
    devices: dict[str, list[str]] = {}
    for b in bound:
        devices.setdefault(b.uid, []).append(b.cid)
    return [
        {
            "uid": r.uid,
            "username": r.username,
            "created_at": r.created_at,
            "devices": sorted(devices.get(r.uid, [])),
        }
        for r in rows
    ]


def bind(engine: Engine, uid: str, cid: str) -> None:
    if not user_exists(engine, uid):
        raise OpenHubError(1000, f"no user {uid!r}")
    with engine.begin() as conn:
        exists = conn.execute(
            select(oh.bindings.c.uid).where(oh.bindings.c.uid == uid, oh.bindings.c.cid == cid)
        ).first()
        if not exists:
            conn.execute(oh.bindings.insert().values(uid=uid, cid=cid, created_at=time.time()))


def unbind(engine: Engine, uid: str, cid: str) -> bool:
    with engine.begin() as conn:
        res = conn.execute(delete(oh.bindings).where(oh.bindings.c.uid == uid, oh.bindings.c.cid == cid))
    return res.rowcount > 0


def all_bindings(engine: Engine) -> dict[str, set[str]]:
    """cid -> uids bound to it."""
    out: dict[str, set[str]] = {}
    with engine.connect() as conn:
        for r in conn.execute(select(oh.bindings.c.uid, oh.bindings.c.cid)):
            out.setdefault(r.cid, set()).add(r.uid)
    return out


# --- API tokens ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Token:
    access_token: str
    refresh_token: str
    expire: int  # seconds
    uid: str | None


def issue_token(engine: Engine, access_id: str, uid: str | None, ttl: int, now: float | None = None) -> Token:
    now = time.time() if now is None else now
    token = Token(secrets.token_hex(16), secrets.token_hex(16), ttl, uid)
    with engine.begin() as conn:
        conn.execute(
            oh.tokens.insert().values(
                token_hash=_sha256(token.access_token),
                refresh_hash=_sha256(token.refresh_token),
                access_id=access_id,
                uid=uid,
                expires_at=now + ttl,
                refresh_expires_at=now + 30 * 86400,
                revoked=False,
                created_at=now,
            )
        )
    return token


def check_token(engine: Engine, access_token: str, access_id: str, now: float | None = None) -> str | None:
    """The token's uid (``""`` for a project token); raises 1010 expired / 1011 invalid."""
    now = time.time() if now is None else now
    with engine.connect() as conn:
        row = conn.execute(select(oh.tokens).where(oh.tokens.c.token_hash == _sha256(access_token))).first()
    if row is None or row.revoked or row.access_id != access_id:
        raise OpenHubError(1011, "token invalid")
    if row.expires_at <= now:
        raise OpenHubError(1010, "token is expired")
    return row.uid or ""


def refresh_token(engine: Engine, refresh: str, access_id: str, ttl: int) -> Token:
    now = time.time()
    with engine.begin() as conn:
        row = conn.execute(select(oh.tokens).where(oh.tokens.c.refresh_hash == _sha256(refresh))).first()
        if row is None or row.revoked or row.access_id != access_id or row.refresh_expires_at <= now:
            raise OpenHubError(1011, "token invalid")
        conn.execute(update(oh.tokens).where(oh.tokens.c.token_hash == row.token_hash).values(revoked=True))
    return issue_token(engine, access_id, row.uid, ttl, now)


# --- links (MQTT / WebSocket credentials) --------------------------------------------------------


#: The least validity (seconds) a configuration call ever answers with. tuya-iot-py-sdk 0.6.6's
#: ``TuyaOpenMQ.run`` sleeps ``expire_time - 60`` seconds before asking again: below 60 the sleep
#: raises and its thread dies, just above it the SDK asks again at once. Credentials with less left
#: are replaced by fresh ones; ``openhub_link_ttl`` may not be set below this.
LINK_MIN_EXPIRE = 300


@dataclass(slots=True, frozen=True)
class Link:
    client_id: str
    uid: str
    link_id: str
    link_type: str
    username: str
    password: str
    msg_version: str
    source_topic: str
    sink_topic: str
    expires_at: float

    @property
    def key(self) -> bytes:
        return self.password[8:24].encode()


def _link(row: Any) -> Link:
    return Link(
        row.client_id,
        row.uid,
        row.link_id,
        row.link_type,
        row.username,
        row.password,
        row.msg_version,
        row.source_topic,
        row.sink_topic,
        row.expires_at,
    )


def link_client_id(uid: str, link_id: str) -> str:
    """Stable per (uid, link_id), so a renewing client takes over its own session."""
    return "oh" + hashlib.sha256(f"{uid}\0{link_id}".encode()).hexdigest()[:30]


def issue_link(
    engine: Engine,
    uid: str,
    link_id: str,
    link_type: str,
    msg_version: str,
    ttl: int,
    now: float | None = None,
) -> Link:
    """Credentials for one user and link. The password stays the same while more than half of its
    validity, and more than :data:`LINK_MIN_EXPIRE`, is left; after that a fresh one (full validity)
    is issued, so a client that renews shortly before expiry gets time to reconnect, and the
    ``expire_time`` answered is never below what Tuya's SDK needs (see :data:`LINK_MIN_EXPIRE`)."""
    now = time.time() if now is None else now
    keep_above = max(ttl / 2, LINK_MIN_EXPIRE)
    client_id = link_client_id(uid, link_id)
    with engine.begin() as conn:
        rows = conn.execute(
            select(oh.links)
            .where(
                oh.links.c.client_id == client_id,
                oh.links.c.link_type == link_type,
                oh.links.c.msg_version == msg_version,
                oh.links.c.expires_at > now + keep_above,
            )
            .order_by(oh.links.c.expires_at.desc())
        ).all()
        if rows:
            return _link(rows[0])
        conn.execute(delete(oh.links).where(oh.links.c.expires_at < now - 86400))
        row = {
            "id": secrets.token_hex(16),
            "client_id": client_id,
            "uid": uid,
            "link_id": link_id,
            "link_type": link_type,
            "username": f"ohu_{uid}",
            "password": random_text(32),
            "msg_version": msg_version,
            "source_topic": f"openhub/in/{client_id}",
            "sink_topic": f"openhub/out/{client_id}",
            "expires_at": now + ttl,
            "created_at": now,
        }
        conn.execute(oh.links.insert().values(**row))
    return _link(type("Row", (), row))


def find_link(
    engine: Engine, client_id: str, username: str, password: str, now: float | None = None
) -> tuple[Link | None, str]:
    """The link these MQTT credentials open, or (None, why)."""
    now = time.time() if now is None else now
    with engine.connect() as conn:
        rows = conn.execute(
            select(oh.links).where(oh.links.c.client_id == client_id, oh.links.c.username == username)
        ).all()
    match = [r for r in rows if hmac.compare_digest(r.password.encode(), password.encode())]
    if not match:
        return None, "bad credentials"
    live = [r for r in match if r.expires_at > now]
    if not live:
        return None, "credentials expired"
    return _link(max(live, key=lambda r: r.expires_at)), ""


# --- replay protection ---------------------------------------------------------------------------


def seen_key(kind: str, client_id: str, value: str) -> str:
    """The row key for a signature (``kind="sign"``) or a nonce (``kind="nonce"``) of one application."""
    return _sha256(f"{kind}\0{client_id}\0{value}")


def remember_request(engine: Engine, keys: list[str], expires_at: float) -> bool:
    """Record a signed request's keys; False if any of them was recorded before (a replay).

    The primary key decides, so two nodes given the same request at the same moment cannot both
    accept it: one insert wins, the other gets the unique violation.
    """
    try:
        with engine.begin() as conn:
            conn.execute(oh.seen_requests.insert(), [{"key": k, "expires_at": expires_at} for k in keys])
    except IntegrityError:
        return False
    return True


def purge_seen_requests(engine: Engine, now: float | None = None, limit: int = 1000) -> int:
    """Delete at most ``limit`` rows whose time window is over; returns how many were deleted."""
    now = time.time() if now is None else now
    t = oh.seen_requests
    oldest = select(t.c.key).where(t.c.expires_at < now).order_by(t.c.expires_at).limit(limit)
    with engine.begin() as conn:
        return conn.execute(delete(t).where(t.c.key.in_(oldest.scalar_subquery()))).rowcount
