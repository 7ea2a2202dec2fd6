"""Schemathesis against the server's own OpenAPI document (``/openapi.json``), on a
real server with Mosquitto and PostgreSQL: Losant's routes (Mender's are fuzzed in
test_mender_openapi.py, on a server of their own, so the two run side by side).

See ``tests/support/openapi_fuzz.py`` for what every generated request must meet. A
device ``0`` and a version ``0`` of flow ``0`` exist, because ``"0"`` is what
Hypothesis tries first for a string: releases, commands and device reads then reach
past the 404s.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from broker import Broker
from openapi_fuzz import EMPTY_MODULE, run
from postgres import PostgresCluster
from schemathesis import GenerationMode
from server_harness import RunningServer, running_server

MENDER = "/api/management/"
#: Operations that valid-looking input can still not satisfy, for a reason no schema
#: states: an upload's file must be a WebAssembly module (or bundle) that validates.
NOT_ALWAYS_ACCEPTED = frozenset({"POST /applications/{applicationId}/flows/{flowId}/versions"})
#: Losant's operations, and this server's own on the same paths.
LOSANT_OPERATIONS = 25


def losant(label: str) -> bool:
    return MENDER not in label


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


# (about a thousand requests: within the suite's 120 s limit alone, not on a busy
# machine)
@pytest.mark.timeout(300)
def test_the_server_keeps_to_its_openapi_document(server: RunningServer) -> None:
    app = server.app_id
    with server.http() as c:
        doc = c.get("/openapi.json").json()
        r = c.post(f"/applications/{app}/devices", json={"name": "zero", "deviceId": "0"})
        assert r.status_code == 201, r.text
    assert server.upload("0", "0", EMPTY_MODULE).status_code == 201
    labels = [
        f"{method.upper()} {path}"
        for path, operations in doc["paths"].items()
        for method in operations
        if losant(path)
    ]
    assert len(labels) == LOSANT_OPERATIONS, labels

    seen = run(
        doc,
        server.url,
        server.token,
        ids={"applicationId": app},
        select=losant,
        examples={GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15},
        not_always_accepted=NOT_ALWAYS_ACCEPTED,
    )
    assert len(seen) == LOSANT_OPERATIONS, sorted(seen)
    # The generated requests reached the server's work, not only its refusals.
    for label, status in [
        ("GET /applications/{applicationId}/devices", 200),
        ("POST /applications/{applicationId}/devices", 201),
        ("GET /applications/{applicationId}/devices/{deviceId}", 200),
        ("POST /applications/{applicationId}/edge/deployments/release", 201),
        ("GET /applications/{applicationId}/edge/deployments", 200),
        ("POST /applications/{applicationId}/devices/export", 200),
    ]:
        assert seen[label].get(status, 0) > 0, (label, seen[label])


#: Paths that take no Bearer token: signed downloads (their own checks) and the login
#: (basic auth).
PUBLIC = ("/artifacts/", "/api/management/v1/useradm/auth/login")


def test_the_document_declares_errors_and_the_token(lite: RunningServer) -> None:
    doc = httpx.get(f"{lite.url}/openapi.json", timeout=30).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            codes = set(operation["responses"])
            # FastAPI's default 422 is not there (this server answers 400); Mender's
            # own 422s (an artifact used by a deployment, a finished one aborted) are.
            assert "422" not in codes or path.startswith(MENDER), where
            if path.startswith("/artifacts/"):
                assert "security" not in operation, where
                assert {"200", "206", "400", "404", "416"} <= codes, where
            elif path.startswith(PUBLIC):
                assert "security" not in operation, where
                assert {"200", "401"} <= codes, where
            else:
                assert operation["security"] == [{"bearer": []}], where
                assert "401" in codes, where
                # (a logout needs a valid token of any scope)
                assert "403" in codes or path.endswith("/auth/logout"), where
            if not path.startswith(MENDER):
                assert {"400", "404"} <= codes, where
            error = next(
                operation["responses"][c]["content"]["application/json"]["schema"]
                for c in ("404", "401")
                if c in operation["responses"]
            )
            shape = "MenderError" if path.startswith(MENDER) else "ErrorBody"
            assert error == {"$ref": f"#/components/schemas/{shape}"}, where
    assert "HTTPValidationError" not in doc["components"]["schemas"]
