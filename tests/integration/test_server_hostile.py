"""``edge-agent server`` against bad input, on a real server (uvicorn on a free port)
with a real Mosquitto, on SQLite and, where the database matters, on PostgreSQL:
malformed bodies, unknown ids, bad tokens and scopes, oversized and invalid
uploads, path tricks, text a database cannot store, signed artifact downloads, and
concurrent releases of one flow to the same devices.

Every refusal is a clean 4xx in Losant's shape (``{"type", "message"}``) and leaves
nothing behind: no row, no file in the artifact store.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import Broker, Operator
from common import COUNTER_WASM
from server_harness import RunningServer
from sqlalchemy import func, select, update

from agent.server.artifact_store import artifact_url
from agent.server.db import applications as apps_repo
from agent.server.db.models import (
    ApiToken,
    Application,
    Blob,
    Deployment,
    DeploymentAttempt,
    Device,
    FlowVersion,
)

PREFIX = "edge"
UPLOAD_LIMIT = 256 * 1024
JSON_LIMIT = 2 << 20  # agent.server.api.app.MAX_JSON_BODY
UNKNOWN_ID = "0123456789abcdef01234567"


# ------------------------------------------------------------------ servers
@contextmanager
def running(tmp_path: Path, db_url: str, broker: Broker) -> Iterator[RunningServer]:
    srv = RunningServer(tmp_path / "server", db_url, broker.url, prefix=PREFIX)
    # A small upload limit, so that "over the limit" is quick to send.
    srv.ctx.cfg = srv.cfg = srv.cfg.model_copy(update={"max_upload": UPLOAD_LIMIT})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(tmp_path: Path, db_url: str, broker: Broker) -> Iterator[RunningServer]:
    """On SQLite and on PostgreSQL (``db_url``)."""
    with running(tmp_path, db_url, broker) as srv:
        yield srv


@pytest.fixture
def lite(tmp_path: Path, broker: Broker) -> Iterator[RunningServer]:
    """On SQLite only: for what does not depend on the database."""
    with running(tmp_path, f"sqlite:///{tmp_path / 'lite.db'}", broker) as srv:
        yield srv


# ------------------------------------------------------------------ helpers
def wasm_module(tag: str) -> bytes:
    """A valid, empty WebAssembly module with a custom section named ``tag``
    (distinct tags, distinct digests)."""
    name = tag.encode()
    section = bytes([len(name)]) + name
    assert len(section) < 128
    return b"\0asm\x01\0\0\0" + bytes([0, len(section)]) + section


def token(srv: RunningServer, *scopes: str, app_id: str | None = None) -> str:
    with srv.ctx.db.transaction() as s:
        _row, secret = apps_repo.create_token(s, app_id or srv.app_id, list(scopes))
    return secret


def other_application(srv: RunningServer) -> tuple[str, str]:
    """Another application of the same server, and an all.Application token of it."""
    with srv.ctx.db.transaction() as s:
        app = apps_repo.create_application(s, "other", "other")
        _row, secret = apps_repo.create_token(s, app.id, ["all.Application"])
        return app.id, secret


def client(srv: RunningServer, secret: str | None = None) -> httpx.Client:
    return srv.http(secret) if secret is not None else srv.http()


def check_error(
    r: httpx.Response, status: int, type_: str | None = None, message: str | None = None
) -> dict[str, Any]:
    """``r`` is the error ``status`` in Losant's shape."""
    what = f"{r.request.method} {str(r.request.url)[:160]} -> {r.status_code} {r.text[:300]}"
    assert r.status_code == status, what
    body: dict[str, Any] = r.json()
    assert set(body) == {"type", "message"}, what
    assert isinstance(body["type"], str), what
    assert isinstance(body["message"], str), what
    if type_ is not None:
        assert body["type"] == type_, what
    if message is not None:
        assert body["message"] == message, what
    return body


def clean_4xx(r: httpx.Response) -> None:
    what = f"{r.request.method} {str(r.request.url)[:160]} -> {r.status_code} {r.text[:300]}"
    assert 400 <= r.status_code < 500, what
    if r.headers.get("content-type", "").startswith("application/json"):
        assert set(r.json()) == {"type", "message"}, what


def upload(
    c: httpx.Client,
    app_id: str,
    flow_id: str,
    version: str,
    data: bytes | None,
    *,
    extra_files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
    **form: str,
) -> httpx.Response:
    files = [("artifact", ("flow.wasm", data, "application/wasm"))] if data is not None else []
    return c.post(
        f"/applications/{app_id}/flows/{flow_id}/versions",
        data={"version": version, **form},
        files=files + (extra_files or []),
    )


