"""Two ``edge-agent server`` processes on one PostgreSQL and one Mosquitto (MQTT 5,
shared subscriptions), 500 real sim agents: a release through server A, ``kill -9``
of A while it publishes, a release through B; every device converges and no
device's retained desired document ever goes backwards.

The servers share one artifact directory (as they would share a volume or a bucket)
and one ``--public-url``: a TCP front that hands each connection to the first server
that takes it (what a load balancer does in production). Artifact URLs are written
into the desired documents at release time, so without it the documents A wrote
would name a dead server once A is killed.

The sim runs as its own process (``edge-agent sim``): 500 agents on the test's event
loop would slow the very thread that watches the broker and asks the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from broker import Broker, free_port
from common import COUNTER_WASM
from losant_rest import Client
from paho.mqtt.enums import CallbackAPIVersion
from postgres import PostgresCluster
from server_harness import admin
from sqlalchemy import func, select

from agent.server.db.engine import Database
from agent.server.db.models import Deployment, DeploymentAttempt, Device

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEVICES = 500
PREFIX = "edge"
FLOW = "counter"
EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))


def wait(check: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class ServerProcess:
    """``edge-agent server`` as a real process (its log in ``log``)."""

    def __init__(
        self, name: str, db_url: str, broker: Broker, state_dir: Path, log: Path, public_url: str
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.argv = [
            EDGE_AGENT,
            "server",
            "--db",
            db_url,
            "--broker",
            broker.url,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(state_dir),
            "--instance",
            name,
            "--public-url",
            public_url,
            "--log-level",
            "warning",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server {self.name} exited: {self.tail()}")
        try:
            return httpx.get(self.url + "/openapi.json", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """``kill -9``, from any thread (the watcher's callback does it)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class Front:
    """A TCP front for the servers: each connection goes to the first of ``ports``
    that accepts it (asyncio, on a thread of its own)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(5)

    async def _serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.ports:
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            self.writers |= {writer, up_w}
            try:
                await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
            finally:
                self.writers -= {writer, up_w}
            return
        writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for w in list(self.writers):
                w.close()
            await self.server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        dst.close()


class DesiredWatcher:
    """Every desired document the broker forwards, for the whole test: per device the
    generations in the order they arrived (paho's thread), and a hook on the first
    document that names a version; and which devices report running which version."""

    def __init__(self, broker: Broker) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="desired-watcher", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(f"{PREFIX}/+/desired", 1), (f"{PREFIX}/+/state", 1)]
        )
        self.lock = threading.Lock()
        self.seen: dict[str, list[tuple[int, bytes]]] = {}
        self.backwards: list[str] = []
        self.on_first: dict[str, Any] = {}  # version -> callback, run once
        self.firsts: dict[str, int] = {}  # version -> count of devices seen at the hook
        self.running: dict[str, set[str]] = {}  # version -> devices reporting success
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        device = msg.topic.split("/")[-2]
        payload = bytes(msg.payload)
        doc = json.loads(payload) if payload else {}
        if msg.topic.endswith("/state"):
            flow = (doc.get("flows") or {}).get(FLOW) or {}
            if flow.get("status") == "success":
                with self.lock:
                    self.running.setdefault(flow["currentVersion"], set()).add(device)
            return
        gen = int(doc.get("generation", -1))
        version = ((doc.get("flows") or {}).get(FLOW) or {}).get("version")
        with self.lock:
            history = self.seen.setdefault(device, [])
            if history:
                last_gen, last_payload = history[-1]
                if gen < last_gen or (gen == last_gen and payload != last_payload):
                    self.backwards.append(f"{device}: {last_gen} then {gen}")
            history.append((gen, payload))
            hook = self.on_first.pop(version, None)
            if hook is not None:
                self.firsts[version] = sum(
                    1 for h in self.seen.values() if _version(h[-1][1]) == version
                )
        if hook is not None:
            hook()

    def latest(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {d: json.loads(h[-1][1]) for d, h in self.seen.items()}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _version(payload: bytes) -> str | None:
    v: str | None = ((json.loads(payload).get("flows") or {}).get(FLOW) or {}).get("version")
    return v


def retained(broker: Broker, suffix: str, count: int) -> dict[str, dict[str, Any]]:
    """The retained documents of ``{prefix}/+/{suffix}`` (waits for ``count`` of them)."""
    got: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain and msg.payload:
            with lock:
                got[msg.topic.split("/")[-2]] = json.loads(msg.payload)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"reader-{suffix}")
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/+/{suffix}", qos=1)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        wait(lambda: len(got) >= count, 20, f"{count} retained {suffix} documents")
        time.sleep(0.3)  # none beyond
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return dict(got)


@pytest.fixture
def nodelay_broker(tmp_path: Path) -> Iterator[Broker]:
    # A server hears every device of the fleet: a burst of reports must not overflow
    # the broker's per-client queue (1000 messages by default), which drops QoS 1.
    b = Broker(tmp_path / "broker", "set_tcp_nodelay true\nmax_queued_messages 100000")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@contextlib.contextmanager
def run_sim(tmp_path: Path, broker: Broker) -> Iterator[subprocess.Popen[bytes]]:
    """``edge-agent sim`` with fast retries, stopped (SIGINT) at the end."""
    conf = tmp_path / "sim.toml"
    conf.write_text(
        f"""device_id = "sim"
device_type = "gw"

[mqtt]
broker = "{broker.url}"
topic_prefix = "{PREFIX}"
keepalive = 10
reconnect_min = 0.2
reconnect_max = 2.0

[artifacts]
retries = 1
backoff_initial = 0.2
backoff_max = 0.5
read_timeout = 5.0
stall_timeout = 5.0
min_free_space = 0

[reconcile]
retry_backoff_initial = 0.5
retry_backoff_max = 2.0
"""
    )
    log = (tmp_path / "sim.log").open("ab")
    proc = subprocess.Popen(
        [
            EDGE_AGENT,
            "sim",
            "--devices",
            str(DEVICES),
            "--config",
            str(conf),
            "--state-root",
            str(tmp_path / "sim"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_servers_kill_one_mid_release(
    tmp_path: Path, postgres: PostgresCluster, nodelay_broker: Broker
) -> None:
    broker = nodelay_broker
    db_url = postgres.create_database("scale")
    state = tmp_path / "server-state"  # both servers: one artifact store
    common = ["--db", db_url, "--state-dir", str(state)]
    app = admin(*common, "create-application", "--name", "scale", "--prefix", PREFIX)
    token = admin(*common, "create-token", "--application", app, "--scope", "all.Application")
    stack = contextlib.ExitStack()
    ports = [free_port(), free_port()]
    front = Front(ports)
    stack.callback(front.close)
    a = ServerProcess("a", db_url, broker, state, tmp_path / "server-a.log", front.url)
    b = ServerProcess("b", db_url, broker, state, tmp_path / "server-b.log", front.url)
    front.ports = [a.port, b.port]
    watcher = DesiredWatcher(broker)
    stack.callback(watcher.close)
    db = Database(db_url)
    stack.callback(db.close)
    stack.callback(b.stop)
    stack.callback(a.stop)
    t_start = time.monotonic()
    with stack:
        a.start()
        b.start()
        wait(lambda: a.ready() and b.ready(), 30, "both servers")
        stack.enter_context(run_sim(tmp_path, broker))
        headers = {"Authorization": f"Bearer {token}"}
        http_b = stack.enter_context(httpx.Client(base_url=b.url, headers=headers, timeout=60))
        client_b = Client(auth_token=token, url=b.url)

        def inventory() -> bool:
            got = http_b.get(f"/applications/{app}/devices", params={"perPage": 1000}).json()
            online = sum(d["connectionInfo"]["connected"] == 1 for d in got["items"])
            return got["totalCount"] == DEVICES and online == DEVICES

        wait(inventory, 90, f"{DEVICES} devices online in the inventory", every=1)
        t_online = time.monotonic()

        wasm = COUNTER_WASM.read_bytes()
        with httpx.Client(base_url=a.url, headers=headers, timeout=60) as http_a:
            for version in ("v1", "v2"):
                r = http_a.post(
                    f"/applications/{app}/flows/{FLOW}/versions",
                    data={"version": version},
                    files={"artifact": ("counter.wasm", wasm, "application/octet-stream")},
                )
                assert r.status_code == 201, r.text

        def at(version: str, enough: int) -> list[dict[str, Any]] | None:
            got = client_b.edge_deployments.get(applicationId=app, flowId=FLOW, perPage=1000)
            items: list[dict[str, Any]] = got["items"]
            done = [
                d
                for d in items
                if (d["desiredVersion"], d["currentVersion"], d["status"])
                == (version, version, "success")
            ]
            return items if len(done) >= enough else None

        # 1. v1 through A, and kill -9 of A as soon as its first document reaches the
        # broker: A has committed the release and is publishing it (200 per batch).
        ids = [f"sim-{i:04d}" for i in range(1, DEVICES + 1)]
        killed = threading.Event()

        def kill_a() -> None:
            a.kill()
            killed.set()

        watcher.on_first["v1"] = kill_a
        outcome: dict[str, Any] = {}

        def release_v1() -> None:
            try:
                outcome["result"] = Client(auth_token=token, url=a.url).edge_deployments.release(
                    applicationId=app,
                    deployment={"flowId": FLOW, "version": "v1", "deviceIds": ids},
                )
            except Exception as exc:  # A died under the call
                outcome["error"] = exc

        t_release = time.monotonic()
        releaser = threading.Thread(target=release_v1)
        releaser.start()
        assert killed.wait(60), f"no v1 document published: {a.tail()}"
        releaser.join(30)
        assert a.proc is not None
        assert a.proc.wait(10) == -signal.SIGKILL
        v1_at_kill = watcher.firsts["v1"]
        assert v1_at_kill < DEVICES, "A published the whole release before it was killed"

        # 2. B's sweep publishes what A committed and did not publish.
        def v1_everywhere() -> bool:
            latest = watcher.latest()
            return len(latest) == DEVICES and all(
                (d["flows"].get(FLOW) or {}).get("version") == "v1" for d in latest.values()
            )

        wait(v1_everywhere, 20, "B's sweep to publish every v1 document")
        t_swept = time.monotonic()

        # 3. While v1 is being installed (its artifacts now come from B), v2 through B.
        wait(lambda: len(watcher.running.get("v1", ())) >= DEVICES // 10, 60, "v1 running")
        assert client_b.edge_deployments.release(
            applicationId=app, deployment={"flowId": FLOW, "version": "v2", "deviceIds": ids}
        ) == {"success": True}
        t_v2 = time.monotonic()
        items = wait(lambda: at("v2", DEVICES), 150, "v2 success on every device", every=1)
        t_done = time.monotonic()
        assert sorted(d["deviceId"] for d in items) == ids
        assert len(items) == DEVICES

        # The retained desired documents never went backwards, and they are the
        # database's: every device's last one is its row's, published.
        assert watcher.backwards == []
        desired = retained(broker, "desired", DEVICES)
        reported = retained(broker, "state", DEVICES)
        assert watcher.latest() == desired
        with db.transaction() as s:
            rows = {d.id: d for d in s.scalars(select(Device).where(Device.application_id == app))}
            deps = {
                d.device_id: d
                for d in s.scalars(select(Deployment).where(Deployment.application_id == app))
            }
            counted = s.execute(
                select(DeploymentAttempt.version, DeploymentAttempt.status, func.count()).group_by(
                    DeploymentAttempt.version, DeploymentAttempt.status
                )
            )
            attempts = {(v, st): n for v, st, n in counted}
        assert sorted(rows) == ids
        for device_id, row in rows.items():
            assert row.online, device_id
            assert row.published_generation == row.generation, device_id
            assert row.desired == desired[device_id], device_id
            assert desired[device_id]["flows"][FLOW]["version"] == "v2"
            state = reported[device_id]
            assert state["generation"] == desired[device_id]["generation"], device_id
            assert row.state == state, device_id
            flow = state["flows"][FLOW]
            dep = deps[device_id]
            assert (dep.current_version, dep.status, dep.current_sha256) == (
                flow["currentVersion"],
                flow["status"],
                flow["sha256"],
            ), device_id
            assert flow["deploymentId"] == desired[device_id]["flows"][FLOW]["deploymentId"]
        # One attempt per device and version: v2 succeeded; v1 succeeded or was
        # superseded by v2 (none is left open).
        assert attempts[("v2", "success")] == DEVICES
        assert attempts.get(("v1", "success"), 0) + attempts.get(("v1", "superseded"), 0) == (
            DEVICES
        ), attempts
        assert sum(attempts.values()) == 2 * DEVICES, attempts
        print(
            f"\n{DEVICES} devices online {t_online - t_start:.1f} s after start; "
            f"A killed as its first v1 document reached the broker "
            f"(its answer: {outcome.get('error') or outcome.get('result')!r}); B's sweep "
            f"published the rest {t_swept - t_release:.1f} s after the release; "
            f"{attempts.get(('v1', 'success'), 0)} devices reported v1 running, the others' "
            f"v1 was superseded by v2 through B; every device at v2 {t_done - t_v2:.1f} s later"
        )
