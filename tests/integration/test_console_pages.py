"""The web console without a browser: httpx against a real server (uvicorn, SQLite,
real Mosquitto). Sign-in (token, user, read-only), every page of a fleet with a
device, a deployment, an artifact and a deployment log; each application sees only
its own data; hostile text comes back escaped; forms without their CSRF token are
refused; the security headers are on every page. (The browser tests drive the same
pages in Chromium.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import wat
from broker import MOSQUITTO, Broker, Operator
from server_harness import RunningServer, admin, running_server
from sqlalchemy import select

from agent.server.console.pages_deployments import STREAMS_PER_SESSION
from agent.server.console.security import CSP
from agent.server.db import rollouts as rollouts_repo
from agent.server.db.models import ConsoleSession

XSS = "<script>alert(1)</script>"
V1 = "/api/management/v1/deployments"


@pytest.fixture(scope="module")
def mqtt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not os.path.exists(MOSQUITTO):
        pytest.fail("mosquitto is not installed: run `make test` (it installs it)")
    broker = Broker(tmp_path_factory.mktemp("console-broker"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mqtt: Broker) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("console")
    url = f"sqlite:///{root / 'server.db'}"
    with running_server(root / "server", url, mqtt.url, prefix="plant") as srv:
        yield srv


@pytest.fixture(scope="module")
def fleet(server: RunningServer) -> dict[str, Any]:
    """A device with a hostile name and tag, a flow version, a deployment of it to the
    device, and a deployment log with a hostile line; and another application with a
    device of its own."""
    app = server.app_id
    with server.http() as http:
        r = http.post(
            f"/applications/{app}/devices",
            json={
                "name": f"boiler {XSS}",
                "tags": [{"key": "floor", "value": f"B1{XSS}"}],
                "deviceClass": "gateway",
                "deviceId": "gw-1",
            },
        )
        assert r.status_code == 201, r.text
        assert server.upload("counter", "1.0.0", bytes(wat.command())).status_code == 201
        arts = http.get(f"{V1}/artifacts").json()
        r = http.post(
            f"{V1}/deployments",
            json={"name": f"roll {XSS}", "artifact_name": arts[0]["name"], "devices": ["gw-1"]},
        )
        assert r.status_code == 201, r.text
        rollout_id = r.headers["location"].rsplit("/", 1)[1]
    with server.ctx.db.transaction() as s:
        rollouts_repo.save_log(
            s,
            app,
            "gw-1",
            "attempt-1",
            "counter",
            [{"time": "t", "level": "error", "message": XSS}],
        )
    common = ["--db", server.db_url, "--state-dir", str(server.cfg.state_dir)]
    other = admin(*common, "create-application", "--name", "other", "--prefix", "other")
    other_token = admin(
        *common, "create-token", "--application", other, "--scope", "all.Application"
    )
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other_token}"}) as h:
        r = h.post(
            f"/applications/{other}/devices", json={"name": "secret-device", "deviceId": "gw-x"}
        )
        assert r.status_code == 201, r.text
    return {"rollout": rollout_id, "artifact": arts[0]["id"], "other_token": other_token}


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


@contextlib.contextmanager
def sign_in(server: RunningServer, token: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        page = c.get("/console/login")
        r = c.post("/console/login", data={"csrf": csrf_of(page.text), "token": token})
        assert r.status_code == 303, r.text
        assert r.headers["location"] == "/console/"
        yield c


@pytest.fixture(scope="module")
def browser(server: RunningServer, fleet: dict[str, Any]) -> Iterator[httpx.Client]:
    with sign_in(server, server.token) as c:
        yield c


def test_pages_need_a_session(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        for path in (
            "/console/",
            "/console/devices/gw-1",
            "/console/deployments",
            "/console/tokens",
        ):
            r = c.get(path)
            assert r.status_code == 303, path
            assert r.headers["location"] == "/console/login"
        assert c.get("/console/login").status_code == 200
        # a forged cookie is no session
        c.cookies.set("edge_console", "forged", path="/console")
        assert c.get("/console/artifacts").status_code == 303


def test_sign_in_refusals(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        page = c.get("/console/login")
        token = csrf_of(page.text)
        cookie = page.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        # without the form's token (or with another): refused, CSRF named
        r = c.post("/console/login", data={"token": server.token})
        assert r.status_code == 403
        assert "CSRF" in r.text
        r = c.post("/console/login", data={"token": server.token, "csrf": token + "x"})
        assert r.status_code == 403
        # a wrong token, a token without a console scope, a wrong password: #error
        for data in (
            {"token": "eat_nope"},
            {"token": server.token_with("devices.get")},
            {"email": "nobody@example.com", "password": "x"},
        ):
            r = c.post("/console/login", data={"csrf": token, **data})
            assert r.status_code in (400, 401), r.text
            assert 'id="error"' in r.text
            assert "edge_console=" not in r.headers.get("set-cookie", "")


def test_security_headers(browser: httpx.Client) -> None:
    for path in ("/console/", "/console/login", "/console/static/console.js"):
        r = browser.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"
    assert browser.get("/console/").headers["cache-control"] == "no-store"
    # no inline script or style anywhere in a page
    html = browser.get("/console/").text
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
    assert "<style" not in html
    assert " style=" not in html
    # the console is not in the API's document
    doc = browser.get("/openapi.json").json()
    assert not [p for p in doc["paths"] if p.startswith("/console")]


def test_every_page_renders_escaped(browser: httpx.Client, fleet: dict[str, Any]) -> None:
    rollout = fleet["rollout"]
    pages = {
        "/console/": ['data-device-id="gw-1"', 'data-testid="flows"', "floor=B1"],
        "/console/devices/gw-1": [
            'id="device-name"',
            'id="timeline"',
            'data-deployment-id="attempt-1"',
        ],
        "/console/deployments": [f'data-deployment-id="{rollout}"'],
        f"/console/deployments/{rollout}": [
            'data-testid="stat-success"',
            'data-testid="stat-already-installed"',
            'data-phase="',
            'id="abort"',
        ],
        "/console/artifacts": [f'data-artifact-id="{fleet["artifact"]}"', 'class="delete"'],
        "/console/tokens": ['id="create-token"', 'class="revoke"'],
    }
    for path, wanted in pages.items():
        r = browser.get(path)
        assert r.status_code == 200, (path, r.text[:500])
        for w in wanted:
            assert w in r.text, (path, w)
        assert XSS not in r.text, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in browser.get("/console/devices/gw-1").text


def test_a_page_never_shows_another_application(
    browser: httpx.Client, server: RunningServer, fleet: dict[str, Any]
) -> None:
    assert "gw-x" not in browser.get("/console/").text
    assert browser.get("/console/devices/gw-x").status_code == 404
    with sign_in(server, fleet["other_token"]) as other:
        assert "gw-x" in other.get("/console/").text
        assert "gw-1" not in other.get("/console/").text
        assert other.get("/console/devices/gw-1").status_code == 404
        assert other.get(f"/console/deployments/{fleet['rollout']}").status_code == 404
        r = other.get(f"/console/deployments/{fleet['rollout']}/stream")
        assert r.status_code == 404
        page = other.get("/console/artifacts")
        assert fleet["artifact"] not in page.text
        r = other.post(
            f"/console/artifacts/{fleet['artifact']}/delete", data={"csrf": csrf_of(page.text)}
        )
        assert r.status_code == 404
    assert fleet["artifact"] in browser.get("/console/artifacts").text


def test_forms_refuse_a_missing_or_wrong_csrf(browser: httpx.Client, fleet: dict[str, Any]) -> None:
    posts = [
        f"/console/deployments/{fleet['rollout']}/abort",
        f"/console/artifacts/{fleet['artifact']}/delete",
        "/console/tokens",
        "/console/logout",
    ]
    for path in posts:
        for data in ({}, {"csrf": "wrong"}):
            r = browser.post(path, data=data)
            assert r.status_code == 403, path
            assert "CSRF" in r.text
    # nothing happened: the deployment runs, the artifact is there, still signed in
    r = browser.get(f"/console/deployments/{fleet['rollout']}")
    assert 'id="abort"' in r.text
    assert fleet["artifact"] in browser.get("/console/artifacts").text


def test_filter(browser: httpx.Client) -> None:
    def ids(**params: str) -> set[str]:
        html = browser.get("/console/", params=params).text
        return set(re.findall(r'data-device-id="([^"]+)"', html))

    assert ids(q="boiler") == {"gw-1"}
    assert ids(q="GW-1") == {"gw-1"}
    assert ids(q="nothing") == set()
    assert ids(online="yes") == set()
    assert ids(online="no") == {"gw-1"}
    assert ids(tag="floor=nope") == set()
    assert ids(device_type="other") == set()
    assert browser.get("/console/", params={"online": "maybe"}).status_code == 400


def test_tokens_and_read_only(browser: httpx.Client, server: RunningServer) -> None:
    page = browser.get("/console/tokens")
    r = browser.post(
        "/console/tokens",
        data={"csrf": csrf_of(page.text), "name": f"ro {XSS}", "scope": ["all.Application.read"]},
    )
    assert r.status_code == 200
    secret = re.search(r'<pre id="new-token">(eat_[^<]+)</pre>', r.text)
    assert secret, r.text
    assert XSS not in r.text
    with sign_in(server, secret.group(1)) as ro:
        html = ro.get("/console/artifacts").text
        assert 'id="upload"' not in html
        assert 'class="delete"' not in html
        r = ro.post(
            "/console/tokens", data={"csrf": csrf_of(html), "name": "x", "scope": "all.Device"}
        )
        assert r.status_code == 403
        # revoked: the session ends at once
        token_id = re.findall(r'data-token-id="([0-9a-f]+)"', browser.get("/console/tokens").text)[
            0
        ]
        csrf = csrf_of(browser.get("/console/tokens").text)
        assert (
            browser.post(f"/console/tokens/{token_id}/revoke", data={"csrf": csrf}).status_code
            == 303
        )
        assert ro.get("/console/").status_code == 303
    assert 'data-testid="revoked">yes' in browser.get("/console/tokens").text


def test_user_sign_in_and_logout(server: RunningServer, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("correct horse battery staple\n")
    common = ["--db", server.db_url, "--state-dir", str(server.cfg.state_dir)]
    admin(
        *common,
        "create-user",
        "--application",
        server.app_id,
        "--email",
        "ops@example.com",
        "--password-file",
        str(tmp_path / "pw"),
    )
    with httpx.Client(base_url=server.url) as c:
        csrf = csrf_of(c.get("/console/login").text)
        r = c.post(
            "/console/login", data={"csrf": csrf, "email": "ops@example.com", "password": "nope"}
        )
        assert r.status_code == 401
        assert 'id="error"' in r.text
        r = c.post(
            "/console/login",
            data={
                "csrf": csrf,
                "email": "OPS@example.com",
                "password": "correct horse battery staple",
            },
        )
        assert r.status_code == 303, r.text
        page = c.get("/console/")
        assert "ops@example.com" in page.text
        r = c.post("/console/logout", data={"csrf": csrf_of(page.text)})
        assert r.status_code == 303
        assert c.get("/console/").status_code == 303


def test_deployment_stream_and_abort(browser: httpx.Client, fleet: dict[str, Any]) -> None:
    rollout = fleet["rollout"]
    seen: list[str] = []
    with browser.stream("GET", f"/console/deployments/{rollout}/stream") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.append(line.removeprefix("event: "))
            if {"status", "statistics", "phases", "deployment-devices"} <= set(seen):
                break
    page = browser.get(f"/console/deployments/{rollout}")
    r = browser.post(f"/console/deployments/{rollout}/abort", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303
    deadline = time.monotonic() + 20
    while 'id="abort"' in (page := browser.get(f"/console/deployments/{rollout}").text):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert 'data-testid="aborted"' in page
    # a finished deployment's stream says so and ends
    with browser.stream("GET", f"/console/deployments/{rollout}/stream") as r:
        body = "".join(r.iter_text())
    assert "event: done" in body


def test_command_is_sent_and_shown(
    browser: httpx.Client, server: RunningServer, mqtt: Broker
) -> None:
    page = browser.get("/console/devices/gw-1")
    assert 'id="command"' in page.text
    data = {"csrf": csrf_of(page.text), "name": f"reboot{XSS}", "payload": '{"a": 1}'}
    r = browser.post("/console/devices/gw-1/command", data=data)
    assert r.status_code == 303, r.text
    command_id = r.headers["location"].rsplit("command=", 1)[1]
    page = browser.get(r.headers["location"])
    assert 'id="command-response"' in page.text
    assert XSS not in page.text
    assert 'data-testid="waiting"' in page.text
    assert f'data-poll="/console/devices/gw-1/commands/{command_id}"' in page.text
    fragment = browser.get(f"/console/devices/gw-1/commands/{command_id}")
    assert fragment.status_code == 200
    assert fragment.text.lstrip().startswith('<div id="command-response"')
    assert "data-done" not in fragment.text
    # the device's response (published as an agent does) comes into the fragment
    op = Operator(mqtt).connect()
    try:
        doc = {"id": command_id, "ok": True, "result": {"said": XSS}}
        op.publish("plant/gw-1/command/response", json.dumps(doc).encode(), retain=False)
        deadline = time.monotonic() + 15
        while (
            "data-done"
            not in (fragment := browser.get(f"/console/devices/gw-1/commands/{command_id}")).text
        ):
            assert time.monotonic() < deadline, fragment.text
            time.sleep(0.1)
    finally:
        op.close()
    assert 'data-testid="response"' in fragment.text
    assert "&lt;script&gt;" in fragment.text
    assert XSS not in fragment.text
    # bad input: no name, a payload that is not JSON, an unknown device
    for bad in ({"name": ""}, {"name": "x", "payload": "{nope"}):
        r = browser.post("/console/devices/gw-1/command", data={"csrf": data["csrf"], **bad})
        assert r.status_code == 400
    r = browser.post("/console/devices/gw-x/command", data={"csrf": data["csrf"], "name": "x"})
    assert r.status_code == 404


def test_an_expired_session_signs_in_again(server: RunningServer) -> None:
    with sign_in(server, server.token) as c:
        assert c.get("/console/").status_code == 200
        secret = c.cookies["edge_console"]
        digest = hashlib.sha256(secret.encode()).hexdigest()
        with server.ctx.db.transaction() as s:
            row = s.get(ConsoleSession, digest)  # only the digest is stored
            assert row is not None
            assert s.scalar(select(ConsoleSession).where(ConsoleSession.id == secret)) is None
            row.expires = datetime.now(UTC) - timedelta(seconds=1)
        r = c.get("/console/")
        assert r.status_code == 303
        assert r.headers["location"] == "/console/login"


def test_live_streams_are_bounded_per_session(
    browser: httpx.Client, server: RunningServer, fleet: dict[str, Any]
) -> None:
    with server.http() as http:
        r = http.post(
            f"/applications/{server.app_id}/devices", json={"name": "gw-2", "deviceId": "gw-2"}
        )
        assert r.status_code == 201, r.text
        arts = http.get(f"{V1}/artifacts").json()
        r = http.post(
            f"{V1}/deployments",
            json={"name": "held", "artifact_name": arts[0]["name"], "devices": ["gw-2"]},
        )
        assert r.status_code == 201, r.text
        url = f"/console/deployments/{r.headers['location'].rsplit('/', 1)[1]}/stream"
    readers = []  # (kept: a reader let go closes its stream)
    with contextlib.ExitStack() as open_streams:
        for _ in range(STREAMS_PER_SESSION):
            r = open_streams.enter_context(browser.stream("GET", url))
            assert r.status_code == 200
            readers.append(r.iter_lines())
            assert next(readers[-1]) == "event: status"
        # (streamed: were it answered 200, a plain get would read the stream forever)
        with browser.stream("GET", url) as over:
            assert over.status_code == 429
    # the streams closed by the browser are let go: a new one is taken again
    deadline = time.monotonic() + 15
    while True:
        with browser.stream("GET", url) as r:
            if r.status_code == 200:
                break
        assert time.monotonic() < deadline
        time.sleep(0.2)
