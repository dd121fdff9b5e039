"""Tuya's cloud device API on the open hub, so ``tuya-iot-py-sdk``'s ``TuyaDeviceManager``,
``TuyaHomeManager`` and ``TuyaAssetManager`` work unchanged, for both project types.

Every path is signed and authenticated by :class:`meterhub.openhub.http.OpenHubAPI`'s own request
plumbing (signature, token, and whatever else it checks), and answered HTTP 200 with ``{"success",
"result", "t"}`` or ``{"success": false, "code", "msg", "t"}``. What each path returns is listed in
``docs/openhub.md``; in short:

- devices: ``/v1.0/users/{uid}/devices`` (a list, each with ``status``), ``/v1.0/devices/{id}``
  (with ``status``), ``/v1.0/devices/?device_ids=`` (``{"devices": [...]}``, each with ``status``);
  ``/v1.0/iot-03/devices/{id}`` and ``/v1.0/iot-03/devices?device_ids=`` (``{"list": [...]}``) with
  ``"status": {}`` (the SDK's industry manager breaks on a status list, and without any ``status`` its
  devices share one dict), the values coming from ``.../status``;
- functions and specifications generated from the device's product model (:mod:`meterhub.model.tuya`);
- commands: each ``{"code", "value"}`` becomes one edge-protocol command through
  ``ProtocolService.send_command``, in order, after all of them were checked against the model;
- homes (smart-home) and assets (industry): one per place (:mod:`meterhub.openhub.device_store`);
  scenes and infrared remotes are empty lists;
- device management the hub's operator owns (remove, factory reset) is refused with 1106, and any
  other ``/v1.x`` or ``/v2.0`` path gets 1108 ("uri path invalid"), never an HTML 404.

Scope: a user token sees the devices bound to its user; a project token every device bound to some
open hub user. A device out of scope is 1106 ("permission deny"), whether it exists or not.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from meterhub.logs import RateLimitedLog, get_logger
from meterhub.model.datapoint import ProductModel
from meterhub.model.errors import ValueRejected
from meterhub.model.tuya import DEFAULT_CATEGORY, functions, specification
from meterhub.openhub import device_store as ds
from meterhub.openhub.http import OpenHubAPI, fail, ok
from meterhub.openhub.store import OpenHubError, user_exists
from meterhub.protocol.errors import ErrorCode

log = get_logger(__name__)
log_repeated = RateLimitedLog(log)

#: Most device ids in one ``device_ids=`` (Tuya documents 20; the SDK sends all of a user's at once).
MAX_DEVICE_IDS = 1000
#: Most commands in one request (each waits for the meter's answer).
MAX_COMMANDS = 20
#: Most command requests of one application waiting at once (then 1110, Tuya's "concurrent request
#: over limit"), so one application cannot pile up commands without bound.
MAX_CONCURRENT_COMMANDS = 32
MAX_PAGE_SIZE = 100
#: Tuya error codes used here beyond the global ones in ``http.py``.
DEVICE_OFFLINE = 2001
COMMAND_NOT_SUPPORTED = 2008
COMMAND_ISSUE_ERROR = 1103
SYSTEM_ERROR = 500
_VALUE_CODES = {
    ErrorCode.NOT_SUPPORTED,
    ErrorCode.PARAMS_EMPTY,
    ErrorCode.PARAMS_RANGE_INVALID,
    ErrorCode.PARAMS_NULL,
    ErrorCode.PARAMS_TYPE_INCORRECT,
}

Handler = Callable[..., Awaitable[Any]]


def _deny() -> OpenHubError:
    return OpenHubError(1106, "permission deny")


class DeviceAPI:
    """The device routes (``router``) and the catch-all for other Tuya paths (``fallback``, to be
    included after every other router serving ``/v1.x`` paths)."""

    def __init__(self, hub: Any, api: OpenHubAPI) -> None:
        self.hub = hub
        self.engine = hub.engine
        self.api = api
        self.router = APIRouter(tags=["open hub: Tuya device API"])
        self.fallback = APIRouter(include_in_schema=False)
        self._zone = ZoneInfo(hub.settings.timezone)
        self._commanding: Counter[str] = Counter()  # application -> command requests waiting
        self.errors = 0  # requests answered 500 for an unexpected failure
        get, post, delete = ["GET"], ["POST"], ["DELETE"]
        routes: list[tuple[str, Handler, list[str]]] = [
            # smart-home project (AuthType.SMART_HOME)
            ("/v1.0/users/{uid}/devices", self.user_devices, get),
            ("/v1.0/users/{uid}/homes", self.user_homes, get),
            ("/v1.0/devices/factory-infos", self.refuse, get),
            ("/v1.0/devices/", self.device_list, get),
            ("/v1.0/devices", self.device_list, get),
            ("/v1.0/devices/{device_id}", self.device_info, get),
            ("/v1.0/devices/{device_id}", self.refuse, delete),
            ("/v1.0/devices/{device_id}/status", self.device_status, get),
            ("/v1.0/devices/{device_id}/functions", self.device_functions, get),
            ("/v1.0/devices/{device_id}/specifications", self.device_specification, get),
            ("/v1.0/devices/{device_id}/commands", self.commands, post),
            ("/v1.0/devices/{device_id}/reset-factory", self.refuse, post),
            ("/v1.0/functions/{category}", self.category_functions, get),
            ("/v1.0/homes/{home_id}", self.home_info, get),
            ("/v1.0/homes/{home_id}/devices", self.home_devices, get),
            ("/v1.0/homes/{home_id}/scenes", self.home_scenes, get),
            ("/v1.0/homes/{home_id}/scenes/{scene_id}/trigger", self.no_such_scene, post),
            ("/v1.0/infrareds/{device_id}/remotes", self.infrared_remotes, get),
            ("/v1.0/infrareds/{device_id}/remotes/{remote_id}/keys", self.no_such_remote, get),
            ("/v1.0/infrareds/{device_id}/remotes/{remote_id}/command", self.no_such_remote, post),
            # industry-solution project (AuthType.CUSTOM)
            ("/v1.0/iot-03/devices/status", self.device_list_status, get),
            ("/v1.0/iot-03/devices/factory-infos", self.refuse, get),
            ("/v1.0/iot-03/devices", self.device_list, get),
            ("/v1.0/iot-03/devices", self.refuse, delete),
            ("/v1.0/iot-03/devices/{device_id}", self.device_info, get),
            ("/v1.0/iot-03/devices/{device_id}", self.refuse, delete),
            ("/v1.0/iot-03/devices/{device_id}/status", self.device_status, get),
            ("/v1.0/iot-03/devices/{device_id}/functions", self.device_functions, get),
            ("/v1.0/iot-03/devices/{device_id}/specification", self.device_specification, get),
            ("/v1.0/iot-03/devices/{device_id}/commands", self.commands, post),
            ("/v1.0/iot-03/devices/{device_id}/actions/reset", self.refuse, delete),
            ("/v1.0/iot-03/categories/{category}/functions", self.category_functions, get),
            ("/v1.0/iot-02/assets/{asset_id}", self.asset_info, get),
            ("/v1.0/iot-02/assets/{asset_id}/sub-assets", self.sub_assets, get),
            ("/v1.0/iot-02/assets/{asset_id}/devices", self.asset_devices, get),
        ]
        for path, handler, methods in routes:
            self.router.add_api_route(path, self._endpoint(handler), methods=methods)
        every = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        for prefix in ("/v1.0", "/v1.1", "/v1.2", "/v2.0"):
            self.fallback.add_api_route(
                prefix + "/{rest:path}", self._endpoint(self.unknown_path), methods=every
            )

    # --- plumbing --------------------------------------------------------------------------------

    def _endpoint(self, handler: Handler) -> Callable[[Request], Awaitable[JSONResponse]]:
        """``handler(request, scope, body)`` returns the result; authentication is OpenHubAPI's
        (``_wrap``: the same signature, token and replay checks as the token paths)."""

        async def run(request: Request, *, uid: str | None, body: dict[str, Any], **kw: Any) -> Any:
            request.state.openhub_app = kw.get("access_id", "")
            try:
                return ok(await handler(request, uid or None, body))
            except OpenHubError:
                raise
            except Exception as exc:  # storage down, a bug: Tuya's shape, counted, rate-limited log
                self.errors += 1
                log_repeated.error(
                    "failed",
                    "open hub device API failed",
                    path=request.url.path,
                    error=repr(exc).splitlines()[0][:300],
                )
                return fail(SYSTEM_ERROR, "system error, please contact the admin")

        run.__name__ = handler.__name__
        return self.api._wrap(run)

    async def _db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, self.engine, *args, **kw)

    @property
    def _service(self) -> Any:
        return self.hub.handler

    def _model(self, row: ds.DeviceRow) -> ProductModel | None:
        service = self._service
        return service.models.get(row.model) or service.default_model

    async def _device(self, scope: str | None, device_id: str) -> ds.DeviceRow:
        row = await self._db(ds.visible_device, scope, device_id)
        if row is None:
            raise _deny()
        return row

    async def _user_scope(self, scope: str | None, uid: str) -> str:
        if scope is not None:
            if scope != uid:
                raise _deny()
            return uid
        if not await self._db(user_exists, uid):
            raise OpenHubError(1000, "data not exist")
        return uid

    def _time_zone(self) -> str:
        offset = dt.datetime.now(self._zone).strftime("%z") or "+0000"
        return f"{offset[:3]}:{offset[3:]}"

    def _device_ids(self, request: Request) -> list[str] | None:
        raw = request.query_params.get("device_ids")
        if raw is None:
            return None
        ids = [i.strip() for i in raw.split(",") if i.strip()]
        if not ids:
            raise OpenHubError(1100, "param is empty")
        if len(ids) > MAX_DEVICE_IDS:
            raise OpenHubError(1109, f"param is illegal: at most {MAX_DEVICE_IDS} device_ids")
        return ids

    @staticmethod
    def _page(request: Request) -> tuple[str, int]:
        size = request.query_params.get("page_size") or "20"
        if not (size.isascii() and size.isdigit()) or not 1 <= int(size) <= MAX_PAGE_SIZE:
            raise OpenHubError(1109, f"param is illegal: page_size must be 1 to {MAX_PAGE_SIZE}")
        return request.query_params.get("last_row_key") or "", int(size)

    # --- device JSON -----------------------------------------------------------------------------

    def _status(self, model: ProductModel | None, values: Sequence[tuple[str, Any, float]]) -> list[Any]:
        """``[{"code", "value"}]`` of the reported values, in the model's order, in wire form."""
        if model is None:
            return []
        latest = {dp_id: value for dp_id, value, _t in values}
        out = []
        for dp in model:
            if dp.id_str not in latest:
                continue
            try:
                out.append({"code": dp.code, "value": dp.to_wire(latest[dp.id_str])})
            except Exception:
                continue  # a stored value the model no longer accepts: left out
        return out

    def _device_json(
        self,
        row: ds.DeviceRow,
        values: dict[str, list[tuple[str, Any, float]]] | None,
        *,
        industry: bool,
    ) -> dict[str, Any]:
        model = self._model(row)
        place_id = ds.user_place_id(row.uid)
        out: dict[str, Any] = {
            "id": row.cid,
            "name": row.name or row.cid,
            "category": (model.category if model else None) or DEFAULT_CATEGORY,
            "product_id": row.product_id,
            "product_name": model.name if model else row.product_id,
            "model": model.model if model else row.model,
            "online": row.online,
            "active_time": int(row.first_seen),
            "create_time": int(row.first_seen),
            "update_time": int(row.last_seen),
            "time_zone": self._time_zone(),
            "sub": True,
            "uuid": row.cid,
            "ip": row.device_ip or "",
            "icon": "",
            "local_key": "",
            "lat": "",
            "lon": "",
            "gateway_id": row.gateway_id,
        }
        if industry:
            out["asset_id"] = str(place_id)
            # An empty object, never Tuya's status list: the SDK's industry manager keeps a device's
            # status in the dict it got here; without one, every device shares one class-level dict.
            out["status"] = {}
        else:
            out["uid"] = row.uid
            out["owner_id"] = str(place_id)
            out["biz_type"] = 0
        if values is not None and not industry:
            out["status"] = self._status(model, values.get(row.cid, ()))
        return out

    async def _devices_json(self, rows: list[ds.DeviceRow], *, industry: bool, status: bool) -> list[Any]:
        values = await self._db(ds.latest_values, [r.cid for r in rows]) if status else None
        return [self._device_json(r, values, industry=industry) for r in rows]

    @staticmethod
    def _industry(request: Request) -> bool:
        return request.url.path.startswith("/v1.0/iot-")

    # --- devices ---------------------------------------------------------------------------------

    async def user_devices(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        uid = await self._user_scope(scope, request.path_params["uid"])
        rows = await self._db(ds.visible_devices, uid)
        return await self._devices_json(rows, industry=False, status=True)

    async def device_list(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        industry = self._industry(request)
        ids = self._device_ids(request)
        if ids is not None:
            rows = await self._db(ds.visible_devices, scope, ids)
            has_more, last = False, ""
        else:
            after, size = self._page(request)
            rows = await self._db(ds.visible_devices, scope, after=after, limit=size + 1)
            has_more = len(rows) > size
            rows = rows[:size]
            last = rows[-1].cid if rows else ""
        devices = await self._devices_json(rows, industry=industry, status=not industry)
        key = "list" if industry else "devices"
        return {key: devices, "total": len(devices), "has_more": has_more, "last_row_key": last}

    async def device_info(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        industry = self._industry(request)
        row = await self._device(scope, request.path_params["device_id"])
        return (await self._devices_json([row], industry=industry, status=not industry))[0]

    async def device_status(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        row = await self._device(scope, request.path_params["device_id"])
        values = await self._db(ds.latest_values, [row.cid])
        return self._status(self._model(row), values.get(row.cid, ()))

    async def device_list_status(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        ids = self._device_ids(request)
        if ids is None:
            raise OpenHubError(1100, "param is empty")
        rows = await self._db(ds.visible_devices, scope, ids)
        values = await self._db(ds.latest_values, [r.cid for r in rows])
        return [{"id": r.cid, "status": self._status(self._model(r), values.get(r.cid, ()))} for r in rows]

    # --- functions and specifications ------------------------------------------------------------

    async def device_functions(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        row = await self._device(scope, request.path_params["device_id"])
        model = self._model(row)
        if model is None:
            return {"category": DEFAULT_CATEGORY, "functions": []}
        return functions(model)

    async def device_specification(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        row = await self._device(scope, request.path_params["device_id"])
        model = self._model(row)
        if model is None:
            return {"category": DEFAULT_CATEGORY, "functions": [], "status": []}
        return specification(model)

    async def category_functions(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        category = request.path_params["category"]
        service = self._service
        candidates = [service.default_model] if service.default_model is not None else []
        candidates += list(service.models)
        for model in candidates:
            if (model.category or DEFAULT_CATEGORY) == category:
                return functions(model)
        raise OpenHubError(1000, "data not exist")

    # --- commands --------------------------------------------------------------------------------

    async def commands(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        items = body.get("commands")
        if not items:
            raise OpenHubError(1100, "param is empty")
        if not isinstance(items, list) or len(items) > MAX_COMMANDS:
            raise OpenHubError(1109, f"param is illegal: commands must be a list of at most {MAX_COMMANDS}")
        row = await self._device(scope, request.path_params["device_id"])
        model = self._model(row)
        checked = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("code"), str) or "value" not in item:
                raise OpenHubError(1109, 'param is illegal: each command is {"code", "value"}')
            dp = model.by_code(item["code"]) if model is not None else None
            if dp is None:
                raise OpenHubError(COMMAND_NOT_SUPPORTED, f"command or value not support: {item['code']}")
            try:
                dp.check_command(item["value"])
            except ValueRejected as exc:
                raise OpenHubError(
                    COMMAND_NOT_SUPPORTED, f"command or value not support: {dp.code}: {exc.message}"
                ) from None
            checked.append((dp, item["value"]))
        app = request.state.openhub_app
        if self._commanding[app] >= MAX_CONCURRENT_COMMANDS:
            raise OpenHubError(1110, "concurrent request over limit")
        self._commanding[app] += 1
        try:
            for n, (dp, value) in enumerate(checked):
                result = await self._service.send_command(row.cid, dp.id, value)
                if result.status != "ok":
                    raise self._command_error(dp.code, result, n)
        finally:
            self._commanding[app] -= 1
            if not self._commanding[app]:
                del self._commanding[app]
        return True

    @staticmethod
    def _command_error(code: str, result: Any, sent_before: int) -> OpenHubError:
        done = f" ({sent_before} earlier command(s) applied)" if sent_before else ""
        if result.status == "timeout":
            return OpenHubError(SYSTEM_ERROR, f"no answer from the device: {code}: {result.msg}{done}")
        if result.code == ErrorCode.DEVICE_OFFLINE or result.code == ErrorCode.DEVICE_NOT_EXIST:
            return OpenHubError(DEVICE_OFFLINE, f"device is offline{done}")
        who = "the device answered" if result.status == "failed" else "refused"
        detail = f"{code}: {who} code {result.code}: {result.msg}{done}"
        if result.code in _VALUE_CODES:
            return OpenHubError(COMMAND_NOT_SUPPORTED, f"command or value not support: {detail}")
        return OpenHubError(COMMAND_ISSUE_ERROR, f"commands issue error: {detail}")

    # --- homes (smart-home) ----------------------------------------------------------------------

    @staticmethod
    def _home_json(place: ds.Place) -> dict[str, Any]:
        return {
            "home_id": place.id,
            "name": place.name,
            "geo_name": "",
            "lat": 0.0,
            "lon": 0.0,
            "role": "OWNER",
        }

    async def _place(self, scope: str | None, place_id: str) -> ds.Place:
        place = await self._db(ds.find_place, scope, place_id)
        if place is None:
            raise _deny()
        return place

    async def user_homes(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        uid = await self._user_scope(scope, request.path_params["uid"])
        return [self._home_json(p) for p in await self._db(ds.places_of, uid)]

    async def home_info(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        return self._home_json(await self._place(scope, request.path_params["home_id"]))

    async def home_devices(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        place = await self._place(scope, request.path_params["home_id"])
        rows = await self._db(ds.place_devices, place)
        return await self._devices_json(rows, industry=False, status=True)

    async def home_scenes(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        await self._place(scope, request.path_params["home_id"])
        return []

    async def no_such_scene(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        await self._place(scope, request.path_params["home_id"])
        raise OpenHubError(1000, "data not exist")

    async def infrared_remotes(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        await self._device(scope, request.path_params["device_id"])
        return []

    async def no_such_remote(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        await self._device(scope, request.path_params["device_id"])
        raise OpenHubError(1000, "data not exist")

    # --- assets (industry) -----------------------------------------------------------------------

    @staticmethod
    def _asset_json(place: ds.Place) -> dict[str, Any]:
        return {
            "asset_id": place.asset_id,
            "asset_name": place.name,
            "parent_asset_id": "-1",
            "asset_full_name": place.name,
        }

    @staticmethod
    def _paged(items: list[Any], key: Callable[[Any], str], after: str, size: int) -> dict[str, Any]:
        rest = [i for i in items if key(i) > after] if after else items
        page = rest[:size]
        return {
            "list": page,
            "has_next": len(rest) > size,
            "last_row_key": key(page[-1]) if page else "",
            "page_size": size,
            "total_size": len(items),
        }

    async def asset_info(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        return self._asset_json(await self._place(scope, request.path_params["asset_id"]))

    async def sub_assets(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        after, size = self._page(request)
        asset_id = request.path_params["asset_id"]
        if asset_id == "-1":
            places = await self._db(ds.places_of, scope)
            assets = sorted((self._asset_json(p) for p in places), key=lambda a: a["asset_id"])
            return self._paged(assets, lambda a: a["asset_id"], after, size)
        await self._place(scope, asset_id)
        return self._paged([], str, after, size)

    async def asset_devices(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        after, size = self._page(request)
        asset_id = request.path_params["asset_id"]
        if asset_id == "-1":
            return self._paged([], str, after, size)
        place = await self._place(scope, asset_id)
        rows = await self._db(ds.place_devices, place)
        items = [{"device_id": r.cid, "asset_id": place.asset_id} for r in rows]
        return self._paged(items, lambda d: d["device_id"], after, size)

    # --- everything else -------------------------------------------------------------------------

    async def refuse(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        raise OpenHubError(1106, "permission deny: meters are managed by the hub's operator")

    async def unknown_path(self, request: Request, scope: str | None, body: dict[str, Any]) -> Any:
        raise OpenHubError(1108, "uri path invalid")
