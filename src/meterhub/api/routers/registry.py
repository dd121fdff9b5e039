"""Vendors, gateways, products and product models."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from meterhub.api import queries
from meterhub.api.deps import Hub, PagingDep, iso, iso_required, zone
from meterhub.api.errors import ApiError, not_found
from meterhub.api.responses import errors
from meterhub.api.schemas import (
    DataPointOut,
    DeviceSummary,
    GatewayDetail,
    GatewayOut,
    ModelOut,
    ModelSummary,
    Page,
    ProductIn,
    ProductOut,
    VendorIn,
    VendorOut,
)
from meterhub.model.datapoint import DataPoint, ProductModel
from meterhub.model.loader import ModelRegistry
from meterhub.storage import registry

router = APIRouter()

NameParam = Annotated[str, Path(min_length=1, max_length=128)]


def _is_admin(request: Request) -> bool:
    token = getattr(request.state, "token", None)
    return token is not None and token.scope == "admin"


def _vendor(v: registry.Vendor, admin: bool, tz: Any) -> dict[str, Any]:
    return {
        "name": v.name,
        "username": v.username if admin else None,
        "enabled": v.enabled,
        "allowlist": v.allowlist_enabled,
        "created_at": v.created_at,
        "created_at_iso": iso_required(v.created_at, tz),
    }


@router.get("/vendors", response_model=Page[VendorOut], tags=["vendors"])
async def list_vendors(hub: Hub, request: Request, paging: PagingDep) -> dict[str, Any]:
    """Vendors. The `username` (the gateways' MQTT secret) is shown to admin tokens only."""
    vendors = await run_in_threadpool(registry.list_vendors, hub.engine)
    tz = zone(hub)
    admin = _is_admin(request)
    items = [_vendor(v, admin, tz) for v in vendors[paging.offset : paging.offset + paging.limit]]
    return paging.page(items, len(vendors))


@router.post("/vendors", response_model=VendorOut, status_code=201, tags=["vendors"], responses=errors(409))
async def create_vendor(hub: Hub, body: VendorIn) -> dict[str, Any]:
    """Create a vendor; the answer holds its username (what its gateways use to connect)."""
    try:
        v = await run_in_threadpool(registry.add_vendor, hub.engine, body.name, allowlist=body.allowlist)
    except registry.RegistryError as exc:
        raise ApiError(409, str(exc)) from None
    return _vendor(v, True, zone(hub))


async def _set_vendor(hub: Any, name: str, **values: Any) -> dict[str, Any]:
    try:
        v = await run_in_threadpool(lambda: registry.set_vendor(hub.engine, name, **values))
    except registry.RegistryError:
        raise not_found(f"vendor {name!r}") from None
    return _vendor(v, True, zone(hub))


@router.post("/vendors/{name}/disable", response_model=VendorOut, tags=["vendors"], responses=errors(404))
async def disable_vendor(hub: Hub, name: NameParam) -> dict[str, Any]:
    """Refuse new connections of this vendor's gateways (CONNACK 0x05)."""
    return await _set_vendor(hub, name, enabled=False)


@router.post("/vendors/{name}/enable", response_model=VendorOut, tags=["vendors"], responses=errors(404))
async def enable_vendor(hub: Hub, name: NameParam) -> dict[str, Any]:
    """Accept this vendor's gateways again."""
    return await _set_vendor(hub, name, enabled=True)


# --- gateways ------------------------------------------------------------------------------------


def _gateway(hub: Any, row: dict[str, Any], tz: Any) -> dict[str, Any]:
    mqtt = hub.mqtt
    gw = row["gateway_id"]
    return {
        "gateway_id": gw,
        "vendor": row["vendor"],
        "enabled": bool(row["enabled"]),
        "allowed": bool(row["allowed"]),
        "connected": bool(mqtt is not None and mqtt.is_connected(gw)),
        "client_address": row["client_address"],
        "first_seen": row["first_seen"],
        "last_seen": row["last_seen"],
        "last_seen_iso": iso(row["last_seen"], tz),
        "last_connected_at": row["last_connected_at"],
        "last_disconnected_at": row["last_disconnected_at"],
        "device_count": int(row["device_count"] or 0),
        "devices_online": int(row["devices_online"] or 0),
    }


@router.get("/gateways", response_model=Page[GatewayOut], tags=["gateways"])
async def list_gateways(
    hub: Hub,
    paging: PagingDep,
    connected: Annotated[bool | None, Query(description="Only gateways connected (or not) now.")] = None,
    vendor: Annotated[str | None, Query(max_length=128)] = None,
    q: Annotated[str | None, Query(max_length=128, description="Part of the gateway id.")] = None,
) -> dict[str, Any]:
    """Gateways known to meterhub, with live connection state and device counts."""
    rows = await run_in_threadpool(queries.gateways, hub.engine)
    tz = zone(hub)
    items = [_gateway(hub, r, tz) for r in rows]
    if connected is not None:
        items = [i for i in items if i["connected"] == connected]
    if vendor is not None:
        items = [i for i in items if i["vendor"] == vendor]
    if q:
        items = [i for i in items if q in i["gateway_id"]]
    return paging.page(items[paging.offset : paging.offset + paging.limit], len(items))


@router.get("/gateways/{gateway_id}", response_model=GatewayDetail, tags=["gateways"], responses=errors(404))
async def get_gateway(hub: Hub, gateway_id: NameParam) -> dict[str, Any]:
    """One gateway and its devices."""
    rows = await run_in_threadpool(queries.gateways, hub.engine, gateway_id)
    if not rows:
        raise not_found(f"gateway {gateway_id!r}")
    tz = zone(hub)
    out = _gateway(hub, rows[0], tz)
    devices, _ = await run_in_threadpool(
        lambda: queries.devices(hub.engine, gateway=gateway_id, limit=100_000, offset=0)
    )
    out["devices"] = [device_summary(hub, r, tz) for r in devices]
    return out


def device_summary(hub: Any, row: dict[str, Any], tz: Any) -> dict[str, Any]:
    """A devices row for the API; ``last_seen`` is the newer of the stored and the in-memory time."""
    last_seen = row["last_seen"]
    state = getattr(hub.handler, "devices", {}).get(row["cid"])
    if state is not None and state.last_heard > last_seen:
        last_seen = state.last_heard
    return {
        "cid": row["cid"],
        "name": row["device_name"],
        "gateway_id": row["gateway_id"],
        "product_id": row["product_id"],
        "model": row["model"],
        "online": bool(row["online"]),
        "last_seen": last_seen,
        "last_seen_iso": iso_required(last_seen, tz),
        "install_location": row["install_location"],
    }


# --- products and models -------------------------------------------------------------------------


def models_of(hub: Any) -> ModelRegistry:
    handler = hub.handler
    models = getattr(handler, "models", None)
    if models is None:
        models = ModelRegistry(hub.settings.models_dir)
    return models


@router.get("/products", response_model=Page[ProductOut], tags=["products"])
async def list_products(hub: Hub, paging: PagingDep) -> dict[str, Any]:
    """Registered product ids and their models (devices with other product ids use the default model)."""
    rows = await run_in_threadpool(queries.products, hub.engine)
    items = [
        {
            "product_id": r["product_id"],
            "model": r["model"],
            "created_at": r["created_at"],
            "devices": r["devices"],
        }
        for r in rows
    ]
    return paging.page(items[paging.offset : paging.offset + paging.limit], len(items))


@router.post("/products", response_model=ProductOut, status_code=201, tags=["products"])
async def add_product(hub: Hub, body: ProductIn) -> dict[str, Any]:
    """Register (or re-map) a product id to a product model."""
    models = models_of(hub)
    if body.model not in models:
        raise ApiError(422, f"unknown model {body.model!r}; known: {', '.join(models.names())}")
    await run_in_threadpool(registry.add_product, hub.engine, body.product_id, body.model)
    handler = hub.handler
    if hasattr(handler, "products"):
        handler.products[body.product_id] = body.model
    if getattr(hub, "cluster", None) is not None:
        await hub.cluster.products_changed()  # the other nodes reload their product map
    rows = await run_in_threadpool(queries.products, hub.engine)
    row = next(r for r in rows if r["product_id"] == body.product_id)
    return {
        "product_id": row["product_id"],
        "model": row["model"],
        "created_at": row["created_at"],
        "devices": row["devices"],
    }


def data_point_out(dp: DataPoint) -> dict[str, Any]:
    return {
        "id": dp.id,
        "code": dp.code,
        "name": dp.name,
        "access": dp.access,
        "type": dp.type,
        "writable": dp.writable,
        "unit": dp.unit,
        "display_unit": dp.display_unit,
        "min": dp.min,
        "max": dp.max,
        "step": dp.step,
        "scale": dp.scale,
        "labels": [
            {"label": label, "description": desc}
            for label, desc in zip(dp.labels, dp.label_descriptions, strict=True)
        ],
        "layout": dp.layout,
        "max_length": dp.max_length,
        "description": dp.description,
    }


def _model_head(m: ProductModel) -> dict[str, Any]:
    return {
        "model": m.model,
        "name": m.name,
        "version": m.version,
        "source": m.source,
        "product_ids": list(m.product_ids),
    }


@router.get("/models", response_model=list[ModelSummary], tags=["products"])
async def list_models(hub: Hub) -> list[dict[str, Any]]:
    """The product models this server knows (builtin and from `models_dir`)."""
    return [{**_model_head(m), "data_points": len(m)} for m in models_of(hub)]


@router.get("/models/{model}", response_model=ModelOut, tags=["products"], responses=errors(404))
async def get_model(hub: Hub, model: NameParam) -> dict[str, Any]:
    """A product model with its data-point table: units, access, type, range, scale, step, labels."""
    m = models_of(hub).get(model)
    if m is None:
        raise not_found(f"model {model!r}")
    return {**_model_head(m), "data_points": [data_point_out(dp) for dp in m]}


__all__ = ["DataPointOut", "DeviceSummary", "data_point_out", "device_summary", "models_of", "router"]
