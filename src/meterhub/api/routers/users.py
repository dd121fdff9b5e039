"""Open hub users, their devices, and applications (access id + secret for the signed API)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from meterhub.api.deps import Hub
from meterhub.api.errors import ApiError
from meterhub.api.responses import errors
from meterhub.openhub import store

router = APIRouter(tags=["open hub users"])

Uid = Annotated[str, Path(min_length=1, max_length=64)]
Cid = Annotated[str, Path(min_length=1, max_length=128)]


class UserIn(BaseModel):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=256)


class UserOut(BaseModel):
    uid: str
    username: str
    created_at: float
    devices: list[str]


class AppIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)


class AppOut(BaseModel):
    name: str
    access_id: str
    secret: str


def _refused(exc: store.OpenHubError) -> ApiError:
    return ApiError(404 if exc.code == 1000 else 409, exc.msg)


async def _refresh(hub: Any) -> None:
    if getattr(hub, "openhub", None) is not None and hub.openhub.fanout is not None:
        await hub.openhub.fanout.refresh_bindings()
    if getattr(hub, "cluster", None) is not None:
        await hub.cluster.bindings_changed()  # the other nodes' fan-out reloads them too


@router.get("/users", response_model=list[UserOut])
async def list_users(hub: Hub) -> list[dict[str, Any]]:
    """End users of the open hub, with the devices bound to each."""
    return await run_in_threadpool(store.list_users, hub.engine)


@router.post("/users", response_model=UserOut, status_code=201, responses=errors(409))
async def create_user(hub: Hub, body: UserIn) -> dict[str, Any]:
    """Create a user (its login for Tuya-style apps); returns the uid."""
    try:
        uid = await run_in_threadpool(store.add_user, hub.engine, body.username, body.password)
    except store.OpenHubError as exc:
        raise _refused(exc) from None
    users = await run_in_threadpool(store.list_users, hub.engine)
    return next(u for u in users if u["uid"] == uid)


@router.put("/users/{uid}/devices/{cid}", status_code=204, responses=errors(404))
async def bind_device(hub: Hub, uid: Uid, cid: Cid) -> Response:
    """Let a user see a device's status and events."""
    try:
        await run_in_threadpool(store.bind, hub.engine, uid, cid)
    except store.OpenHubError as exc:
        raise _refused(exc) from None
    await _refresh(hub)
    return Response(status_code=204)


@router.delete("/users/{uid}/devices/{cid}", status_code=204, responses=errors(404))
async def unbind_device(hub: Hub, uid: Uid, cid: Cid) -> Response:
    """Stop a user seeing a device."""
    if not await run_in_threadpool(store.unbind, hub.engine, uid, cid):
        raise ApiError(404, f"device {cid!r} is not bound to user {uid!r}")
    await _refresh(hub)
    return Response(status_code=204)


@router.post("/openhub/apps", response_model=AppOut, status_code=201, responses=errors(409))
async def create_app(hub: Hub, body: AppIn) -> dict[str, Any]:
    """Create application credentials for the signed open hub API. The secret is shown once."""
    try:
        app = await run_in_threadpool(store.create_app, hub.engine, body.name)
    except store.OpenHubError as exc:
        raise _refused(exc) from None
    return {"name": app.name, "access_id": app.access_id, "secret": app.secret}
