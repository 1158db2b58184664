"""A schemathesis run against the gateway's own OpenAPI document: no input makes the gateway fail.

A 5xx is allowed only when it is the engine's doing (a relayed engine error: code ``engine_*``); every
error must be OpenAI-shaped. The fake engine sits behind, so valid requests go the whole way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.helpers import Gateway, start_gateway  # noqa: E402
from tests.integration.conftest import models_toml  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))  # per operation; the soak run raises it


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("fuzz")
    gw = start_gateway(
        root,
        models_toml(root / "models"),
        env={"GATEWAY_STALL_TIMEOUT": "3", "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_MAX_BODY_MB": "1"},
    )
    yield gw
    assert gw.proc.poll() is None, "the gateway died during the fuzz run"
    gw.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway: Gateway) -> Any:
    schema = schemathesis.openapi.from_url(fuzz_gateway.url + "/openapi.json")
    return schema.exclude(path_regex="^/admin/")


def _check(response: Any) -> None:
    status = response.status_code
    if status >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        if status >= 500:
            code = body["error"]["code"] or ""
            assert code.startswith("engine_"), f"a {status} the gateway caused itself: {body}"


def test_no_input_makes_the_gateway_fail(api_schema: Any) -> None:
    # schemathesis' own pytest plugin does not run under this pytest; its strategies do, through hypothesis.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            _check(case.call(timeout=30))

        run()


def test_the_document_is_served(fuzz_gateway: Gateway, tmp_path: Path) -> None:
    import httpx

    doc = httpx.get(fuzz_gateway.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/chat/completions" in doc["paths"]
    assert (
        "tiny-chat"
        in doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"
        ]["model"]["enum"]
    )