def create_device(c: httpx.Client, app_id: str, device_id: str, **fields: Any) -> dict[str, Any]:
    r = c.post(
        f"/applications/{app_id}/devices", json={"name": device_id, "deviceId": device_id, **fields}
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def stored(srv: RunningServer) -> tuple[list[str], int, int]:
    """Files in the artifact store (temporary ones included), flow version rows, blob rows."""
    root = srv.ctx.store.root
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    with srv.ctx.db.transaction() as s:
        versions = s.scalar(select(func.count()).select_from(FlowVersion)) or 0
        blobs = s.scalar(select(func.count()).select_from(Blob)) or 0
    return files, versions, blobs


def count_devices(srv: RunningServer) -> int:
    with srv.ctx.db.transaction() as s:
        return s.scalar(select(func.count()).select_from(Device)) or 0


def count_deployments(srv: RunningServer) -> int:
    with srv.ctx.db.transaction() as s:
        return s.scalar(select(func.count()).select_from(Deployment)) or 0


# ------------------------------------------------------------------ malformed bodies
def test_malformed_bodies_content_types_and_bounds_are_400(lite: RunningServer) -> None:
    app = lite.app_id
    base = f"/applications/{app}"
    with client(lite) as c:
        create_device(c, app, "d1")
        endpoints = [
            ("POST", f"{base}/devices"),
            ("PATCH", f"{base}/devices/d1"),
            ("POST", f"{base}/devices/command"),
            ("POST", f"{base}/devices/d1/command"),
            *(
                ("POST", f"{base}/{kind}/deployments/{op}")
                for kind in ("edge", "embedded")
                for op in ("release", "remove", "replace")
            ),
            ("POST", f"{base}/embedded/deployments/export"),
        ]
        raw_bodies = [
            (b"{", "application/json"),  # truncated
            (b"", "application/json"),  # empty
            (b"[]", "application/json"),  # not an object
            (b'"text"', "application/json"),
            (b"null", "application/json"),
            (b"\xff\xfe{}", "application/json"),  # not UTF-8
            (b'{"name": "x"} trailing', "application/json"),
            (b"[" * 100_000, "application/json"),  # nested past any parser's depth
            (b'{"name": "x"}', "text/plain"),  # JSON under another content type
            (b"name=x", "application/x-www-form-urlencoded"),
            (
                b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n1\r\n--b--\r\n",
                "multipart/form-data; boundary=b",
            ),
        ]
        for method, path in endpoints:
            for body, content_type in raw_bodies:
                r = c.request(method, path, content=body, headers={"content-type": content_type})
                check_error(r, 400, "Validation")

        # (body, a word the message names) per endpoint
        tag = {"key": "k", "value": "v"}
        bad_json: dict[str, list[tuple[dict[str, Any], str]]] = {
            "POST /devices": [
                ({"name": "x", "nope": 1}, "nope"),  # unknown field
                ({"name": ""}, "name"),
                ({"name": "n" * 256}, "name"),
                ({"name": "x", "description": "d" * 32_768}, "description"),
                ({"name": "x", "tags": [tag] * 101}, "tags"),
                ({"name": "x", "tags": [{"key": "bad key", "value": "v"}]}, "key"),
                ({"name": "x", "tags": [{"key": "k", "value": ""}]}, "value"),
                ({"name": "x", "tags": [{"key": "k", "value": True}]}, "value"),
                ({"name": "x", "deviceClass": "toaster"}, "deviceClass"),
                ({"name": "x", "attributes": [{"name": "a", "dataType": "nope"}]}, "dataType"),
                ({"name": "x", "deviceId": "../etc"}, "deviceId"),
            ],
            "PATCH /devices/d1": [({"owner": "x"}, "owner"), ({"name": ""}, "name")],
            "POST /edge/deployments/release": [
                ({"flowId": "f", "deviceIds": ["d1"], "bogus": 1}, "bogus"),
                ({"flowId": "f", "deviceIds": []}, "deviceIds"),
                ({"flowId": "f", "deviceIds": ["d1"] * 10_001}, "deviceIds"),
                ({"flowId": "f" * 65, "deviceIds": ["d1"]}, "flowId"),
                ({"flowId": "f", "version": "v" * 129, "deviceIds": ["d1"]}, "version"),
                ({"flowId": "f", "version": "v\n1", "deviceIds": ["d1"]}, "version"),
                ({"flowId": "f", "deviceIds": "d1"}, "deviceIds"),
                ({"flowId": 7, "deviceIds": ["d1"]}, "flowId"),
            ],
            "POST /edge/deployments/remove": [({}, "flowId")],
            "POST /edge/deployments/replace": [({"oldVersion": "a"}, "flowId")],
            "POST /embedded/deployments/export": [({"deviceId": "d1", "format": "zip"}, "format")],
            "POST /devices/command": [
                ({"name": "x"}, "deviceIds"),
                ({"name": "x", "deviceIds": ["d1"], "deviceTags": [tag]}, "deviceIds"),
            ],
            "POST /devices/d1/command": [
                ({"name": ""}, "name"),
                ({"name": "x", "time": "t" * 65}, "time"),
                ({"name": "x", "time": True}, "time"),
            ],
        }
        for endpoint, cases in bad_json.items():
            method, path = endpoint.split()
            for body, field in cases:
                err = check_error(c.request(method, base + path, json=body), 400, "Validation")
                assert field in err["message"], (endpoint, body, err)

        lists = [f"{base}/devices", f"{base}/edge/deployments", f"{base}/embedded/deployments"]
        bad_queries = [
            "perPage=0",
            "perPage=10001",
            "page=-1",
            "page=abc",
            "page=1&page=2",
            "sortField=nope",
            "sortDirection=sideways",
        ]
        for path in lists:
            for query in bad_queries:
                check_error(c.get(f"{path}?{query}"), 400, "Validation")
        for query in ("filterEmpty=maybe", "deviceId=" + "d" * 256):
            check_error(c.get(f"{base}/edge/deployments?{query}"), 400, "Validation")
        for query in (
            "deviceClass=toaster",
            "tagFilter[0][key]=bad%20key",
            "filterField=id&filter=x",
        ):
            check_error(c.get(f"{base}/devices?{query}"), 400, "Validation")

        # Nothing of the above changed anything.
        got = c.get(f"/applications/{app}/devices/d1").json()
        assert (got["name"], got["tags"], got["decommissioned"]) == ("d1", [], False)
    assert count_devices(lite) == 1
    assert count_deployments(lite) == 0


# ------------------------------------------------------------------ unknown ids
def test_unknown_ids_are_404_in_losant_shape(lite: RunningServer) -> None:
    app = lite.app_id
    base = f"/applications/{app}"
    with client(lite) as c:
        create_device(c, app, "d1")
        assert upload(c, app, "f", "v1", wasm_module("v1")).status_code == 201
        not_found = "Application was not found"
        for method, path in [
            ("GET", "/devices"),
            ("GET", "/devices/d1"),
            ("GET", "/edge/deployments"),
            ("GET", f"/embedded/deployments/{UNKNOWN_ID}"),
            ("GET", f"/jobs/{UNKNOWN_ID}"),
            ("GET", "/flows/f/versions"),
            ("POST", "/devices/export"),
        ]:
            r = c.request(method, f"/applications/{UNKNOWN_ID}{path}")
            check_error(r, 404, "NotFound", not_found)
        r = c.post(
            f"/applications/{UNKNOWN_ID}/edge/deployments/release",
            json={"flowId": "f", "version": "v1", "deviceIds": ["d1"]},
        )
        check_error(r, 404, "NotFound", not_found)
        check_error(upload(c, UNKNOWN_ID, "f", "v2", wasm_module("v2")), 404, "NotFound", not_found)

        check_error(c.get(f"{base}/devices/nope"), 404, "NotFound", "Device nope was not found")
        check_error(c.patch(f"{base}/devices/nope", json={"name": "x"}), 404, "NotFound")
        check_error(c.delete(f"{base}/devices/nope"), 404, "NotFound")
        check_error(c.post(f"{base}/devices/nope/command", json={"name": "x"}), 404, "NotFound")
        r = c.post(f"{base}/devices/command", json={"name": "x", "deviceIds": ["d1", "nope"]})
        check_error(r, 404, "NotFound", "Device nope was not found")
        for kind in ("edge", "embedded"):
            r = c.get(f"{base}/{kind}/deployments/{UNKNOWN_ID}")
            check_error(r, 404, "NotFound", "Deployment was not found")
            r = c.post(
                f"{base}/{kind}/deployments/release",
                json={"flowId": "f", "version": "v1", "deviceIds": ["d1", "nope"]},
            )
            check_error(r, 404, "NotFound", "Device nope was not found")
            r = c.post(
                f"{base}/{kind}/deployments/release",
                json={"flowId": "f", "version": "v9", "deviceIds": ["d1"]},
            )
            check_error(r, 404, "NotFound", "Version v9 of flow f was not found")
            r = c.post(f"{base}/{kind}/deployments/remove", json={"deviceId": "nope"})
            check_error(r, 404, "NotFound")
        r = c.post(f"{base}/embedded/deployments/export", json={"deviceId": "nope"})
        check_error(r, 404, "NotFound")
        check_error(c.get(f"{base}/jobs/{UNKNOWN_ID}"), 404, "NotFound", "Job was not found")
        check_error(c.get(f"{base}/jobs/{UNKNOWN_ID}/download"), 404, "NotFound")
        # A deployment of one kind is unknown under the other.
        r = c.post(
            f"{base}/edge/deployments/release",
            json={"flowId": "f", "version": "v1", "deviceIds": ["d1"]},
        )
        assert r.status_code == 201, r.text
        edge_id = c.get(f"{base}/edge/deployments").json()["items"][0]["id"]
        assert c.get(f"{base}/edge/deployments/{edge_id}").status_code == 200
        check_error(c.get(f"{base}/embedded/deployments/{edge_id}"), 404, "NotFound")
        # Unknown routes and methods.
        check_error(c.get(f"{base}/widgets"), 404, "NotFound")
        r = c.put(f"{base}/devices/d1", json={})
        check_error(r, 405, "MethodNotAllowed")
        assert "GET" in r.headers["allow"]


# ------------------------------------------------------------------ tokens
def test_missing_invalid_revoked_and_foreign_tokens(lite: RunningServer) -> None:
    app = lite.app_id
    other_app, other_secret = other_application(lite)
    revoked = token(lite, "all.Application")
    with lite.ctx.db.transaction() as s:
        digest = hashlib.sha256(revoked.encode()).hexdigest()
        s.execute(update(ApiToken).where(ApiToken.secret_sha256 == digest).values(revoked=True))
    with client(lite) as c:
        create_device(c, app, "d1")
    garbage = b"--b\r\nnot a form at all"  # an upload whose form would be a 400 if read
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/devices", {}),
        ("GET", "/devices/d1", {}),
        ("POST", "/devices", {"json": {"name": "x"}}),
        ("DELETE", "/devices/d1", {}),
        ("POST", "/edge/deployments/release", {"json": {"flowId": "f", "deviceIds": ["d1"]}}),
        ("GET", "/embedded/deployments", {}),
        ("GET", f"/jobs/{UNKNOWN_ID}", {}),
        ("GET", "/flows/f/versions", {}),
        (
            "POST",
            "/flows/f/versions",
            {"content": garbage, "headers": {"content-type": "multipart/form-data; boundary=b"}},
        ),
    ]
    headers_401 = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {lite.token}"},
        {"Authorization": "Bearer eat_not-a-token"},
        {"Authorization": f"Bearer {lite.token}x"},
        {"Authorization": f"Bearer {lite.token[:-1]}"},
        {"Authorization": "Bearer " + "eat_" + "a" * 5000},
        {"Authorization": f"Bearer {revoked}"},
    ]
    with httpx.Client(base_url=lite.url, timeout=30) as c:
        for method, path, kw in requests:
            for auth in headers_401:
                headers = {**kw.get("headers", {}), **auth}
                args = {k: v for k, v in kw.items() if k != "headers"}
                r = c.request(method, f"/applications/{app}{path}", headers=headers, **args)
                check_error(r, 401, "Unauthorized")
            # Another application's token: this application "was not found".
            headers = {**kw.get("headers", {}), "Authorization": f"Bearer {other_secret}"}
            args = {k: v for k, v in kw.items() if k != "headers"}
            r = c.request(method, f"/applications/{app}{path}", headers=headers, **args)
            check_error(r, 404, "NotFound", "Application was not found")
            # ... and this application's token on the other application, likewise.
            headers["Authorization"] = f"Bearer {lite.token}"
            r = c.request(method, f"/applications/{other_app}{path}", headers=headers, **args)
            check_error(r, 404, "NotFound", "Application was not found")
    with client(lite) as c:
        got = c.get(f"/applications/{app}/devices/d1").json()
    assert got["decommissioned"] is False
    assert count_devices(lite) == 1


