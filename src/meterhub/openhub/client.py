"""Application-side open hub client: signed HTTP calls, link configuration, decrypted events.

Example::

    client = OpenHubClient("http://127.0.0.1:8080", ACCESS_ID, SECRET)
    client.project_login()
    async for event in client.events(uid):
        print(event["protocol"], event["data"])

``events`` renews the link's credentials shortly before they expire and reconnects with the same
client id (the server lets the new connection take over the old one).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from meterhub.openhub import crypto
from meterhub.openhub.http import make_sign, string_to_sign


class OpenHubClientError(Exception):
    def __init__(self, code: int | None, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


class OpenHubClient:
    def __init__(
        self,
        endpoint: str,
        access_id: str,
        secret: str,
        *,
        timeout: float = 10.0,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.access_id = access_id
        self.secret = secret
        self.access_token = ""
        self.refresh_token = ""
        self.uid = ""
        self._http = httpx.Client(timeout=timeout, verify=verify)

    # --- signed HTTP -----------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, Any] | None = None
    ) -> Any:
        data = json.dumps(body).encode() if body else b""
        query = [(k, str(v)) for k, v in (params or {}).items()]
        t = str(int(time.time() * 1000))
        nonce = str(uuid.uuid4())  # two identical calls in one millisecond are still two requests
        to_sign = string_to_sign(method, path, query, data)
        headers = {
            "client_id": self.access_id,
            "sign": make_sign(self.secret, self.access_id, self.access_token, t, to_sign, nonce),
            "nonce": nonce,
            "sign_method": "HMAC-SHA256",
            "access_token": self.access_token,
            "t": t,
            "Content-Type": "application/json",
        }
        url = self.endpoint + path + ("?" + urlencode(query) if query else "")
        response = self._http.request(method, url, content=data, headers=headers)
        response.raise_for_status()
        answer = response.json()
        if not answer.get("success"):
            raise OpenHubClientError(answer.get("code"), answer.get("msg", "failed"))
        return answer["result"]

    def _take_token(self, result: dict[str, Any]) -> None:
        self.access_token = result["access_token"]
        self.refresh_token = result["refresh_token"]
        self.uid = result.get("uid", "")

    def project_login(self) -> None:
        """A project token: the application may ask for any of its users' links."""
        self.access_token = ""
        self._take_token(self.request("GET", "/v1.0/token", params={"grant_type": 1}))

    def user_login(self, username: str, password: str) -> str:
        """Log in as an end user (custom auth: sha256 of the password); returns the uid."""
        self.access_token = ""
        digest = hashlib.sha256(password.encode()).hexdigest()
        self._take_token(
            self.request("POST", "/v1.0/iot-03/users/login", {"username": username, "password": digest})
        )
        return self.uid

    def config(self, uid: str, link_id: str, link_type: str = "mqtt", version: str = "2.0") -> dict[str, Any]:
        return self.request(
            "POST",
            "/v1.0/iot-03/open-hub/access-config",
            {
                "uid": uid,
                "link_id": link_id,
                "link_type": link_type,
                "topics": "device",
                "msg_encrypted_version": version,
            },
        )

    # --- events ----------------------------------------------------------------------------------

    async def events(
        self,
        uid: str,
        *,
        link_id: str | None = None,
        link_type: str = "mqtt",
        version: str = "2.0",
        renew_margin: float = 60.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield decrypted messages ``{"protocol", "t", "data"}`` forever (renewing credentials)."""
        import aiomqtt

        link_id = link_id or f"meterhub-client-{uuid.uuid4().hex[:12]}"
        while True:
            cfg = await asyncio.to_thread(self.config, uid, link_id, link_type, version)
            renew_at = time.monotonic() + max(1.0, cfg["expire_time"] - renew_margin)
            url = urlsplit(cfg["url"])
            topic = cfg["source_topic"]["device"]
            key = crypto.key_from_password(cfg["password"])
            kwargs: dict[str, Any] = {}
            if url.scheme in ("ws", "wss"):
                kwargs.update(transport="websockets", websocket_path=url.path or "/mqtt")
            if url.scheme in ("ssl", "wss"):
                kwargs["tls_context"] = tls_context or ssl.create_default_context()
            async with aiomqtt.Client(
                url.hostname or "127.0.0.1",
                url.port or 1883,
                identifier=cfg["client_id"],
                username=cfg["username"],
                password=cfg["password"],
                protocol=aiomqtt.ProtocolVersion.V311,
                **kwargs,
            ) as mqtt:
                await mqtt.subscribe(topic, qos=1)
                messages = mqtt.messages.__aiter__()
                while True:
                    left = renew_at - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        message = await asyncio.wait_for(messages.__anext__(), left)
                    except TimeoutError:
                        break
                    yield decode_message(bytes(message.payload), key, version)


def decode_message(payload: bytes, key: bytes, version: str) -> dict[str, Any]:
    """Decrypt one source-topic message into ``{"protocol", "t", "data"}``."""
    envelope = json.loads(payload)
    plaintext = crypto.decrypt(version, key, envelope["data"], envelope["t"])
    return {"protocol": envelope["protocol"], "t": envelope["t"], "data": json.loads(plaintext)}
