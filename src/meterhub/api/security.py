"""API tokens: bearer tokens with a scope, stored as sha256 hashes in ``api_tokens``.

- ``read``: GET (and HEAD) requests only; ``admin``: everything. A read token on any other method
  gets 403; no token, an unknown one or a revoked one gets 401.
- ``/healthz`` needs no token. ``/metrics`` needs a read token. ``/docs`` and ``/openapi.json`` are
  public by default (they describe the API, they hold no data); setting ``http_docs_public = false``
  turns them off.
- A token is ``mh_`` + 43 random URL-safe characters; only its sha256 is stored, so it is shown once,
  at creation (``meterhub token create NAME --scope read|admin``).
- The token is checked against the database on every request (a primary-key lookup in a worker
  thread), so a revocation takes effect at once. ``last_used_at`` is written at most once a minute
  per token, through the group-commit writer.

The functions on an Engine are synchronous: the CLI calls them directly.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, replace
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from meterhub.api.errors import ApiError
from meterhub.storage import schema

SCOPES = ("read", "operate", "admin")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOUCH_INTERVAL = 60.0


class TokenError(Exception):
    """A token operation that cannot be done (duplicate name, unknown token)."""


@dataclass(slots=True, frozen=True)
class TokenInfo:
    id: int
    name: str
    scope: str
    created_at: float
    last_used_at: float | None
    revoked: bool
    revoked_at: float | None = None
    #: The sites this token is limited to (None: every site); see meterhub.api.scoping.
    sites: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "sites": None if self.sites is None else list(self.sites),
            "id": self.id,
            "name": self.name,
            "scope": self.scope,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
        }


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _info(row: Any) -> TokenInfo:
    return TokenInfo(
        row.id, row.name, row.scope, row.created_at, row.last_used_at, bool(row.revoked), row.revoked_at
    )


def create_token(
    engine: Engine, name: str, scope: str, sites: list[int] | None = None
) -> tuple[str, TokenInfo]:
    """Create a token; returns ``(token, info)``. The token is not stored and cannot be shown again.
    ``sites``: limit it to these sites (meterhub.api.scoping)."""
    if scope not in SCOPES:
        raise TokenError(f"scope must be one of {', '.join(SCOPES)}")
    if not name or len(name) > 128:
        raise TokenError("a token name is 1 to 128 characters")
    token = "mh_" + secrets.token_urlsafe(32)
    now = time.time()
    try:
        with engine.begin() as conn:
            res = conn.execute(
                schema.api_tokens.insert().values(
                    name=name, token_hash=hash_token(token), scope=scope, created_at=now, revoked=False
                )
            )
            if sites:
                from meterhub.api.scoping import attach_sites

                attach_sites(conn, res.inserted_primary_key[0], sites)
    except IntegrityError:
        raise TokenError(f"a token named {name!r} already exists") from None
    info = get_token(engine, name)
    assert info is not None
    return token, info


def get_token(engine: Engine, name: str) -> TokenInfo | None:
    t = schema.api_tokens
    with engine.connect() as conn:
        row = conn.execute(select(t).where(t.c.name == name)).first()
        return _with_sites(conn, _info(row)) if row else None


def _with_sites(conn: Any, info: TokenInfo) -> TokenInfo:
    from meterhub.api.scoping import token_sites

    sites = token_sites(conn, info.id)
    return replace(info, sites=sites) if sites is not None else info


def list_tokens(engine: Engine) -> list[TokenInfo]:
    t = schema.api_tokens
    with engine.connect() as conn:
        rows = conn.execute(select(t).order_by(t.c.name)).all()
    return [_info(r) for r in rows]


def revoke_token(engine: Engine, name: str) -> TokenInfo:
    t = schema.api_tokens
    with engine.begin() as conn:
        res = conn.execute(
            update(t)
            .where(t.c.name == name, t.c.revoked.is_(False))
            .values(revoked=True, revoked_at=time.time())
        )
    info = get_token(engine, name)
    if info is None:
        raise TokenError(f"no token named {name!r}")
    if res.rowcount == 0 and not info.revoked:  # pragma: no cover - a race with another revoke
        raise TokenError(f"token {name!r} could not be revoked")
    return info


def lookup_token(engine: Engine, token: str) -> TokenInfo | None:
    """The token's record, or None when unknown."""
    t = schema.api_tokens
    with engine.connect() as conn:
        row = conn.execute(select(t).where(t.c.token_hash == hash_token(token))).first()
        return _with_sites(conn, _info(row)) if row else None


# --- the FastAPI dependency ----------------------------------------------------------------------

bearer = HTTPBearer(
    auto_error=False, description="An API token: `meterhub token create NAME --scope read|admin`."
)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})


class Authorizer:
    """Checks the bearer token of each API request against the method's required scope."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self._touched: dict[int, float] = {}

    async def __call__(
        self, request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> TokenInfo:
        if credentials is None or not credentials.credentials:
            raise _unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        info = await run_in_threadpool(lookup_token, self.hub.engine, credentials.credentials)
        if info is None:
            raise _unauthorized("unknown token")
        if info.revoked:
            raise _unauthorized("this token was revoked")
        if request.method not in READ_METHODS and info.scope != "admin":
            from meterhub.api.scoping import operate_allows

            if not (info.scope == "operate" and operate_allows(request)):
                need = "'admin' (or 'operate' for commands, top-ups and alarm acknowledgements)"
                raise ApiError(
                    403, f"token {info.name!r} has scope {info.scope!r}; this request needs {need}"
                )
        if info.sites is not None:
            from meterhub.api.scoping import check_sites

            await check_sites(self.hub, request, info)
        self._touch(info)
        request.state.token = info
        return info

    def _touch(self, info: TokenInfo) -> None:
        now = time.time()
        if now - self._touched.get(info.id, 0.0) < TOUCH_INTERVAL:
            return
        self._touched[info.id] = now
        writer = getattr(self.hub, "writer", None)
        if writer is not None:
            writer.submit([("token_used", {"id": info.id, "last_used_at": now})])
