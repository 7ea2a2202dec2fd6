"""``edge-agent demo``: the whole system, locally, with nothing but Mosquitto.

It starts a private Mosquitto on a free port (or uses ``--broker``), the control
plane (``edge-agent server`` on SQLite in a temporary directory, in this process), a
small simulated fleet (real agents, ``edge-agent sim``) and, as an operator would,
drives the server over its HTTP API: an application, a token and a user (the admin
functions), the counter example uploaded as two flow versions, a phased Mender
deployment converging, a command to one device and its response, then a second
deployment aborted in the middle. Every step is printed with what it sent, and the
console's URL with the token to sign in with. It finishes by itself (well within a
minute) and removes everything it made; ``--keep`` keeps it all running until
Ctrl-C, for a person to click through the console, then cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.device.config import AgentConfig

if TYPE_CHECKING:
    import httpx

    from agent.server.thread import ServerThread

DEVICES = 6
#: The devices' topic prefix (the demo application's).
PREFIX = "edge"
#: Where the counter example is: package data in a wheel or the .deb (see
#: pyproject.toml, force-include), else the source tree's examples/.
ASSETS = (
    Path(__file__).resolve().parent / "assets",
    Path(__file__).resolve().parents[2] / "examples" / "flows" / "counter",
)


def counter_wasm() -> bytes:
    """The counter example's module, from the installed package or the source tree."""
    for place in ASSETS:
        with contextlib.suppress(OSError):
            return (place / "counter.wasm").read_bytes()
    raise FileNotFoundError(
        f"counter.wasm is in none of {', '.join(map(str, ASSETS))} (a broken install?)"
    )


