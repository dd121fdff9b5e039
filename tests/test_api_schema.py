"""Property-based check of the API against its own /openapi.json (schemathesis, a quick run).

Every operation under /api/v1, /healthz and /metrics gets generated requests (valid and invalid),
sent with an admin token to a real running hub. Checked: no 5xx, every status code documented, the
content type documented, the body valid against the documented schema.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import RunningHub
from test_api import Api

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
PREFIXES = ("/api/v1", "/healthz", "/metrics")
MAX_EXAMPLES = 12


@pytest.fixture
def api(hub_factory: Callable[..., RunningHub], clients: Any) -> Any:
    a = Api(hub_factory("protocol", timezone="Europe/Berlin"), clients)
    yield a
    a.close()


@pytest.mark.timeout(600)  # ~75 operations x 2-3 passes: over the default 120 s on a loaded 2-core machine
def test_api_conforms_to_its_openapi_schema(api: Api) -> None:
    gw = api.gateway("gw-schema")
    gw.sync("m1", device_name="Meter one")
    gw.report("m1", "5", 2301234)
    gw.report("m1", "44", 1000000, t=time.time() - 3600)
    gw.report("m1", "19", 9)
    gw.command_code = 0

    schema = schemathesis.openapi.from_dict(api.anon.get("/openapi.json").json())
    headers = {"Authorization": f"Bearer {api.admin_token}"}
    failures: list[str] = []
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(PREFIXES):
            continue
        tested += 1
        passes: list[tuple[GenerationMode, dict[str, str] | None]] = [
            (GenerationMode.POSITIVE, None),
            (GenerationMode.NEGATIVE, None),
        ]
        # Once more against the existing device (otherwise nearly every generated cid is unknown).
        known = {k: v for k, v in (("cid", "m1"), ("dp", "5")) if f"{{{k}}}" in operation.path}
        if known:
            passes.append((GenerationMode.POSITIVE, known))
        for mode, path_parameters in passes:

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
            def run(case: Any) -> None:
                case.call_and_validate(base_url=api.base, headers=headers, checks=CHECKS, timeout=10)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
                pass
            except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failures
                failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {exc}"[:3000])
    assert tested >= 20
    assert not failures, "\n\n".join(failures)