# ------------------------------------------------------------------ scopes
def test_each_endpoint_family_wants_its_scopes(lite: RunningServer) -> None:
    app = lite.app_id
    base = f"/applications/{app}"
    with client(lite) as c:
        for device_id in ("d1", "d2"):
            create_device(c, app, device_id)
        assert upload(c, app, "f", "v1", wasm_module("v1")).status_code == 201
        r = c.post(
            f"{base}/edge/deployments/release",
            json={"flowId": "f", "version": "v1", "deviceIds": ["d1"]},
        )
        assert r.status_code == 201, r.text
        edge_id = c.get(f"{base}/edge/deployments").json()["items"][0]["id"]
        devices_job = c.post(f"{base}/devices/export").json()["jobId"]

    bodies: dict[str, dict[str, Any]] = {
        "/edge/deployments/release": {"flowId": "f", "version": "v1", "deviceIds": ["d2"]},
        "/embedded/deployments/release": {"flowId": "f", "version": "v1", "deviceIds": ["d2"]},
        "/edge/deployments/remove": {"flowId": "nope"},
        "/edge/deployments/replace": {"flowId": "nope"},
        "/embedded/deployments/export": {"deviceId": "d1"},
        "/devices": {"name": "new"},
        "/devices/command": {"name": "x", "deviceIds": ["nope"]},
        "/devices/d2": {"description": "changed"},
        "/devices/nope/command": {"name": "x"},
    }
    # endpoint | scopes that may call it | scopes that may not
    table = f"""
    GET /edge/deployments | edgeDeployments.get all.Application.read
        | edgeDeployment.get embeddedDeployments.* devices.* all.Device
    GET /edge/deployments/{edge_id} | edgeDeployment.get all.User.read
        | edgeDeployments.get embeddedDeployment.get all.Device.read
    POST /edge/deployments/release | edgeDeployments.release edgeDeployments.*
        | edgeDeployments.get all.Application.read embeddedDeployments.release all.Device
    POST /edge/deployments/remove | edgeDeployments.remove
        | edgeDeployments.release all.Organization.read
    POST /edge/deployments/replace | edgeDeployments.replace
        | edgeDeployments.remove all.User.read
    GET /embedded/deployments | embeddedDeployments.get | edgeDeployments.get
    POST /embedded/deployments/release | embeddedDeployments.release
        | edgeDeployments.release embeddedDeployments.get all.Application.read
    POST /embedded/deployments/export | embeddedDeployments.export all.Application.read
        | embeddedDeployments.get devices.export all.Device
    GET /devices | devices.get all.Device.read all.Device | device.get edgeDeployments.*
    POST /devices | devices.post | devices.get all.Device all.Application.read device.patch
    POST /devices/export | devices.export all.Organization.read | devices.get all.Device
    POST /devices/command | devices.sendCommand all.Device
        | devices.get all.Device.read device.sendCommand
    GET /devices/d2 | device.get all.Device.read | devices.get device.patch
    PATCH /devices/d2 | device.patch device.*
        | device.get devices.* all.Device all.Application.read
    POST /devices/nope/command | device.sendCommand all.Device | devices.get all.Device.read
    DELETE /devices/d2 | device.delete
        | device.get device.patch devices.* all.Device all.Application.read
    GET /flows/f/versions | flows.get all.Application.read | flows.post devices.*
    GET /jobs/{devices_job} | devices.export all.Application.read
        | embeddedDeployments.export devices.get
    GET /jobs/{devices_job}/download | devices.export | embeddedDeployments.*
    """
    rows = [line.split("|") for line in table.replace("\n        |", " |").strip().splitlines()]
    assert len(rows) == 19
    for endpoint, _may, may_not in rows:
        method, path = endpoint.split()
        for scope in may_not.split():
            with client(lite, token(lite, scope)) as c:
                r = c.request(method, base + path, json=bodies.get(path))
            check_error(r, 403, "Forbidden")
    # A denied change changed nothing: d2 got no deployment, kept its description,
    # was not decommissioned; no device "new" was made.
    with client(lite) as c:
        d2 = c.get(f"{base}/devices/d2").json()
        assert (d2["description"], d2["decommissioned"]) == ("", False)
        assert [d["deviceId"] for d in c.get(f"{base}/edge/deployments").json()["items"]] == ["d1"]
        assert c.get(f"{base}/embedded/deployments").json()["items"] == []
    assert count_devices(lite) == 2
    for endpoint, may, _may_not in rows:
        method, path = endpoint.split()
        for scope in may.split():
            with client(lite, token(lite, scope)) as c:
                r = c.request(method, base + path, json=bodies.get(path))
            assert r.status_code not in (401, 403), (scope, endpoint, r.status_code, r.text)

    # Uploads: checked before the form is read (a garbage form: 403, not 400).
    garbage = {
        "content": b"--b\r\nnot a form",
        "headers": {"content-type": "multipart/form-data; boundary=b"},
    }
    for scope in ("flows.get", "all.Application.read", "devices.*", "all.Device"):
        with client(lite, token(lite, scope)) as c:
            check_error(c.post(f"{base}/flows/f/versions", **garbage), 403, "Forbidden")
            check_error(upload(c, app, "f", "v2", wasm_module("v2")), 403, "Forbidden")
    assert stored(lite)[1] == 1
    with client(lite, token(lite, "flows.post")) as c:
        assert upload(c, app, "f", "v2", wasm_module("v2")).status_code == 201


