"""The web console in a real browser: Debian's Chromium driven by Playwright, against a
real server (uvicorn, SQLite), real Mosquitto and real sim agents running real wasm.

One server, one fleet of three agents and one browser for the module; each test opens
its own browser context (its own cookies) and signs in. The deployments use a flow of
their own each (f1, f2, f3), so no test holds another's devices.

With ``CONSOLE_SCREENSHOTS=1`` the run also writes the README's screenshots to
``docs/console/`` (1280x800)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import wat
from broker import Broker, Operator
from browser import VIEWPORT, LoopThread, chromium
from mender_tools import write_artifact
from server_harness import RunningServer, admin, running_server, sim_fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PREFIX = "edge"
V1 = "/api/management/v1/deployments"
TRIGGERS = [{"type": "command", "command": "f1.version"}]
TICKING = [*TRIGGERS, {"type": "interval", "ms": 100}]
DEVICES = ["sim-0001", "sim-0002", "sim-0003"]
AGENT: dict[str, Any] = {
    "device_type": "gw",
    "mqtt": {"keepalive": 5, "reconnect_min": 0.05, "reconnect_max": 0.5},
    "reconcile": {"retry_backoff_initial": 0.2, "retry_backoff_max": 1.0, "state_coalesce_ms": 20},
    "sandbox": {"call_deadline_ms": 1000, "restart_backoff_initial": 0.05},
}
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_TAG = "<script>window.injected=1</script>"
XSS_LOG = '<b id="injected">bold</b> <img src=x onerror=alert(2)>'


# ------------------------------------------------------------------ module fixtures
class Setup:
    def __init__(self, srv: RunningServer, broker: Broker, other_app: str, other_token: str):
        self.srv = srv
        self.broker = broker
        self.other_app = other_app
        self.other_token = other_token
        self.email = "ops@example.com"
        self.password = "correct horse battery staple"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("console")
    broker = Broker(root / "broker")
    broker.start()
    loop = LoopThread()
    try:
        url = f"sqlite:///{root / 'server.db'}"
        with running_server(
            root / "server", url, broker.url, prefix=PREFIX, settings={"rollout_tick_s": 0.2}
        ) as srv:
            common = ["--db", url, "--state-dir", str(root / "server")]
            other = admin(*common, "create-application", "--name", "other", "--prefix", "other")
            other_token = admin(
                *common, "create-token", "--application", other, "--scope", "all.Application"
            )
            setup = Setup(srv, broker, other, other_token)
            pw = root / "password"
            pw.write_text(setup.password + "\n")
            app = ["--application", srv.app_id, "--email", setup.email, "--password-file", str(pw)]
            admin(*common, "create-user", *app)
            fleet = sim_fleet(
                root, broker.url, PREFIX, len(DEVICES), **json.loads(json.dumps(AGENT))
            )
            with loop.entered(fleet):
                wait(lambda: set(DEVICES) <= online(srv), "the sim devices online")
                yield setup
    finally:
        loop.close()
        broker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


class Watched:
    """A page with what it said: dialogs opened and console messages."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.console: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def csp_errors(self) -> list[str]:
        return [m for m in self.console if "Content Security Policy" in m or "pageerror" in m]


@pytest.fixture
def page(browser: Any, setup: Setup) -> Iterator[Watched]:
    yield from watched_page(browser, setup.srv.url)


def watched_page(browser: Any, base_url: str | None) -> Iterator[Watched]:
    context = browser.new_context(viewport=VIEWPORT, base_url=base_url)
    context.set_default_timeout(15_000)
    try:
        watched = Watched(context.new_page())
        yield watched
        assert watched.dialogs == [], "a dialog opened (injected script ran)"
        assert watched.csp_errors() == []
    finally:
        context.close()


