"""Schemathesis against the server's own OpenAPI document (``/openapi.json``), on a
real server with Mosquitto and PostgreSQL.

Every operation gets requests generated from the document, valid ones and invalid
ones, with a valid ``all.Application`` token and the real application id (a random
one would only ever meet "Application was not found"). The server must never answer
5xx, must answer with a status, content type, headers and body the document
declares, must accept what the document says is valid (a 2xx, or 401/403/404/409
for a well-formed request about something unknown or taken) and refuse what it says
is invalid (4xx). A device ``0`` and a version ``0`` of flow ``0`` exist, because
``"0"`` is what Hypothesis tries first for a string: releases, commands and
device reads then reach past the 404s.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from broker import Broker
from hypothesis import HealthCheck, Phase, given, settings
from postgres import PostgresCluster
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_harness import RunningServer, running_server

MAX_EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}
CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
]
#: Operations that valid-looking input can still not satisfy, for a reason no schema
#: states: an upload's file must be a WebAssembly module (or bundle) that validates.
NOT_ALWAYS_ACCEPTED = {
    "POST /applications/{applicationId}/flows/{flowId}/versions",
    # (a Mender artifact, or the raw file one is generated from, must hold a module)
    "POST /api/management/v1/deployments/artifacts",
    "POST /api/management/v1/deployments/artifacts/generate",
}
EMPTY_MODULE = b"\0asm\x01\0\0\0"


def fuzz(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    checks: list[Callable[..., Any]],
    statuses: dict[int, int],
) -> None:
    """Up to ``examples`` requests of ``mode`` to ``operation``, each checked."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        response = case.call(timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=checks, headers=dict(case.headers))

    call()


@contextmanager
def real_application(app_id: str, token: str) -> Iterator[None]:
    """Every case is sent to the real application with a valid token, without a
    callbackUrl. (In a
    ``before_call`` hook, so that Schemathesis sees the edit: a negative case whose
    only fault was its application id or its missing token is then a positive one.)"""

    def before_call(_context: Any, case: Any, _kwargs: dict[str, Any]) -> None:
        if "applicationId" in case.path_parameters:
            case.path_parameters["applicationId"] = app_id
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        # An export's callback would be POSTed to whatever host was generated.
        if isinstance(case.query, dict):
            case.query.pop("callbackUrl", None)
        if isinstance(case.body, dict):
            case.body.pop("callbackUrl", None)

    schemathesis.hook(before_call)
    try:
        yield
    finally:
        schemathesis.hooks.unregister(before_call)


@pytest.fixture
def server(tmp_path: Path, postgres: PostgresCluster, broker: Broker) -> Iterator[RunningServer]:
    """On PostgreSQL: the stricter of the two databases (it refuses NUL in any
    text), where input that slips past the API's checks shows first. (SQLite and
    PostgreSQL alike are driven by hand in test_server_hostile.py; fuzzing both
    would double this file's minute.)"""
    db_url = postgres.create_database(f"openapi_{uuid.uuid4().hex[:12]}")
    with running_server(tmp_path / "server", db_url, broker.url, prefix="edge") as srv:
        yield srv


@pytest.fixture
def lite(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    url = f"sqlite:///{tmp_path / 'lite.db'}"
    with running_server(tmp_path / "server", url, broker.url, prefix="edge") as srv:
        yield srv


def test_the_server_keeps_to_its_openapi_document(server: RunningServer) -> None:
    app = server.app_id
    with server.http() as c:
        doc = c.get("/openapi.json").json()
        r = c.post(f"/applications/{app}/devices", json={"name": "zero", "deviceId": "0"})
        assert r.status_code == 201, r.text
    assert server.upload("0", "0", EMPTY_MODULE).status_code == 201
    with server.http() as c:  # (so that Mender's artifact lists are not empty)
        r = c.post(
            "/api/management/v1/deployments/artifacts/generate",
            files=[
                *((k, (None, "0")) for k in ("name", "device_types_compatible")),
                ("type", (None, "wasm-flow")),
                ("file", ("zero.wasm", EMPTY_MODULE)),
            ],
        )
        assert r.status_code == 201, r.text

    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=server.url)
    # Unknown query parameters are ignored on purpose (losant-rest adds _actions,
    # _links and _embedded to every call): not a fault to look for.
    schema.config.generation.update(allow_extra_parameters=False)
    seen: dict[str, dict[int, int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 36, [op.label for op in operations]

    for operation in operations:
        checks = CHECKS
        if operation.label in NOT_ALWAYS_ACCEPTED:
            checks = [c for c in CHECKS if c is not positive_data_acceptance]
        statuses = seen.setdefault(operation.label, {})
        for mode, examples in MAX_EXAMPLES.items():
            with real_application(app, server.token):
                fuzz(operation, mode, examples, checks, statuses)

    # The generated requests reached the server's work, not only its refusals.
    def answered(label: str, status: int) -> bool:
        return seen[label].get(status, 0) > 0

    assert all(not any(s >= 500 for s in counts) for counts in seen.values()), seen
    for label, status in [
        ("GET /applications/{applicationId}/devices", 200),
        ("POST /applications/{applicationId}/devices", 201),
        ("GET /applications/{applicationId}/devices/{deviceId}", 200),
        ("POST /applications/{applicationId}/edge/deployments/release", 201),
        ("GET /applications/{applicationId}/edge/deployments", 200),
        ("POST /applications/{applicationId}/devices/export", 200),
    ]:
        assert answered(label, status), (label, seen[label])


def test_the_document_declares_errors_and_the_token(lite: RunningServer) -> None:
    doc = httpx.get(f"{lite.url}/openapi.json", timeout=30).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            codes = set(operation["responses"])
            # FastAPI's default 422 is not there (this server answers 400); Mender's
            # own 422 (an artifact used by a deployment) is.
            assert "422" not in codes or path.startswith("/api/management/"), where
            assert {"400", "404"} <= codes, where
            if path.startswith("/artifacts/"):
                assert "security" not in operation, where
                assert {"200", "206", "416"} <= codes, where
            else:
                assert operation["security"] == [{"bearer": []}], where
                assert {"401", "403"} <= codes, where
            error = operation["responses"]["404"]["content"]["application/json"]["schema"]
            shape = "MenderError" if path.startswith("/api/management/") else "ErrorBody"
            assert error == {"$ref": f"#/components/schemas/{shape}"}, where
    assert "HTTPValidationError" not in doc["components"]["schemas"]