# ------------------------------------------------------------------ uploads
def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def multipart(boundary: str, version: str, payload: bytes) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n{version}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="artifact"; filename="f.wasm"'
            "\r\nContent-Type: application/wasm\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_oversized_and_invalid_uploads_store_nothing(server: RunningServer) -> None:
    app = server.app_id
    base = f"/applications/{app}"
    assert stored(server) == ([], 0, 0)
    big = b"\0asm\x01\0\0\0" + b"\0" * (UPLOAD_LIMIT + (1 << 20))  # over the body limit too
    just_over = b"\0asm\x01\0\0\0" + b"\0" * UPLOAD_LIMIT  # over the file limit only
    mp = "multipart/form-data; boundary=XyZ"
    with client(server) as c:
        create_device(c, app, "d1")
        # Over the limit with a Content-Length, without one (chunked), and by a file
        # that fits the body limit but not the upload limit.
        r = c.post(
            f"{base}/flows/f/versions",
            content=multipart("XyZ", "v1", big),
            headers={"content-type": mp},
        )
        check_error(r, 413, "RequestTooLarge")
        body = multipart("XyZ", "v1", big)
        r = c.post(f"{base}/flows/f/versions", content=chunks(body), headers={"content-type": mp})
        assert "content-length" not in r.request.headers
        check_error(r, 413, "RequestTooLarge")
        check_error(upload(c, app, "f", "v1", just_over), 413, "RequestTooLarge")
        # JSON bodies have their own limit, with or without a Content-Length.
        huge = json.dumps({"flowId": "f", "deviceIds": ["d1"], "pad": "x" * JSON_LIMIT}).encode()
        for content in (huge, chunks(huge)):
            r = c.post(
                f"{base}/edge/deployments/release",
                content=content,
                headers={"content-type": "application/json"},
            )
            check_error(r, 413, "RequestTooLarge")
        assert stored(server) == ([], 0, 0)

        # Bytes that are not what the kind says.
        gz = b"\x1f\x8b\x08\x00" + b"\0" * 16
        refused = [
            ("wasm", b"not a module"),
            ("wasm", b"\0asm"),  # the magic alone
            ("wasm", b"\0asm\x01\0\0\0garbage after a good header"),
            ("wasm", b"\0asm\x02\0\0\0"),  # another version
            ("wasm", gz),
            ("eea", b"\x7fELF\x02\x01\x01"),
            ("bundle", gz),
            ("bundle", COUNTER_WASM.read_bytes()),
        ]
        for kind, data in refused:
            check_error(upload(c, app, "f", "v1", data, kind=kind), 400, "Validation")
        check_error(upload(c, app, "f", "v1", b""), 400, "Validation")
        check_error(upload(c, app, "f", "v1", wasm_module("ok"), kind="exe"), 400, "Validation")
        # Several files: one bad one refuses them all, the good ones are not kept.
        files = [
            ("artifacts", ("a.wasm", wasm_module("a"), "application/wasm")),
            ("artifacts", ("b.wasm", b"junk", "application/wasm")),
        ]
        r = upload(c, app, "f", "v1", None, extra_files=files, deviceTypes='[["a"], ["b"]]')
        check_error(r, 400, "Validation")
        # Form fields out of bounds, unknown, deeply nested or not storable.
        for form in (
            {"manifest": "[" * 50_000},
            {"deviceTypes": "[" * 50_000},
            {"manifest": '{"config": {"a": "\\ud800"}}'},
            {"manifest": '{"config": {"a": NaN}}'},
            {"manifest": '{"owner": "me"}'},
            {"deviceTypes": '["gw\\u0000"]'},
            {"notes": "n" * 4097},
            {"owner": "me"},
        ):
            check_error(upload(c, app, "f", "v1", wasm_module("v1"), **form), 400, "Validation")
        for version in ("", "v" * 129, "v\x001", "v\n1"):
            check_error(upload(c, app, "f", version, wasm_module("v1")), 400, "Validation")
        for flow_id in ("%2e%2e", "a.b.c" * 20, "é", "a%00"):
            check_error(upload(c, app, flow_id, "v1", wasm_module("v1")), 400, "Validation")
        assert stored(server) == ([], 0, 0)

        # What is accepted is stored once; a second upload of a version is a 409
        # that adds nothing, even with other bytes.
        assert upload(c, app, "f", "v1", wasm_module("v1")).status_code == 201
        files_then, versions, blobs = stored(server)
        assert (len(files_then), versions, blobs) == (1, 1, 1)
        check_error(upload(c, app, "f", "v1", wasm_module("other")), 409, "Conflict")
        assert stored(server) == (files_then, 1, 1)
        assert not [f for f in files_then if ".upload-" in f]