# ------------------------------------------------------------------ helpers
def wait(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def online(srv: RunningServer) -> set[str]:
    with srv.http() as c:
        r = c.get(f"/applications/{srv.app_id}/devices", params={"perPage": 1000})
    return {d["id"] for d in r.json()["items"] if d.get("connectionInfo", {}).get("connected")}


def sign_in(w: Watched, token: str) -> None:
    w.page.goto("/console/login")
    w.page.fill("form#login input[name=token]", token)
    w.page.locator("form#login [type=submit]").first.click()
    w.page.wait_for_url(re.compile(r"/console/$"))


def sign_in_as_user(w: Watched, setup: Setup) -> None:
    w.page.goto("/console/login")
    w.page.fill("form#login input[name=email]", setup.email)
    w.page.fill("form#login input[name=password]", setup.password)
    w.page.locator("form#login [type=submit]").last.click()
    w.page.wait_for_url(re.compile(r"/console/$"))


def shot(w: Watched, name: str) -> None:
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        w.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def upload(srv: RunningServer, flow: str, version: str, data: bytes, triggers: Any) -> None:
    r = srv.upload(flow, version, bytes(data), manifest=json.dumps({"triggers": triggers}))
    assert r.status_code == 201, r.text


def create(srv: RunningServer, body: dict[str, Any]) -> str:
    with srv.http() as c:
        r = c.post(f"{V1}/deployments", json=body)
    assert r.status_code == 201, r.text
    return str(r.headers["location"].rsplit("/", 1)[1])


def deployment(srv: RunningServer, rid: str) -> dict[str, Any]:
    with srv.http() as c:
        r = c.get(f"{V1}/deployments/{rid}")
    assert r.status_code == 200, r.text
    got: dict[str, Any] = r.json()
    return got


def in_(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def stat(w: Watched, status: str) -> int:
    text = w.page.locator(f"#statistics [data-testid=stat-{status}]").inner_text()
    found = re.search(r"\d+", text)
    return int(found.group()) if found else -1


def patch_device(srv: RunningServer, device_id: str, body: dict[str, Any]) -> None:
    with srv.http() as c:
        r = c.patch(f"/applications/{srv.app_id}/devices/{device_id}", json=body)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ sign in and out
def test_sign_in_with_a_token_and_out(page: Watched, setup: Setup) -> None:
    p = page.page
    p.goto("/console/")
    assert "/console/login" in p.url  # not signed in: the login page
    p.fill("form#login input[name=token]", "not-a-token")
    p.locator("form#login [type=submit]").first.click()
    p.locator("#error").wait_for()  # the answer to the POST
    sign_in(page, setup.srv.token)
    assert p.locator("table#devices").is_visible()
    cookies = p.context.cookies()
    assert cookies
    assert all(c["httpOnly"] and c["sameSite"] == "Strict" for c in cookies)
    p.locator("form#logout [type=submit]").first.click()
    p.wait_for_url(re.compile(r"/console/login"))
    p.goto("/console/")
    assert "/console/login" in p.url


def test_sign_in_as_a_user(page: Watched, setup: Setup) -> None:
    p = page.page
    p.goto("/console/login")
    p.fill("form#login input[name=email]", setup.email)
    p.fill("form#login input[name=password]", "wrong password")
    p.locator("form#login [type=submit]").last.click()
    p.locator("#error").wait_for()  # the answer to the POST
    p.fill("form#login input[name=email]", setup.email)
    p.fill("form#login input[name=password]", setup.password)
    p.locator("form#login [type=submit]").last.click()
    p.wait_for_url(re.compile(r"/console/$"))
    assert p.locator("table#devices").is_visible()


# ------------------------------------------------------------------ fleet
def test_fleet_lists_the_devices_and_filters(page: Watched, setup: Setup) -> None:
    patch_device(setup.srv, "sim-0001", {"tags": [{"key": "floor", "value": "2"}]})
    sign_in(page, setup.srv.token)
    p = page.page
    for device in DEVICES:
        row = p.locator(f"table#devices tr[data-device-id='{device}']")
        assert row.locator("[data-testid=device-type]").inner_text().strip() == "gw"
        assert row.locator("[data-testid=online]").inner_text().strip().lower() in ("yes", "online")
    tags = p.locator("tr[data-device-id='sim-0001'] [data-testid=tags]").inner_text()
    assert "floor=2" in tags.replace(" ", "")
    rows = p.locator("table#devices tr[data-device-id]")
    apply_filter(p, "floor%3D2", tag="floor=2")
    assert [r.get_attribute("data-device-id") for r in rows.all()] == ["sim-0001"]
    apply_filter(p, "online=no", tag="", online="no")  # all three are online
    assert rows.count() == 0
    apply_filter(p, "q=sim-0002", q="sim-0002", online="yes")
    assert [r.get_attribute("data-device-id") for r in rows.all()] == ["sim-0002"]
    apply_filter(p, "device_type=other", q="", device_type="other")
    assert rows.count() == 0


def apply_filter(p: Any, in_url: str, **fields: str) -> None:
    """Fill the fleet's filter form, submit it and wait for its page (a GET form)."""
    for name, value in fields.items():
        if name == "online":
            p.select_option("form#filter select[name=online]", value)
        else:
            p.fill(f"form#filter input[name={name}]", value)
    p.locator("form#filter [type=submit]").first.click()
    p.wait_for_url(re.compile(re.escape(in_url)))


# ------------------------------------------------------------------ deployments
def test_watch_a_deployment_progress_live(page: Watched, setup: Setup) -> None:
    srv = setup.srv
    upload(srv, "f1", "v1", wat.versioned_flow("v1"), TRIGGERS)
    rid = create(
        srv,
        {
            "name": "console rollout",
            "artifact_name": "f1-v1",
            "devices": DEVICES,
            "phases": [{"batch_size": 34}, {"start_ts": in_(6)}],
            "edge": {"health_window": 1},
        },
    )
    sign_in(page, srv.token)
    p = page.page
    p.goto(f"/console/deployments/{rid}")
    loaded = p.evaluate("performance.timeOrigin")
    assert stat(page, "success") < len(DEVICES)
    # SSE, not a reload: the same document sees the phase start and the successes rise.
    successes = (
        "(n) => { const e = document.querySelector("
        "'#statistics [data-testid=stat-success]'); return e && parseInt(e.textContent) >= n }"
    )
    p.wait_for_function(successes, arg=1, timeout=30_000)
    shot(page, "deployment")
    p.wait_for_function(successes, arg=len(DEVICES), timeout=40_000)
    started = p.locator("ol#phases li[data-phase='1'] [data-testid=started]").inner_text()
    assert started.strip()
    assert "not" not in started
    p.wait_for_function(
        "() => /finished/i.test(document.querySelector('#status').textContent)", timeout=20_000
    )
    assert p.evaluate("performance.timeOrigin") == loaded
    rows = p.locator("table#deployment-devices tr[data-device-id]")
    assert rows.count() == len(DEVICES)
    p.goto("/console/deployments")
    assert p.locator(f"table#deployments tr[data-deployment-id='{rid}']").count() == 1
    # the fleet shows the flow each device runs now
    p.goto("/console/")
    flows = p.locator("tr[data-device-id='sim-0001'] [data-testid=flows]").inner_text()
    assert "f1" in flows
    assert "v1" in flows
    shot(page, "fleet")


def test_abort_a_deployment_from_its_page(page: Watched, setup: Setup) -> None:
    srv = setup.srv
    upload(srv, "f2", "v1", wat.versioned_flow("f2-v1"), [])
    rid = create(
        srv,
        {
            "name": "to abort",
            "artifact_name": "f2-v1",
            "devices": DEVICES,
            "phases": [{"batch_size": 34}, {"start_ts": in_(3600)}],
            "edge": {"health_window": 0},
        },
    )
    sign_in(page, srv.token)
    p = page.page
    p.goto(f"/console/deployments/{rid}")
    assert p.locator("form#abort").is_visible()
    p.locator("form#abort [type=submit]").first.click()
    p.wait_for_function(
        "() => /abort|finished/i.test(document.querySelector('#status').textContent)",
        timeout=20_000,
    )
    wait(lambda: deployment(srv, rid)["status"] == "finished", "the abort to finish it")
    p.reload()
    assert p.locator("#status [data-testid=aborted]").is_visible()
    assert p.locator("form#abort").count() == 0


def test_a_failed_devices_log(page: Watched, setup: Setup) -> None:
    srv = setup.srv
    upload(srv, "f3", "bad", wat.versioned_flow("bad", trap_from_tick=3), TICKING)
    rid = create(
        srv,
        {
            "name": "traps",
            "artifact_name": "f3-bad",
            "devices": ["sim-0003"],
            "edge": {"health_window": 5},
        },
    )
    wait(lambda: deployment(srv, rid)["status"] == "finished", "the trap to fail it", 40)
    sign_in(page, srv.token)
    p = page.page
    p.goto(f"/console/deployments/{rid}")
    row = p.locator("table#deployment-devices tr[data-device-id='sim-0003']")
    assert "failure" in row.locator("[data-testid=status]").inner_text().lower()
    link = row.locator("a[data-testid=log-link]")
    assert link.count() == 1
    link.click()
    p.wait_for_url(re.compile(rf"/console/deployments/{rid}/devices/sim-0003/log$"))
    assert "unreachable" in p.locator("pre#log").inner_text()


def test_upload_and_delete_an_artifact(page: Watched, setup: Setup, tmp_path: Path) -> None:
    mender = write_artifact(
        tmp_path,
        bytes(wat.versioned_flow("f5-v1")),
        name="f5-1.0.0",
        device_types=["gw"],
        software_name="f5",
        software_version="1.0.0",
    )
    sign_in(page, setup.srv.token)
    p = page.page
    p.goto("/console/artifacts")
    p.set_input_files("form#upload input[name=artifact]", str(mender))
    p.fill("form#upload input[name=description]", "from the browser")
    p.locator("form#upload [type=submit]").first.click()
    row = p.locator("table#artifacts tr[data-artifact-id]", has_text="f5-1.0.0")
    row.wait_for()
    assert "from the browser" in row.inner_text()
    assert row.locator("[data-testid=device-types]").inner_text() == "gw"
    with setup.srv.http() as c:
        names = [a["name"] for a in c.get(f"{V1}/artifacts").json()]
    assert "f5-1.0.0" in names
    row.locator("form.delete [type=submit]").click()
    p.wait_for_load_state()
    p.goto("/console/artifacts")
    assert row.count() == 0
    with setup.srv.http() as c:
        names = [a["name"] for a in c.get(f"{V1}/artifacts").json()]
    assert "f5-1.0.0" not in names


# ------------------------------------------------------------------ device page
def test_send_a_command_from_the_device_page(page: Watched, setup: Setup) -> None:
    sign_in(page, setup.srv.token)
    p = page.page
    p.goto("/console/devices/sim-0002")
    assert p.locator("#device-name").is_visible()
    p.fill("form#command input[name=name]", "agent.ping")
    p.fill("form#command textarea[name=payload]", '{"hello": "console"}')
    p.locator("form#command [type=submit]").first.click()
    response = p.locator("#command-response [data-testid=response]")
    response.wait_for(timeout=20_000)  # polled or pushed: no reload
    assert response.inner_text().strip()
    assert p.locator("#command-response [data-testid=command-name]").inner_text() == "agent.ping"
    shot(page, "device")


def test_a_page_left_open_goes_to_the_sign_in_when_the_session_ends(
    page: Watched, setup: Setup
) -> None:
    """The device page's timeline refreshes itself (htmx, every 3 s); once the session
    has ended (signed out in another tab), the next refresh takes the whole page to
    the sign-in instead of swapping the sign-in form into the timeline."""
    srv = setup.srv
    upload(srv, "f6", "v1", wat.versioned_flow("f6-v1"), [])
    rid = create(
        srv,
        {
            "name": "watched",
            "artifact_name": "f6-v1",
            "devices": ["sim-0001"],
            "phases": [{"start_ts": in_(3600)}],
        },
    )
    sign_in(page, srv.token)
    p = page.page
    deployment_tab = p.context.new_page()
    deployment_tab.goto(f"/console/deployments/{rid}")
    deployment_tab.locator("#status form#abort").wait_for()
    asked: list[str] = []
    deployment_tab.on("request", lambda r: asked.append(r.url) if "/stream" in r.url else None)
    p.goto("/console/devices/sim-0001")
    with p.expect_request(lambda r: "/timeline?left=" in r.url, timeout=10_000):
        pass  # (the refresh runs)
    csrf = p.locator("form#logout input[name=csrf]").get_attribute("value")
    assert p.request.post("/console/logout", form={"csrf": csrf or ""}).status == 200
    p.wait_for_url(re.compile(r"/console/login$"), timeout=10_000)
    assert p.locator("form#login").is_visible()
    assert p.locator("#timeline").count() == 0
    # The deployment's page (its stream, not a poll) says so, and stops asking.
    deployment_tab.locator("#session-ended a[href='/console/login']").wait_for(timeout=10_000)
    seen = len(asked)
    deployment_tab.wait_for_timeout(2_500)  # (htmx's SSE extension retries after 0.5 s)
    assert len(asked) == seen, asked
    with srv.http() as c:
        assert c.put(f"{V1}/deployments/{rid}/status", json={"status": "aborted"}).is_success


# ------------------------------------------------------------------ security
def test_markup_in_names_tags_and_logs_is_shown_as_text(page: Watched, setup: Setup) -> None:
    srv = setup.srv
    patch_device(srv, "sim-0002", {"name": XSS_NAME, "tags": [{"key": "note", "value": XSS_TAG}]})
    log = {"flowId": "f1", "messages": [{"time": "t", "level": "error", "message": XSS_LOG}]}
    op = Operator(setup.broker).connect()
    try:
        op.publish(f"{PREFIX}/sim-0002/deployments/xss-1/log", log)
    finally:
        op.close()
    wait(lambda: "xss-1" in logs_of(srv, "sim-0002"), "the log stored")
    sign_in(page, srv.token)
    p = page.page
    assert XSS_NAME in p.locator("table#devices tr[data-device-id='sim-0002']").inner_text()
    assert XSS_TAG in p.locator("tr[data-device-id='sim-0002'] [data-testid=tags]").inner_text()
    p.goto("/console/devices/sim-0002")
    assert p.locator("#device-name").inner_text().strip() == XSS_NAME
    assert XSS_LOG in p.locator("#logs section[data-deployment-id='xss-1'] pre").inner_text()
    assert p.locator("#injected").count() == 0
    assert p.locator("img[src=x]").count() == 0
    assert p.evaluate("window.injected === undefined")


def logs_of(srv: RunningServer, device_id: str) -> set[str]:
    from sqlalchemy import select

    from agent.server.db.models import DeploymentLog

    with srv.ctx.db.transaction() as s:
        rows = s.scalars(
            select(DeploymentLog.deployment_id).where(DeploymentLog.device_id == device_id)
        )
        return set(rows)


def test_a_form_without_its_csrf_token_is_refused(page: Watched, setup: Setup) -> None:
    sign_in_as_user(page, setup)  # (tokens are managed by users)
    p = page.page
    p.goto("/console/tokens")
    before = p.locator("table#tokens tr[data-token-id]").count()
    p.evaluate("document.querySelector('form#create-token input[name=csrf]').remove()")
    p.fill("form#create-token input[name=name]", "no csrf")
    p.select_option("form#create-token select[name=scope]", "all.Application")
    with p.expect_response(lambda r: r.request.method == "POST") as answer:
        p.locator("form#create-token [type=submit]").first.click()
    assert answer.value.status == 403
    p.wait_for_function("document.body && document.body.textContent.includes('CSRF')")
    # a wrong token, with the session's cookie
    r = p.request.post(
        "/console/tokens", form={"name": "wrong csrf", "scope": "all.Application", "csrf": "x"}
    )
    assert r.status == 403
    p.goto("/console/tokens")
    assert p.locator("table#tokens tr[data-token-id]").count() == before
    assert "no csrf" not in p.content()
    assert "wrong csrf" not in p.content()
    # the same form with its token is taken (what was refused was the missing token)
    p.fill("form#create-token input[name=name]", "with csrf")
    p.select_option("form#create-token select[name=scope]", "all.Application")
    p.locator("form#create-token [type=submit]").first.click()
    assert p.locator("#new-token").inner_text().strip()
    p.goto("/console/tokens")
    assert p.locator("table#tokens tr[data-token-id]").count() == before + 1


def test_another_applications_things_are_not_found(page: Watched, setup: Setup) -> None:
    # a device and a deployment of application A, asked for by a session of B
    srv = setup.srv
    upload(srv, "f4", "v1", wat.versioned_flow("f4-v1"), [])
    rid = create(
        srv,
        {
            "name": "later",
            "artifact_name": "f4-v1",
            "devices": ["sim-0001"],
            "phases": [{"start_ts": in_(3600)}],
        },
    )
    sign_in(page, setup.other_token)
    p = page.page
    assert p.locator("table#devices tr[data-device-id]").count() == 0
    for path in (
        "/console/devices/sim-0001",
        f"/console/deployments/{rid}",
        f"/console/deployments/{rid}/devices/sim-0003/log",
    ):
        r = p.goto(path)
        assert r is not None
        assert r.status == 404, path
        shown = "#device-name, table#flows, #statistics, #phases, pre#log, #deployment-devices"
        assert p.locator(shown).count() == 0, path
    # the same pages for application A's session
    sign_in(page, srv.token)
    assert p.goto(f"/console/deployments/{rid}").status == 200  # type: ignore[union-attr]
    with srv.http() as c:
        assert c.put(f"{V1}/deployments/{rid}/status", json={"status": "aborted"}).is_success


def test_strict_csp_and_the_pages_work_under_it(page: Watched, setup: Setup) -> None:
    sign_in(page, setup.srv.token)
    p = page.page
    for path in ("/console/", "/console/devices/sim-0001", "/console/deployments"):
        r = p.goto(path)
        assert r is not None
        csp = r.headers["content-security-policy"]
        directives = csp_directives(csp)
        assert "'unsafe-inline'" not in csp
        assert "'unsafe-eval'" not in csp
        assert directives["script-src"].split() == ["'self'"] or directives.get(
            "default-src", ""
        ).split() == ["'self'"]
    r = p.goto("/console/artifacts")
    assert r is not None
    assert p.locator("table#artifacts tr[data-artifact-id], table#artifacts").count() >= 1
    shot(page, "artifacts")
    assert page.csp_errors() == []
    # the policy is enforced: an inline handler put into the page does not run, and
    # the browser says so (what the page fixture looks for after every test)
    p.evaluate(
        "document.body.insertAdjacentHTML('beforeend',"
        " '<img id=probe src=/nowhere onerror=\"document.title=1\">')"
    )
    p.wait_for_function("() => document.getElementById('probe').complete")
    for _ in range(100):  # (Playwright delivers the console events while it waits)
        if page.csp_errors():
            break
        p.wait_for_timeout(50)
    assert page.csp_errors(), page.console
    assert p.title() != "1"
    page.console.clear()


def csp_directives(csp: str) -> dict[str, str]:
    """A Content-Security-Policy header's directives: name → sources."""
    out: dict[str, str] = {}
    for part in csp.split(";"):
        name, _, sources = part.strip().partition(" ")
        if name:
            out[name.lower()] = sources.strip()
    return out


@pytest.fixture
def bare_page(browser: Any) -> Iterator[Watched]:
    yield from watched_page(browser, None)


def test_the_page_fixture_sees_injected_scripts(bare_page: Watched) -> None:
    """The XSS and CSP checks can fail: a page that runs inline script under no CSP
    records the dialog and the console message."""
    page = bare_page
    page.page.set_content("<script>console.log('ran')</script>")
    assert any("ran" in m for m in page.console)
    page.page.evaluate("alert('x')")  # returns once the handler dismissed it
    assert page.dialogs == ["x"]
    page.dialogs.clear()
