"""The web console without a browser: httpx against a real server (uvicorn, PostgreSQL,
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
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import wat
from broker import MOSQUITTO, Broker, Operator
from postgres import PostgresCluster
from server_harness import RunningServer, admin, running_server
from sqlalchemy import select

from agent.server.api.app import MAX_JSON_BODY
from agent.server.console.pages_deployments import slots
from agent.server.console.pages_devices import COMMAND_POLLS
from agent.server.console.security import CSP
from agent.server.console.streams import PER_SESSION as STREAMS_PER_SESSION
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
def server(
    tmp_path_factory: pytest.TempPathFactory, mqtt: Broker, postgres: PostgresCluster
) -> Iterator[RunningServer]:
    """On PostgreSQL, the stricter database (it refuses a NUL in any text), where
    input that slips past the pages' checks shows first; the browser tests run the
    same pages on SQLite."""
    root = tmp_path_factory.mktemp("console")
    url = postgres.create_database(f"console_{uuid.uuid4().hex[:12]}")
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


@pytest.fixture(scope="module")
def as_user(
    server: RunningServer, fleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """A session signed in as a user (who alone manages tokens)."""
    pw = tmp_path_factory.mktemp("user") / "pw"
    pw.write_text("a user's long password\n")
    common = ["--db", server.db_url, "--state-dir", str(server.cfg.state_dir)]
    app = ["--application", server.app_id, "--email", "admin@example.com"]
    admin(*common, "create-user", *app, "--password-file", str(pw))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        form = {"email": "admin@example.com", "password": "a user's long password"}
        r = c.post("/console/login", data={"csrf": csrf_of(c.get("/console/login").text), **form})
        assert r.status_code == 303, r.text
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
    for path in ("/console/", "/console/login", "/console/static/vendor/htmx-ext-sse.min.js"):
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
    # errors too: a 404 page, a 500 (sent from outside every middleware), a 413
    for r in (
        browser.get("/console/devices/a%00b"),
        browser.get("/console/devices/" + "d" * 5000),
        browser.post("/console/devices/gw-1/command", content=b"x" * (MAX_JSON_BODY + 1)),
    ):
        assert r.status_code in (404, 413), r.text
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["cache-control"] == "no-store"
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
        "/console/tokens": ['id="tokens-note"', 'data-token-id="'],
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


def test_tokens_and_read_only(
    browser: httpx.Client, as_user: httpx.Client, server: RunningServer
) -> None:
    # a session signed in with a token sees the tokens, and may not make or revoke one
    page = browser.get("/console/tokens")
    assert 'id="create-token"' not in page.text
    assert 'class="revoke"' not in page.text
    token_id = re.findall(r'data-token-id="([0-9a-f]+)"', page.text)[0]
    for path, form in (
        ("/console/tokens", {"name": "t", "scope": "all.Application"}),
        (f"/console/tokens/{token_id}/revoke", {}),
    ):
        r = browser.post(path, data={"csrf": csrf_of(page.text), **form})
        assert r.status_code == 403, r.text
        assert "sign in with an email" in r.text
    # a user's session does
    page = as_user.get("/console/tokens")
    assert 'id="create-token"' in page.text
    browser = as_user
    r = browser.post(
        "/console/tokens",
        data={"csrf": csrf_of(page.text), "name": "t" * 256, "scope": ["all.Application"]},
    )
    assert r.status_code == 400  # (past the column: refused, not cut)
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
    # htmx asks again every second, COMMAND_POLLS times at most, then stops
    poll = f"/console/devices/gw-1/commands/{command_id}?left={COMMAND_POLLS - 1}"
    assert f'hx-get="{poll}" hx-trigger="every 1s"' in page.text
    fragment = browser.get(f"/console/devices/gw-1/commands/{command_id}")
    assert fragment.status_code == 200
    assert fragment.text.lstrip().startswith('<div id="command-response"')
    assert "data-done" not in fragment.text
    last = browser.get(f"/console/devices/gw-1/commands/{command_id}", params={"left": 0})
    assert "hx-get" not in last.text
    assert "reload the page" in last.text
    assert browser.get(poll.replace("left=", "left=9")).status_code == 400  # over the bound
    # the command is this device's: under another device's URL (or page) it is not found
    with server.http() as http:
        r = http.post(
            f"/applications/{server.app_id}/devices", json={"name": "gw-3", "deviceId": "gw-3"}
        )
        assert r.status_code == 201, r.text
    assert browser.get(f"/console/devices/gw-3/commands/{command_id}").status_code == 404
    assert (
        'id="command-response"'
        not in browser.get(f"/console/devices/gw-3?command={command_id}").text
    )
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
    # bad input, refused as the API refuses it: no name, a NUL in it, a payload that
    # is not JSON, nests too deep (or past the parser's recursion), is not finite
    for bad in (
        {"name": ""},
        {"name": "a\x00b"},
        {"name": "x", "payload": "{nope"},
        {"name": "x", "payload": "[" * 5000},
        {"name": "x", "payload": "[" * 40 + "]" * 40},
        {"name": "x", "payload": '{"a": NaN}'},
        {"name": "x", "payload": '"\\u0000"'},
    ):
        r = browser.post("/console/devices/gw-1/command", data={"csrf": data["csrf"], **bad})
        assert r.status_code == 400, (bad, r.text)
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


def test_a_live_stream_ends_with_its_session(server: RunningServer, fleet: dict[str, Any]) -> None:
    """Signed out (or the token revoked) in another tab: the open stream stops at its
    next look instead of serving the deployment for up to STREAM_MAX_S."""
    with server.http() as http:
        arts = http.get(f"{V1}/artifacts").json()
        r = http.post(
            f"/applications/{server.app_id}/devices", json={"name": "gw-4", "deviceId": "gw-4"}
        )
        assert r.status_code == 201, r.text
        r = http.post(
            f"{V1}/deployments",
            json={"name": "watched", "artifact_name": arts[0]["name"], "devices": ["gw-4"]},
        )
        assert r.status_code == 201, r.text
        url = f"/console/deployments/{r.headers['location'].rsplit('/', 1)[1]}/stream"
    with sign_in(server, server.token) as c:
        before = slots.open()
        with c.stream("GET", url) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: status"
            assert slots.open() == before + 1
            page = c.get("/console/")
            assert c.post("/console/logout", data={"csrf": csrf_of(page.text)}).status_code == 303
            started = time.monotonic()
            rest = list(lines)  # (ends: the stream returned)
            assert time.monotonic() - started < 30
        # it says so, and "done" closes the page's EventSource (no reconnecting)
        assert "event: done" in rest
        assert any('id="session-ended"' in line for line in rest)
        deadline = time.monotonic() + 10
        while slots.open() != before:  # the slot is given back
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the browser's reconnection, without a session: the same two events, no data
        r = c.get(url)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "event: done" in r.text
        assert 'id="session-ended"' in r.text
        assert "gw-4" not in r.text


def test_htmx_requests_without_a_session_go_to_the_sign_in(server: RunningServer) -> None:
    """A poll (htmx sends ``HX-Request: true``) after the session ended gets
    ``HX-Redirect``, so the whole page goes to the sign-in, not a fragment of it."""
    with httpx.Client(base_url=server.url) as c:
        r = c.get("/console/devices/gw-1/timeline", headers={"HX-Request": "true"})
        assert r.status_code == 401
        assert r.headers["hx-redirect"] == "/console/login"
        r = c.get("/console/devices/gw-1/timeline")
        assert r.status_code == 303


def test_a_poll_whose_subject_is_gone_stops(browser: httpx.Client, server: RunningServer) -> None:
    """htmx does not swap a 404 and would poll it for ever: a poll of a device that
    was decommissioned, or of a command no longer kept, gets its element back
    without ``hx-get``, which ends the polling. Without htmx it is a 404."""
    with server.http() as http:
        r = http.post(
            f"/applications/{server.app_id}/devices", json={"name": "gw-5", "deviceId": "gw-5"}
        )
        assert r.status_code == 201, r.text
    htmx = {"HX-Request": "true"}
    assert "hx-get" in browser.get("/console/devices/gw-5/timeline", headers=htmx).text
    with server.http() as http:
        assert http.delete(f"/applications/{server.app_id}/devices/gw-5").status_code == 200
    r = browser.get("/console/devices/gw-5/timeline", headers=htmx)
    assert r.status_code == 200
    assert 'id="timeline"' in r.text
    assert 'data-testid="gone"' in r.text
    assert "hx-get" not in r.text
    assert browser.get("/console/devices/gw-5/timeline").status_code == 404
    r = browser.get("/console/devices/gw-1/commands/0123456789abcdef01234567", headers=htmx)
    assert r.status_code == 200
    assert 'id="command-response"' in r.text
    assert "hx-get" not in r.text
    missing = browser.get("/console/devices/gw-1/commands/0123456789abcdef01234567")
    assert missing.status_code == 404


def test_ids_that_cannot_be_ids_are_not_found(browser: httpx.Client, fleet: dict[str, Any]) -> None:
    """A NUL or an overlong id in a URL is a 404 page before any query (PostgreSQL
    refuses a NUL in text: it would be a 500 there), and is not repeated back."""
    rollout = fleet["rollout"]
    csrf = csrf_of(browser.get("/console/").text)
    for bad in ("a%00b", "x" * 200, "...", "a%0Ab"):
        for r in (
            browser.get(f"/console/devices/{bad}"),
            browser.get(f"/console/devices/{bad}/timeline"),
            browser.get(f"/console/devices/gw-1/commands/{bad}"),
            browser.get(f"/console/deployments/{bad}"),
            browser.get(f"/console/deployments/{bad}/stream"),
            browser.get(f"/console/deployments/{rollout}/devices/{bad}/log"),
            browser.post(f"/console/devices/{bad}/command", data={"csrf": csrf, "name": "x"}),
            browser.post(f"/console/tokens/{bad}/revoke", data={"csrf": csrf}),
            browser.post(f"/console/artifacts/{bad}/delete", data={"csrf": csrf}),
            browser.post(f"/console/deployments/{bad}/abort", data={"csrf": csrf}),
        ):
            assert r.status_code == 404, (r.request.url, r.status_code, r.text[:300])
            assert "x" * 200 not in r.text
    r = browser.get("/console/devices/gw-1", params={"command": "a\x00b"})
    assert r.status_code == 200
    assert 'id="command-response"' not in r.text
    # the fleet's filter: a NUL is a 400 (PostgreSQL refuses it in any text)
    for name in ("q", "device_type", "tag"):
        r = browser.get("/console/", params={name: "a\x00b"})
        assert r.status_code == 400, (name, r.text[:300])
    # names past their columns are refused, not cut
    csrf = csrf_of(browser.get("/console/").text)
    r = browser.post("/console/devices/gw-1/command", data={"csrf": csrf, "name": "n" * 256})
    assert r.status_code == 400