# ------------------------------------------------------------------ text and paths
#: Ids that are no device's, application's, deployment's, job's or flow's.
PATH_TRICKS = [
    "..",
    "%2e%2e",
    "%2E%2E%2F..%2Fetc%2Fpasswd",
    "..%5C..%5Cwindows",
    "%00",
    "a%00b",
    "0123456789abcdef0123456%00",
    "x" * 5000,
    "%C3%A9t%C3%A9",
    "%F0%9F%92%A5",
    "%ff%fe",
    "%ud800",
    "%ED%A0%80",  # a surrogate, UTF-8 encoded
    "a%20b",
    "%0d%0aX-Injected:%201",
]


def test_path_tricks_and_unstorable_text_are_clean_4xx(server: RunningServer) -> None:
    app = server.app_id
    base = f"/applications/{app}"
    with client(server) as c:
        create_device(c, app, "d1")
        assert upload(c, app, "f", "v1", wasm_module("v1")).status_code == 201
        r = c.post(
            f"{base}/edge/deployments/release",
            json={"flowId": "f", "version": "v1", "deviceIds": ["d1"]},
        )
        assert r.status_code == 201, r.text
        job = c.post(f"{base}/devices/export").json()["jobId"]
        sha = c.get(f"{base}/flows/f/versions").json()["items"][0]["sha256"]

        for trick in PATH_TRICKS:
            must_404 = [
                ("GET", f"/applications/{trick}/devices"),
                ("GET", f"{base}/devices/{trick}"),
                ("PATCH", f"{base}/devices/{trick}"),
                ("DELETE", f"{base}/devices/{trick}"),
                ("POST", f"{base}/devices/{trick}/command"),
                ("GET", f"{base}/edge/deployments/{trick}"),
                ("GET", f"{base}/embedded/deployments/{trick}"),
                ("GET", f"{base}/jobs/{trick}"),
                ("GET", f"{base}/jobs/{trick}/download"),
                ("GET", f"/artifacts/{trick}/{sha}?sig=00"),
                ("GET", f"/artifacts/{app}/{trick}?sig=00"),
            ]
            for method, path in must_404:
                kw: dict[str, Any] = {"json": {"name": "x"}} if method in ("PATCH", "POST") else {}
                r = c.request(method, path, **kw)
                check_error(r, 404, "NotFound")
                assert len(r.text) < 1000  # the trick is not echoed back whole
            for method, path in [
                ("GET", f"{base}/flows/{trick}/versions"),
                ("POST", f"{base}/flows/{trick}/versions"),
            ]:
                if method == "POST":
                    r = upload(c, app, trick, "v9", wasm_module("v9"))
                else:
                    r = c.get(path)
                clean_4xx(r)
        # "../" as such (clients normalise it away; sent here as the raw target).
        for target in (
            f"{base}/devices/../../../etc/passwd",
            f"{base}/devices/d1/../d1",
            f"/artifacts/{app}/../../{sha}",
        ):
            req = c.build_request("GET", server.url, extensions={"target": target.encode()})
            clean_4xx(c.send(req))
        # A request line past uvicorn's limit is refused, not served.
        clean_4xx(c.get(f"{base}/devices/{'x' * 20_000}"))

        # Text that PostgreSQL (NUL) or any UTF-8 database (lone surrogates) cannot
        # store, NaN, and deep nesting, in bodies (raw JSON text) ...
        deep = "[" * 40 + "]" * 40
        attribute = '{"name": "ok", "attributes": [{"name": "a", "dataType": "number", %s}]}'
        raw_bodies = {
            "POST /devices": [
                '{"name": "a\\u0000b"}',
                '{"name": "a\\ud800b"}',
                '{"name": "ok", "description": "\\u0000"}',
                attribute % '"x\\u0000": 1',
                attribute % '"x": "\\udfff"',
                attribute % '"x": NaN',
                attribute % f'"x": {deep}',
                '{"name": "ok", "tags": [{"key": "k", "value": Infinity}]}',
            ],
            "PATCH /devices/d1": ['{"name": "\\u0000"}', '{"description": "\\ud800"}'],
            "POST /edge/deployments/release": [
                '{"flowId": "f", "version": "v\\u0000", "deviceIds": ["d1"]}',
                '{"flowId": "f", "version": "\\ud800", "deviceIds": ["d1"]}',
            ],
            "POST /edge/deployments/replace": [
                '{"flowId": "f", "oldVersion": "\\ud800", "newVersion": ""}'
            ],
            "POST /devices/d1/command": [
                '{"name": "x\\u0000"}',
                f'{{"name": "x", "payload": {deep}}}',
                '{"name": "x", "time": NaN}',
            ],
            "POST /embedded/deployments/export": [
                '{"deviceId": "d1", "callbackUrl": "http://\\u0000"}'
            ],
        }
        for endpoint, texts in raw_bodies.items():
            method, path = endpoint.split()
            for text in texts:
                r = c.request(
                    method,
                    base + path,
                    content=text.encode(),
                    headers={"content-type": "application/json"},
                )
                check_error(r, 400, "Validation")
        # ... ids of devices and flows with path tricks, in bodies ...
        for device_id in ("../d1", "..", "d1/x", "d1\u0000", "x" * 65, "d\u00e9", "%2e%2e", ""):
            for path, body in [
                ("/edge/deployments/release", {"flowId": "f", "deviceIds": [device_id]}),
                ("/devices/command", {"name": "x", "deviceIds": [device_id]}),
                ("/edge/deployments/remove", {"deviceId": device_id}),
                ("/embedded/deployments/export", {"deviceId": device_id}),
                ("/devices", {"name": "x", "deviceId": device_id}),
            ]:
                check_error(c.post(base + path, json=body), 400, "Validation")
        for flow_id in ("../f", "f\u0000", "f/g", "..", "\u00e9", ""):
            for path, body in [
                ("/edge/deployments/release", {"flowId": flow_id, "deviceIds": ["d1"]}),
                ("/embedded/deployments/remove", {"flowId": flow_id}),
                ("/edge/deployments/replace", {"flowId": flow_id, "newVersion": "v1"}),
            ]:
                check_error(c.post(base + path, json=body), 400, "Validation")
        # ... and in query parameters.
        for query in (
            "/edge/deployments?deviceId=a%00",
            "/edge/deployments?flowId=%00",
            "/embedded/deployments?version=%ED%A0%80%00",
            "/devices?deviceClass=%00",
            "/devices?filter=a%00*",
            "/devices?tagFilter[0][value]=%00",
        ):
            check_error(c.get(base + query), 400, "Validation")
        for query in (
            "?email=%00",
            "?callbackUrl=http://%00",
            "?callbackUrl=file:///etc/passwd",
            "?callbackUrl=http://",
        ):
            check_error(c.post(f"{base}/devices/export{query}"), 400, "Validation")

        # Nothing was stored or changed; the server still serves.
        d1 = c.get(f"{base}/devices/d1").json()
        assert (d1["name"], d1["description"], d1["desired"]["generation"]) == ("d1", "", 1)
        assert c.get(f"{base}/jobs/{job}").status_code == 200
    assert count_devices(server) == 1
    assert count_deployments(server) == 1

    # Text that is merely unusual is stored and given back as it was.
    with client(server) as c:
        fields = {
            "name": "Kühlraum ❄ 東京 \U0001f9ca",
            "description": "line 1\nline 2\t\u202e\u0007 ..\\..",
            "tags": [{"key": "floor", "value": "8 ½"}],
        }
        made = create_device(c, app, "u-1", **fields)
        got = c.get(f"{base}/devices/u-1").json()
        for key, value in fields.items():
            assert made[key] == got[key] == value
        listed = c.get(f"{base}/devices", params={"filter": "Kühlraum*"}).json()["items"]
        assert [d["id"] for d in listed] == ["u-1"]
        assert upload(c, app, "f", "v2-β ☃", wasm_module("v2")).status_code == 201
        r = c.post(
            f"{base}/edge/deployments/release",
            json={"flowId": "f", "version": "v2-β ☃", "deviceIds": ["u-1"]},
        )
        assert r.status_code == 201, r.text
        items = c.get(f"{base}/edge/deployments", params={"version": "v2-β ☃"}).json()["items"]
        assert [d["deviceId"] for d in items] == ["u-1"]


