"""Tokens scoped to sites (and the operate role): a property manager's token never sees another site,
in the API, the live stream (SSE) or CSV exports; operate may command and top up, not manage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from conftest import Client, RunningHub
from meterhub.api.security import create_token
from test_api import Api
from test_pm_api import ok


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Callable[..., Client]) -> Iterator[Api]:
    a = Api(hub_factory("protocol", timezone="UTC"), clients)
    yield a
    a.close()


def site_with_meter(api: Api, name: str, cid: str, gw) -> dict:
    site = ok(api.admin.post("/api/v1/sites", json={"name": name}), 201)
    b = ok(api.admin.post(f"/api/v1/sites/{site['id']}/buildings", json={"name": "B"}), 201)
    unit = ok(api.admin.post(f"/api/v1/buildings/{b['id']}/units", json={"name": f"{name} unit"}), 201)
    tariff = ok(
        api.admin.post(
            f"/api/v1/sites/{site['id']}/tariffs",
            json={"name": "t", "versions": [{"effective_from": "2020-01-01", "kind": "flat", "rate": "0.3"}]},
        ),
        201,
    )
    ok(api.admin.patch(f"/api/v1/sites/{site['id']}", json={"tariff_id": tariff["id"]}))
    gw.sync(cid)
    gw.report(cid, "44", 10_000, t=int(time.time()) - 30)
    ok(api.admin.put(f"/api/v1/meters/{cid}/unit", json={"unit_id": unit["id"], "at": "2020-01-01"}))
    tenant = ok(api.admin.post(f"/api/v1/sites/{site['id']}/tenants", json={"name": f"{name} tenant"}), 201)
    ok(
        api.admin.post(
            f"/api/v1/tenants/{tenant['id']}/occupancies",
            json={"unit_id": unit["id"], "move_in": "2020-01-01"},
        ),
        201,
    )
    ok(api.admin.put(f"/api/v1/meters/{cid}/prepaid", json={"balance": "3"}))
    return {"site": site, "unit": unit, "tenant": tenant}


def client(api: Api, token: str) -> httpx.Client:
    return httpx.Client(base_url=api.base, headers={"Authorization": f"Bearer {token}"})


def test_a_site_scoped_token_never_sees_another_site(api: Api) -> None:
    gw = api.gateway("gw-scope")
    gw.command_code = 0
    a = site_with_meter(api, "Alpha", "ma", gw)
    b = site_with_meter(api, "Beta", "mb", gw)
    sa, sb = a["site"]["id"], b["site"]["id"]
    read_a, _ = create_token(api.hub.engine, "pm-alpha", "read", [sa])
    op_a, _ = create_token(api.hub.engine, "op-alpha", "operate", [sa])
    admin_a, _ = create_token(api.hub.engine, "admin-alpha", "admin", [sa])
    month = time.strftime("%Y-%m", time.gmtime())
    with client(api, read_a) as ra, client(api, op_a) as oa, client(api, admin_a) as aa:
        assert [s["name"] for s in ok(ra.get("/api/v1/sites"))] == ["Alpha"]
        # everything about Beta: refused
        for path in (
            f"/api/v1/sites/{sb}",
            f"/api/v1/sites/{sb}/units",
            f"/api/v1/sites/{sb}/meters",
            f"/api/v1/units/{b['unit']['id']}",
            f"/api/v1/tenants/{b['tenant']['id']}/bill?month={month}",
            f"/api/v1/sites/{sb}/bills?month={month}&format=csv",
            "/api/v1/devices/mb",
            "/api/v1/devices/mb/history/44",
            "/api/v1/devices/mb/energy",
            "/api/v1/meters/mb/prepaid",
            f"/api/v1/audit?site_id={sb}",
        ):
            r = ra.get(path)
            assert r.status_code == 403, (path, r.status_code, r.text)
            assert "Beta" not in r.text and "mb" not in r.text.replace("mb'", "")
        # fleet-wide lists: refused (they would show other sites)
        for path in ("/api/v1/devices", "/api/v1/alarms", "/api/v1/energy", "/api/v1/gateways", "/metrics"):
            r = ra.get(path)
            assert r.status_code == 403, (path, r.status_code)
        # its own site: fine
        assert (
            ok(ra.get("/api/v1/devices/ma"))["cid"] == "ma"
            if "cid" in ok(ra.get("/api/v1/devices/ma"))
            else True
        )
        assert [m["cid"] for m in ok(ra.get(f"/api/v1/sites/{sa}/meters"))] == ["ma"]
        csv_a = ra.get(f"/api/v1/sites/{sa}/bills", params={"month": month, "format": "csv"})
        assert csv_a.status_code == 200 and "Alpha tenant" in csv_a.text and "Beta" not in csv_a.text
        audit = ok(ra.get("/api/v1/audit", params={"limit": 1000}))["items"]
        assert audit and {e["site_id"] for e in audit} == {sa}
        # the live stream: only one meter of its own sites
        assert ra.get("/api/v1/stream").status_code == 403
        assert ra.get("/api/v1/stream", params={"cid": "mb"}).status_code == 403
        with ra.stream("GET", "/api/v1/stream", params={"cid": "ma"}) as s:
            assert s.status_code == 200
            first = next(s.iter_text())
            assert "hello" in first and "mb" not in first
        # roles: read may not top up; operate may top up and command, in its site only; not manage
        assert ra.post("/api/v1/meters/ma/topups", json={"amount": "1"}).status_code == 403
        assert ok(oa.post("/api/v1/meters/ma/topups", json={"amount": "1"}), 201)["balance"] == "4.00"
        assert oa.post("/api/v1/meters/mb/topups", json={"amount": "1"}).status_code == 403
        r = oa.post("/api/v1/devices/ma/commands", json={"dp": "switch", "value": True})
        assert r.status_code == 200, r.text
        assert oa.post("/api/v1/devices/mb/commands", json={"dp": "switch", "value": True}).status_code == 403
        assert oa.post("/api/v1/vendors", json={"name": "evil"}).status_code == 403
        assert oa.post(f"/api/v1/sites/{sa}/tenants", json={"name": "x"}).status_code == 403
        # a scoped admin manages its site, but cannot move a meter into another site or create sites
        assert aa.post(f"/api/v1/sites/{sa}/tenants", json={"name": "New tenant"}).status_code == 201
        r = aa.put("/api/v1/meters/ma/unit", json={"unit_id": b["unit"]["id"]})
        assert r.status_code == 403
        assert aa.post("/api/v1/sites", json={"name": "Gamma"}).status_code == 403
        who = ok(ra.get("/ui/whoami"))
        assert who == {"name": "pm-alpha", "scope": "read", "sites": [sa]}


def test_the_cli_creates_site_scoped_operate_tokens(api: Api, tmp_path) -> None:
    site = ok(api.admin.post("/api/v1/sites", json={"name": "Delta"}), 201)
    data_dir = str(api.hub.settings.data_dir)
    args = [
        sys.executable,
        "-m",
        "meterhub",
        "token",
        "create",
        "ops-delta",
        "--scope",
        "operate",
        "--site",
        str(site["id"]),
        "--json",
        "--data-dir",
        data_dir,
    ]
    env = dict(os.environ)
    if api.hub.settings.database_url:
        env["METERHUB_DATABASE_URL"] = api.hub.settings.database_url
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    assert '"scope": "operate"' in out and f'"sites": [\n    {site["id"]}\n  ]' in out
    bad = subprocess.run(
        [*args[:5], "ops-x", *args[6:8], "--site", "999", "--data-dir", data_dir],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "site 999 does not exist" in bad.stderr
