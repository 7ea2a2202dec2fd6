"""Schemathesis against the Mender routes of the server's OpenAPI document, on a real
server with Mosquitto and PostgreSQL (see ``tests/support/openapi_fuzz.py`` for what
every generated request must meet; Losant's routes: test_server_openapi.py).

An artifact named ``0`` for device type ``0``, a device ``0`` of that type and a
deployment exist, and the generated ids are replaced by theirs, so that requests
reach past the 404s (``"0"`` is what Hypothesis tries first for a string).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import Broker
from openapi_fuzz import EMPTY_MODULE, run
from postgres import PostgresCluster
from schemathesis import GenerationMode
from server_harness import RunningServer, running_server

MENDER = "/api/management/"
#: Valid-looking input that cannot always be accepted, for reasons no schema states:
#: a Mender artifact (or the raw file one is generated from) must hold a module that
#: validates; a deployment must name an artifact and devices that exist; the seed's
#: 422s (an artifact named by a deployment, a deployment finished already).
NOT_ALWAYS_ACCEPTED = frozenset(
    {
        "POST /api/management/v1/deployments/artifacts",
        "POST /api/management/v1/deployments/artifacts/generate",
        "POST /api/management/v1/deployments/deployments",
        "PUT /api/management/v1/deployments/artifacts/{id}",
        "PUT /api/management/v1/deployments/deployments/{rollout_id}/status",
    }
)


def mender(label: str) -> bool:
    # (the login takes basic auth, not the token every case is sent with: its
    # answers are checked by hand in test_mender_login.py)
    return MENDER in label and "/useradm/auth/login" not in label


@pytest.fixture
def server(tmp_path: Path, postgres: PostgresCluster, broker: Broker) -> Iterator[RunningServer]:
    db_url = postgres.create_database(f"menderapi_{uuid.uuid4().hex[:12]}")
    with running_server(tmp_path / "server", db_url, broker.url, prefix="edge") as srv:
        yield srv


# (about a thousand requests: within the suite's 120 s limit alone, not on a busy
# machine)
@pytest.mark.timeout(300)
def test_the_mender_routes_keep_to_the_openapi_document(server: RunningServer) -> None:
    base = "/api/management/v1/deployments"
    with server.http() as c:
        doc = c.get("/openapi.json").json()
        r = c.post(f"/applications/{server.app_id}/devices", json={"name": "zero", "deviceId": "0"})
        assert r.status_code == 201, r.text
        r = c.post(
            f"{base}/artifacts/generate",
            files=[
                *((k, (None, "0")) for k in ("name", "device_types_compatible")),
                ("type", (None, "wasm-flow")),
                ("file", ("zero.wasm", EMPTY_MODULE)),
            ],
        )
        assert r.status_code == 201, r.text
        artifact = r.headers["location"].rsplit("/", 1)[1]
        r = c.post(
            f"{base}/deployments",
            json={"name": "zero", "artifact_name": "0", "devices": ["0"]},
        )
        assert r.status_code == 201, r.text
        deployment = r.headers["location"].rsplit("/", 1)[1]
    labels = [
        f"{method.upper()} {path}"
        for path, operations in doc["paths"].items()
        for method in operations
        if mender(path)
    ]
    assert len(labels) >= 20, labels

    seen = run(
        doc,
        server.url,
        server.token,
        ids={"id": artifact, "rollout_id": deployment, "device_id": "0"},
        select=mender,
        examples={GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 8},
        not_always_accepted=NOT_ALWAYS_ACCEPTED,
    )
    assert sorted(seen) == sorted(labels)
    # The generated requests reached the server's work, not only its refusals.
    for label, status in [
        (f"GET {base}/artifacts", 200),
        (f"GET {base}/deployments", 200),
        (f"GET {base}/deployments/{{rollout_id}}/statistics", 200),
        (f"GET {base}/deployments/{{rollout_id}}", 200),
        (f"GET {base}/limits/storage", 200),
    ]:
        assert seen[label].get(status, 0) > 0, (label, seen[label])