#: The counter's triggers, as examples/flows/counter/counter.json ships them: the
#: startup trigger loads the count from the flow's storage, so it goes on across
#: upgrades (a test compares the two).
COUNTER_MANIFEST = {
    "triggers": [
        {"type": "startup"},
        {"type": "interval", "name": "tick", "ms": 1000},
        {"type": "command", "command": "counter.get"},
        {"type": "command", "command": "counter.reset"},
    ]
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def mosquitto_server(workdir: Path, *, tcp_nodelay: bool = True) -> Iterator[int]:
    """A private Mosquitto on a free loopback port. ``tcp_nodelay``: without it a
    request/response through the broker waits ~40 ms per leg (Nagle + delayed ACK)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise RuntimeError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"log_dest file {workdir / 'mosquitto.log'}\n"
        + ("set_tcp_nodelay true\n" if tcp_nodelay else "")
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        # Keep-alive, as artifact servers do (the agent keeps its connection); with
        # TCP_NODELAY, or each response's last segment waits for a delayed ACK.
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def versioned(wasm: bytes, version: str) -> bytes:
    """The same module with a custom section naming ``version``: other bytes (another
    sha256, a real new artifact), same behaviour."""
    name = b"edge-demo-version"
    body = bytes([len(name)]) + name + version.encode()
    return wasm + b"\x00" + _leb128(len(body)) + body


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Fleet:
    """The simulated fleet, on its own thread and event loop."""

    def __init__(self, broker: str, root: Path, prefix: str = PREFIX) -> None:
        self.broker = broker
        self.prefix = prefix
        self.root = root
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.summary = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="demo-fleet", daemon=True)

    def __enter__(self) -> _Fleet:
        self._thread.start()
        self.started.wait(60)
        if self.error is not None:
            raise RuntimeError(f"the simulated fleet did not start: {self.error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__
            self.error = exc
            self.started.set()

    async def _main(self) -> None:
        from agent.fleet.sim import Simulation

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        base = AgentConfig.model_validate(
            {
                "device_id": "demo",
                "device_type": "demo-gateway",
                "state_dir": str(self.root),
                "mqtt": {
                    "broker": self.broker,
                    "topic_prefix": self.prefix,
                    "reconnect_min": 0.1,
                },
                "reconcile": {"state_coalesce_ms": 20},
                "log": {"level": "error"},
            }
        )
        async with Simulation(base, DEVICES, self.root) as sim:
            up = await sim.wait_connected(20)
            self.summary = (
                f"{up} simulated devices sim-0001...sim-{DEVICES:04d} online "
                f"({sim.memory_per_device() / 1024:.0f} KiB of memory each)"
            )
            self.started.set()
            await self._stop.wait()


class _Server:
    """``edge-agent server`` on SQLite in ``root``, in this process (uvicorn on a
    thread), with an application, a token and a user made with the admin functions."""

    def __init__(self, broker: str, root: Path) -> None:
        from agent.server.config import ServerConfig

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.cfg = ServerConfig.model_validate(
            {
                "db": f"sqlite:///{root / 'server.db'}",
                "state_dir": str(root),
                "listen": f"127.0.0.1:{port}",
                "public_url": self.url,
                "mqtt": {"broker": broker},
                "publish_retry_s": 0.2,
                "rollout_tick_s": 0.2,
            }
        )
        self.app_id = ""
        self.token = ""
        self.email = "ops@example.com"
        self.password = secrets.token_urlsafe(12)
        self._http: ServerThread | None = None
        self.ctx: Any = None

    def __enter__(self) -> _Server:
        from agent.server.api.app import create_app
        from agent.server.context import ServerContext
        from agent.server.db import applications as apps_repo
        from agent.server.db.engine import Database
        from agent.server.service import users
        from agent.server.thread import ServerThread

        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        db = Database(self.cfg.db_url)
        try:
            db.migrate()
            with db.transaction() as s:
                self.app_id = apps_repo.create_application(s, "demo", PREFIX).id
                _row, self.token = apps_repo.create_token(s, self.app_id, ["all.Application"])
            users.create_user(db, self.app_id, self.email, self.password)
        finally:
            db.close()
        self.ctx = ServerContext(self.cfg)
        self.ctx.start()
        self._http = ServerThread(create_app(self.ctx), "127.0.0.1", self.cfg.port)
        try:
            self._http.start()
        except RuntimeError:
            self.ctx.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._http is not None and not self._http.stop():
            print("  (the server's HTTP thread did not stop in time)", file=sys.stderr)
        if self.ctx is not None:
            self.ctx.stop()

    def http(self) -> httpx.Client:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


V1 = "/api/management/v1/deployments"


def _show(method: str, path: str, body: Any = None) -> None:
    """Print a request as a person would send it with curl (the token elided)."""
    data = f" -d '{json.dumps(body)}'" if body is not None else ""
    print(f"$ curl -X {method} -H 'Authorization: Bearer $TOKEN' $SERVER{path}{data}", flush=True)


def _call(
    client: httpx.Client, method: str, path: str, body: Any = None, **kw: Any
) -> httpx.Response:
    _show(method, path, body)
    r = client.request(method, path, json=body, **kw)
    if r.status_code >= 400:
        raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
    return r


def _wait(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def _stats(client: httpx.Client, rid: str) -> dict[str, int]:
    r = client.get(f"{V1}/deployments/{rid}/statistics")
    r.raise_for_status()
    counts: dict[str, int] = r.json()
    return counts


def _print_stats(client: httpx.Client, rid: str) -> None:
    counts = {k: v for k, v in _stats(client, rid).items() if v}
    print("  statistics: " + json.dumps(counts, separators=(", ", ": ")))


def _deployment(client: httpx.Client, rid: str) -> dict[str, Any]:
    r = client.get(f"{V1}/deployments/{rid}")
    r.raise_for_status()
    got: dict[str, Any] = r.json()
    return got


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(keep: bool = False, broker: str | None = None) -> int:
    from agent.device._logging import configure_logging

    configure_logging("warning")  # the agents' own log lines would drown the story
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    print(f"edge-agent demo: working in {work}")
    try:
        counter = counter_wasm()
    except FileNotFoundError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 1
    try:
        with contextlib.ExitStack() as stack:
            if broker is None:
                port = stack.enter_context(mosquitto_server(work))
                broker = f"mqtt://127.0.0.1:{port}"
                print(f"  started a private Mosquitto: {broker}")
            server = stack.enter_context(_Server(broker, work / "server"))
            print(f"  started edge-agent server on SQLite: {server.url}")
            print(f"    application {server.app_id} (devices under {PREFIX}/), an API token,")
            print(f"    and a user {server.email} (admin create-application/-token/-user)")
            fleet = stack.enter_context(_Fleet(broker, work / "devices"))
            print(f"  {fleet.summary}")
            _console_hint(server)
            _steps(server, counter)
            took = time.monotonic() - started
            if keep:
                _stay_up(server)
    except Exception as exc:  # noqa: BLE001 - any failure ends the demo with its reason
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\ndemo finished in {took:.1f} s: the deployment converged, the command was "
        "answered, the second deployment was aborted; everything it made is removed."
    )
    return 0


#: Seconds the interpreter's exit may take once the demo cleaned up.
EXIT_WAIT_S = 15.0


def watch_exit(rc: int, wait: float = EXIT_WAIT_S) -> None:
    """For the demo's own process, once it has cleaned up and returns ``rc``: should
    the interpreter's exit then wait longer than ``wait`` for a thread that does not
    end (it waits for every non-daemon thread and every executor's workers), print
    every thread's stack to stderr and end the process with ``rc``. (``demo --keep``
    once did not exit after Ctrl-C in a CI run, cause unknown: this ends it, and says
    where it was held.)"""

    def watch() -> None:
        time.sleep(wait)
        print(
            f"edge-agent demo: still not exited {wait:g} s after cleaning up; its threads:",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(rc)

    threading.Thread(target=watch, name="demo-exit-watch", daemon=True).start()


def _stay_up(server: _Server) -> None:
    """``--keep``: wait for Ctrl-C (SIGINT) or SIGTERM. Both only set an event, so
    one arriving at any moment from the first line printed here ends the same way,
    in the caller's clean-up (a second Ctrl-C then interrupts that, as usual)."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _console_hint(server)
        print("\n--keep: everything stays up; press Ctrl-C to stop and clean up.", flush=True)
        while not stop.wait(1.0):  # (a bounded wait: the handler runs between waits)
            pass
        print("\nstopping", flush=True)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _console_hint(server: _Server) -> None:
    print(f"\n  the console: {server.url}/console/")
    print(f"    sign in with the token  {server.token}")
    print(f"    or as {server.email} with the password  {server.password}")


def _steps(server: _Server, counter: bytes) -> None:
    manifest = json.dumps(COUNTER_MANIFEST)
    with server.http() as client:
        print("\n== 1. the counter flow uploaded as two flow versions (the artifacts Mender sees)")
        for version, data in (("1.0.0", counter), ("1.1.0", versioned(counter, "1.1.0"))):
            path = f"/applications/{server.app_id}/flows/counter/versions"
            print(
                f"$ curl -X POST -H 'Authorization: Bearer $TOKEN' $SERVER{path} "
                f"-F version={version} -F manifest=@counter.json "
                f"-F artifact=@counter-{version}.wasm"
            )
            r = client.post(
                path,
                data={"version": version, "manifest": manifest},
                files={"artifact": (f"counter-{version}.wasm", data, "application/wasm")},
            )
            if r.status_code != 201:
                raise RuntimeError(f"upload {version}: {r.status_code} {r.text}")
        artifacts = client.get("/api/management/v1/deployments/artifacts").json()
        print("  artifacts: " + ", ".join(sorted(a["name"] for a in artifacts)))

        print(
            "\n== 2. a phased deployment of counter 1.0.0: half the fleet now, the rest 4 s\n"
            "      later once the first half is healthy (each device's 2 s health window)"
        )
        body = {
            "name": "counter 1.0.0",
            "artifact_name": "counter-1.0.0",
            "all_devices": True,
            "phases": [{"batch_size": 50}, {"start_ts": _in(4)}],
            "edge": {"health_window": 2, "failure_threshold": 0},
        }
        r = _call(client, "POST", f"{V1}/deployments", body)
        first = r.headers["location"].rsplit("/", 1)[1]
        print(f"  deployment {first}")
        seen: set[str] = set()

        def converged() -> bool:
            dep = _deployment(client, first)
            line = json.dumps({k: v for k, v in _stats(client, first).items() if v})
            if line not in seen:
                seen.add(line)
                print(f"  {time.strftime('%H:%M:%S')} {dep['status']}: {line}")
            return bool(dep["status"] == "finished")

        _wait(converged, "the first deployment to finish", 40)
        _print_stats(client, first)
        for n, phase in enumerate(_deployment(client, first).get("phases") or [], 1):
            when = phase.get("start_ts") or "at once"
            print(f"  phase {n}: {phase.get('device_count')} devices, started {when}")
        counts = _stats(client, first)
        if counts.get("success") != DEVICES:
            raise RuntimeError(f"the deployment did not converge: {counts}")

        _command(server)
        _aborted(server, client)


def _command(server: _Server) -> None:
    from agent.server.db import applications as apps_repo
    from agent.server.service import commands

    print("\n== 3. a command to one device (recorded by the server, matched to its response)")
    time.sleep(1.2)  # let the counter tick
    with server.ctx.db.transaction() as s:
        app = apps_repo.get_application(s, server.app_id)
    assert app is not None
    sent = commands.send(server.ctx, app, "sim-0003", "counter.get", None)
    print(f"  sent counter.get to sim-0003 as command {sent.id}")
    done = _wait(
        lambda: (c := commands.get(server.ctx, server.app_id, sent.id)) and c.response and c,
        "the device's response",
        15,
    )
    print("  response: " + json.dumps(done.response))


def _aborted(server: _Server, client: httpx.Client) -> None:
    print(
        "\n== 4. a second deployment (counter 1.1.0): its first phase (a third) runs,\n"
        "      the rest would start in a minute: aborted in the middle"
    )
    body = {
        "name": "counter 1.1.0",
        "artifact_name": "counter-1.1.0",
        "all_devices": True,
        "phases": [{"batch_size": 34}, {"start_ts": _in(60)}],
        "edge": {"health_window": 30},
    }
    r = _call(client, "POST", f"{V1}/deployments", body)
    second = r.headers["location"].rsplit("/", 1)[1]
    print(f"  deployment {second}")
    _wait(
        lambda: _stats(client, second).get("rebooting", 0) >= 1,
        "the first phase to install (its devices in their health window)",
        30,
    )
    _print_stats(client, second)
    _call(client, "PUT", f"{V1}/deployments/{second}/status", {"status": "aborted"})
    dep = _deployment(client, second)
    print(f"  status: {dep['status']}, aborted: {dep.get('edge', {}).get('aborted')}")
    _print_stats(client, second)
    _timeline(server)


def _timeline(server: _Server) -> None:
    """The newest events of a device the aborted deployment reached, as the server
    recorded them (the console's timeline): the install, the abort, the revert."""
    from agent.server.db import device_events

    def reached() -> tuple[str, list[Any]] | None:
        with server.ctx.db.transaction() as s:
            for n in range(1, DEVICES + 1):
                device_id = f"sim-{n:04d}"
                rows = device_events.recent(s, server.app_id, device_id, limit=8)
                if any(e.status == "aborted" for e in rows[:3]):
                    return device_id, rows
        return None

    _wait(reached, "the abort in a device's events", 20)
    time.sleep(1.0)  # (the revert's events)
    device_id, rows = reached() or ("", [])
    print(f"\n  {device_id}'s newest events, as the server recorded them (newest first):")
    for e in rows:
        print(f"    {e.time:%H:%M:%S} {e.flow_id} {e.version} {e.status} {e.error or ''}".rstrip())
