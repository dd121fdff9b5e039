"""The open hub's HTTP API: Tuya-style signed requests, so ``tuya-iot-py-sdk`` works unchanged.

Signature (Tuya's "sign requests"): every request carries headers ``client_id`` (the application's
access id), ``t`` (Unix ms), ``sign_method: HMAC-SHA256``, ``access_token`` (empty for token calls),
optionally ``nonce`` (a UUID, Tuya's newer signature; tuya-iot-py-sdk 0.6.6 sends none) and
``sign`` = upper-case hex HMAC-SHA256 with the application's secret over
``client_id + access_token + t + nonce + METHOD "\\n" sha256(body) "\\n" "\\n" path[?sorted query]``.
A request is accepted once: the same signature (or nonce) again within the time window is refused
with 1113 (:mod:`meterhub.openhub.replay`).

Paths:
- ``GET /v1.0/token?grant_type=1``: project token (the application itself);
- ``POST /v1.0/iot-01/associated-users/actions/authorized-login`` (smart-home login, password = md5 hex)
  and ``POST /v1.0/iot-03/users/login`` (custom login, password = sha256 hex): user tokens;
- ``GET /v1.0/token/{refresh_token}`` and ``POST /v1.0/iot-03/users/token/{refresh_token}``: refresh;
- ``POST /v1.0/open-hub/access/config`` and ``POST /v1.0/iot-03/open-hub/access-config``: link
  credentials (``source_topic`` / ``sink_topic`` as ``{"device": topic}``);
- ``POST /v1.0/open-hub/action`` with ``{"action": "device.openHubConfig", "uid", "link_id",
  "link_type"}``: the document's action (topics as strings, as in the document's sample).

Every answer is HTTP 200; failures are ``{"success": false, "code", "msg", "t"}`` with Tuya's global
codes (500 system error (storage unavailable), 1004 sign invalid, 1005 clientId invalid, 1010 token
expired, 1011 token invalid, 1013 request time invalid, 1113 repeated request, 1100 param empty, 1106
permission deny, 1109 param illegal, 1000 data not exist).
A user token may ask only for its own uid; a project token for any user.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.openhub import store
from meterhub.openhub.crypto import VERSIONS
from meterhub.openhub.replay import MAX_CLOCK_SKEW_MS, ReplayGuard
from meterhub.openhub.store import OpenHubError

log = get_logger(__name__)
log_repeated = RateLimitedLog(log)

TOKEN_TTL = 7200
_LOGIN_PATHS = {
    "/v1.0/iot-01/associated-users/actions/authorized-login": "md5",
    "/v1.0/iot-03/users/login": "sha256",
}


def _now_ms() -> int:
    return int(time.time() * 1000)


def ok(result: Any) -> JSONResponse:
    return JSONResponse({"success": True, "t": _now_ms(), "result": result})


def fail(code: int, msg: str) -> JSONResponse:
    return JSONResponse({"success": False, "code": code, "msg": msg, "t": _now_ms()})


def string_to_sign(method: str, path: str, query: list[tuple[str, str]], body: bytes) -> str:
    url = path
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in sorted(query))
    return f"{method}\n{hashlib.sha256(body).hexdigest()}\n\n{url}"


def make_sign(secret: str, client_id: str, access_token: str, t: str, to_sign: str, nonce: str = "") -> str:
    msg = (client_id + access_token + t + nonce + to_sign).encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest().upper()


class OpenHubAPI:
    """Builds the router; ``link_url(link_type, request)`` says where clients connect."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.engine = hub.engine
        self.replay: ReplayGuard = hub.openhub.replay
        self._storage_errors = 0
        self.router = APIRouter(tags=["open hub (Tuya-compatible)"], include_in_schema=True)
        r = self.router
        r.add_api_route("/v1.0/token", self._wrap(self.project_token, token=False), methods=["GET"])
        for path in _LOGIN_PATHS:
            r.add_api_route(path, self._wrap(self.login, token=False), methods=["POST"])
        r.add_api_route("/v1.0/token/{refresh}", self._wrap(self.refresh, token=False), methods=["GET"])
        r.add_api_route(
            "/v1.0/iot-03/users/token/{refresh}", self._wrap(self.refresh, token=False), methods=["POST"]
        )
        r.add_api_route("/v1.0/open-hub/access/config", self._wrap(self.access_config), methods=["POST"])
        r.add_api_route(
            "/v1.0/iot-03/open-hub/access-config", self._wrap(self.access_config), methods=["POST"]
        )
        r.add_api_route("/v1.0/open-hub/action", self._wrap(self.action), methods=["POST"])

    # --- request plumbing ------------------------------------------------------------------------

    def _wrap(
        self, handler: Callable[..., Awaitable[JSONResponse]], *, token: bool = True
    ) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def endpoint(request: Request) -> JSONResponse:
            try:
                body = await request.body()
                access_id, uid = await self._authenticate(request, body, token)
                payload: dict[str, Any] = {}
                if body:
                    try:
                        payload = msgspec.json.decode(body)
                    except msgspec.DecodeError:
                        raise OpenHubError(1109, "body is not JSON") from None
                    if not isinstance(payload, dict):
                        raise OpenHubError(1109, "body must be a JSON object")
                return await handler(request, access_id=access_id, uid=uid, body=payload)
            except OpenHubError as exc:
                return fail(exc.code, exc.msg)
            except SQLAlchemyError as exc:  # storage unavailable: Tuya's shape, not a bare HTTP 500
                self._storage_errors += 1
                log_repeated.error(
                    "storage", "open hub request failed: storage error", error=str(exc).splitlines()[0]
                )
                return fail(500, "system error, please contact the admin")

        endpoint.__name__ = handler.__name__
        return endpoint

    async def _authenticate(self, request: Request, body: bytes, need_token: bool) -> tuple[str, str | None]:
        h = request.headers
        client_id, sign, t = h.get("client_id", ""), h.get("sign", ""), h.get("t", "")
        access_token, nonce = h.get("access_token", ""), h.get("nonce", "")
        if not client_id or not sign or not t:
            raise OpenHubError(1105, "missing the header")
        if h.get("sign_method", "HMAC-SHA256").upper() != "HMAC-SHA256":
            raise OpenHubError(1004, "sign invalid")
        if len(nonce) > 64:
            raise OpenHubError(1109, "param is illegal, please check it")
        if not t.isdigit() or abs(int(t) - _now_ms()) > MAX_CLOCK_SKEW_MS:
            raise OpenHubError(1013, "request time is invalid")
        app = await asyncio.to_thread(store.get_app, self.engine, client_id)
        if app is None or not app.enabled:
            raise OpenHubError(1005, "clientId invalid")
        to_sign = string_to_sign(
            request.method, request.url.path, list(request.query_params.multi_items()), body
        )
        expected = make_sign(app.secret, client_id, access_token, t, to_sign, nonce)
        if not hmac.compare_digest(expected, sign.upper()):
            raise OpenHubError(1004, "sign invalid")
        await self.replay.check(client_id, expected, nonce, int(t))
        if not need_token:
            return client_id, None
        if not access_token:
            raise OpenHubError(1002, "access_token is null")
        uid = await asyncio.to_thread(store.check_token, self.engine, access_token, client_id)
        return client_id, uid or None

    # --- token endpoints -------------------------------------------------------------------------

    async def project_token(
        self, request: Request, *, access_id: str, uid: str | None, body: dict[str, Any]
    ) -> JSONResponse:
        if request.query_params.get("grant_type") != "1":
            raise OpenHubError(1003, "grant type invalid")
        token = await asyncio.to_thread(store.issue_token, self.engine, access_id, None, TOKEN_TTL)
        return ok(self._token_result(token))

    async def login(
        self, request: Request, *, access_id: str, uid: str | None, body: dict[str, Any]
    ) -> JSONResponse:
        kind = _LOGIN_PATHS[request.url.path]
        username, digest = body.get("username"), body.get("password")
        if not username or not digest:
            raise OpenHubError(1100, "param is empty")
        if not isinstance(username, str) or not isinstance(digest, str):
            raise OpenHubError(1109, "param is illegal, please check it")
        found = await asyncio.to_thread(store.check_user, self.engine, username, digest, kind)
        if found is None:
            raise OpenHubError(1106, "permission deny")
        token = await asyncio.to_thread(store.issue_token, self.engine, access_id, found, TOKEN_TTL)
        return ok(self._token_result(token))

    async def refresh(
        self, request: Request, *, access_id: str, uid: str | None, body: dict[str, Any]
    ) -> JSONResponse:
        refresh = request.path_params["refresh"]
        token = await asyncio.to_thread(store.refresh_token, self.engine, refresh, access_id, TOKEN_TTL)
        return ok(self._token_result(token))

    def _token_result(self, token: store.Token) -> dict[str, Any]:
        return {
            "access_token": token.access_token,
            "refresh_token": token.refresh_token,
            "expire_time": token.expire,
            "uid": token.uid or "",
            "platform_url": "",
        }

    # --- link configuration ----------------------------------------------------------------------

    async def access_config(
        self, request: Request, *, access_id: str, uid: str | None, body: dict[str, Any]
    ) -> JSONResponse:
        result = await self._config(request, uid, body, default_version="1.0")
        result["source_topic"] = {"device": result["source_topic"]}
        result["sink_topic"] = {"device": result["sink_topic"]}
        return ok(result)

    async def action(
        self, request: Request, *, access_id: str, uid: str | None, body: dict[str, Any]
    ) -> JSONResponse:
        if body.get("action") != "device.openHubConfig":
            raise OpenHubError(1108, "uri path invalid")
        params = body.get("params") if isinstance(body.get("params"), dict) else body
        return ok(await self._config(request, uid, params, default_version="2.0"))

    async def _config(
        self, request: Request, token_uid: str | None, body: dict[str, Any], default_version: str
    ) -> dict[str, Any]:
        target, link_id = body.get("uid"), body.get("link_id")
        link_type = body.get("link_type") or "mqtt"
        version = body.get("msg_encrypted_version") or default_version
        if not target or not link_id:
            raise OpenHubError(1100, "param is empty")
        if not isinstance(target, str) or not isinstance(link_id, str) or len(link_id) > 128:
            raise OpenHubError(1109, "param is illegal, please check it")
        if link_type not in ("mqtt", "websocket") or version not in VERSIONS:
            raise OpenHubError(1109, "param is illegal, please check it")
        if token_uid is not None and token_uid != target:
            raise OpenHubError(1106, "permission deny")
        if not await asyncio.to_thread(store.user_exists, self.engine, target):
            raise OpenHubError(1000, "data not exist")
        try:
            url = self.hub.openhub.url(link_type, request.url.hostname or "127.0.0.1")
        except ValueError:
            raise OpenHubError(1109, f"{link_type} links are not enabled on this server") from None
        ttl = int(self.hub.settings.openhub_link_ttl)
        now = time.time()
        link = await asyncio.to_thread(
            store.issue_link, self.engine, target, link_id, link_type, version, ttl, now
        )
        return {
            "url": url,
            "client_id": link.client_id,
            "username": link.username,
            "password": link.password,
            # at least store.LINK_MIN_EXPIRE: Tuya's SDK sleeps expire_time - 60 s, then renews
            "expire_time": int(link.expires_at - now),
            "source_topic": link.source_topic,
            "sink_topic": link.sink_topic,
        }