# ------------------------------------------------------------------ artifacts
def test_signed_artifact_downloads_and_ranges(lite: RunningServer) -> None:
    app = lite.app_id
    base = f"/applications/{app}"
    wasm = COUNTER_WASM.read_bytes()
    size = len(wasm)
    other_app, _secret = other_application(lite)
    with client(lite) as c:
        create_device(c, app, "d1")
        assert upload(c, app, "f", "v1", wasm).status_code == 201
        r = c.post(
            f"{base}/edge/deployments/release",
            json={"flowId": "f", "version": "v1", "deviceIds": ["d1"]},
        )
        assert r.status_code == 201, r.text
        ref = c.get(f"{base}/devices/d1").json()["desired"]["flows"]["f"]["artifact"]
    url, sha = ref["url"], ref["sha256"]
    assert sha == hashlib.sha256(wasm).hexdigest()
    assert url.startswith(f"{lite.url}/artifacts/{app}/{sha}?sig=")
    with lite.ctx.db.transaction() as s:
        keys = {a.id: a.url_key for a in s.scalars(select(Application))}

    with httpx.Client(timeout=30) as c:  # no token: the signature is the credential
        r = c.get(url)
        assert r.status_code == 200
        assert r.content == wasm
        assert r.headers["x-checksum-sha256"] == sha
        assert r.headers["accept-ranges"] == "bytes"

        for header, expected, content_range in [
            ("bytes=0-3", wasm[:4], f"bytes 0-3/{size}"),
            ("bytes=-4", wasm[-4:], f"bytes {size - 4}-{size - 1}/{size}"),
            ("bytes=100-", wasm[100:], f"bytes 100-{size - 1}/{size}"),
            (f"bytes=10-{size * 2}", wasm[10:], f"bytes 10-{size - 1}/{size}"),
        ]:
            r = c.get(url, headers={"Range": header})
            assert r.status_code == 206, (header, r.status_code)
            assert r.content == expected, header
            assert r.headers["content-range"] == content_range
        r = c.get(url, headers={"Range": "bytes=0-1,4-5"})
        assert r.status_code == 206
        assert r.headers["content-type"].startswith("multipart/byteranges")
        assert wasm[0:2] in r.content
        assert wasm[4:6] in r.content
        r = c.get(url, headers={"Range": f"bytes={size}-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == f"bytes */{size}"
        for malformed in ("bytes=abc", "pages=1-2", "bytes=5-3", "bytes", "bytes=-"):
            r = c.get(url, headers={"Range": malformed})
            assert (r.status_code, r.content) == (200, wasm), malformed

        def sig_url(app_id: str, key: str, expires: int | None = None, digest: str = sha) -> str:
            return artifact_url(lite.url, key, app_id, digest, expires)

        now = int(time.time())
        assert c.get(sig_url(app, keys[app], now + 3600)).content == wasm
        flipped = url[:-1] + ("0" if url[-1] != "0" else "1")
        for bad in [
            flipped,
            url.split("?")[0] + "?sig=" + "0" * 64,
            url.split("?")[0] + "?sig=%C3%A9",  # non-ASCII (compare_digest would raise)
            url.split("?")[0] + "?sig=",
            sig_url(app, keys[app], now - 1),  # expired
            url + f"&expires={now + 3600}",  # an expiry the signature does not cover
            sig_url(app, keys[other_app]),  # signed with the other application's key
            url.replace(f"/artifacts/{app}/", f"/artifacts/{other_app}/"),  # its id, our sig
            url.replace(sha, sha.upper()),
            sig_url(app, keys[app], digest="0" * 64),  # a valid signature of a digest not held
        ]:
            check_error(c.get(bad), 404, "NotFound", "Artifact was not found")
        check_error(c.get(url.split("?")[0]), 400, "Validation")  # no sig at all
        check_error(c.get(url + "&expires=soon"), 400, "Validation")


# ------------------------------------------------------------------ concurrency
THREADS = 8
DEVICES = ["c1", "c2", "c3", "c4"]


def targets(i: int) -> list[str]:
    """Release i goes to the first 1 + i % 4 devices: c1 gets all 8, c4 only 2."""
    return DEVICES[: 1 + i % len(DEVICES)]


async def test_concurrent_releases_leave_whole_documents(
    server: RunningServer, operator: Operator
) -> None:
    app = server.app_id
    base = f"/applications/{app}"
    with client(server) as c:
        for device_id in DEVICES:
            create_device(c, app, device_id)
        for i in range(THREADS):
            assert upload(c, app, "f", f"v{i}", wasm_module(f"v{i}")).status_code == 201

    barrier = threading.Barrier(THREADS)
    answers: dict[int, httpx.Response] = {}

    def release(i: int) -> None:
        with client(server) as c:
            barrier.wait(10)
            answers[i] = c.post(
                f"{base}/edge/deployments/release",
                json={"flowId": "f", "version": f"v{i}", "deviceIds": targets(i)},
            )

    threads = [threading.Thread(target=release, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == list(range(THREADS))
    for i, r in answers.items():
        assert r.status_code == 201, (i, r.status_code, r.text)
        assert r.json() == {"success": True}

    touched = {d: sum(d in targets(i) for i in range(THREADS)) for d in DEVICES}
    with server.ctx.db.transaction() as s:
        rows = {d.id: d for d in s.scalars(select(Device).where(Device.application_id == app))}
        deps = {d.device_id: d for d in s.scalars(select(Deployment))}
        attempts = {
            device_id: list(
                s.scalars(
                    select(DeploymentAttempt)
                    .where(DeploymentAttempt.deployment_id == dep.id)
                    .order_by(DeploymentAttempt.generation)
                )
            )
            for device_id, dep in deps.items()
        }
    for device_id in DEVICES:
        dev = rows[device_id]
        assert dev.generation == touched[device_id], device_id
        assert dev.desired["generation"] == dev.generation
        assert dev.published_generation == dev.generation
        entry = dev.desired["flows"]["f"]
        assert entry["version"] in {f"v{i}" for i in range(THREADS) if device_id in targets(i)}
        assert (
            entry["artifact"]["sha256"] == hashlib.sha256(wasm_module(entry["version"])).hexdigest()
        )
        # One attempt per release, in generation order, all but the last superseded,
        # the last one the document's.
        runs = attempts[device_id]
        assert [a.generation for a in runs] == list(range(1, touched[device_id] + 1))
        assert [a.status for a in runs[:-1]] == ["superseded"] * (len(runs) - 1)
        assert runs[-1].status == "pending"
        assert runs[-1].id == entry["deploymentId"]
        assert runs[-1].version == entry["version"] == deps[device_id].desired_version

    # What the broker retains is exactly what the database holds.
    operator.subscribe(f"{PREFIX}/+/desired")
    for device_id in DEVICES:
        want = rows[device_id].desired
        got = await operator.wait_for(
            f"{PREFIX}/{device_id}/desired",
            lambda d, g=want["generation"]: d.get("generation") == g,
            10,
        )
        assert got == want

    # Uploads of the same bytes as several versions at once: one file, one blob,
    # every version recorded (a blob row insert that loses the race is no conflict).
    same = wasm_module("same")
    results: dict[int, int] = {}
    barrier2 = threading.Barrier(4)

    def upload_same(i: int) -> None:
        with client(server) as c:
            barrier2.wait(10)
            results[i] = upload(c, app, "g", f"s{i}", same).status_code

    threads = [threading.Thread(target=upload_same, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == dict.fromkeys(range(4), 201)
    files, versions, blobs = stored(server)
    assert (len(files), versions, blobs) == (THREADS + 1, THREADS + 4, THREADS + 1)
