"""Control-plane benchmark: ``edge-agent server`` releasing to a simulated fleet, and
listing deployments from a large database.

(a) Release: a private Mosquitto (``set_tcp_nodelay true``), a private PostgreSQL,
one ``edge-agent server`` process and ``edge-agent sim --devices N`` (N real agents
in one process). The counter example is released to every device, in rounds, three
ways, each with an artifact of its own (the counter with a custom section naming the
release, so every release downloads and compiles a new module):

- through the server's API (``POST …/edge/deployments/release``; the artifact was
  uploaded as a flow version, devices download it from the server);
- baseline: the broker-only fleet tool, ``edge-agent fleet release --all`` (as
  ``bench/fleet.py`` releases: the artifact is a retained MQTT message);
- baseline: the same tool with the artifact's URL on the server (so the devices'
  downloads are the same as through the API; only the writer differs).

For each: the time the command took, the time until every device reports
``success`` (its retained state, watched on the broker), the time until the
server's database records it too, and the CPU seconds of the server, PostgreSQL,
the broker, the simulator and the tool.

(b) Listing: ``GET /applications/{app}/edge/deployments?perPage=1000`` with D devices
× F flows in the database (rows inserted through the ORM, not through MQTT, then
ANALYZE), on SQLite and on PostgreSQL: p50 and p99 over R requests, and the server's CPU per
request. Baselines in the same run: the same request for one row (``perPage=1``: what
every request costs), and the same two SQL statements (the page and its count)
through the database driver alone.

Usage: python bench/server.py [--devices 1000] [--rounds 2] [--list-devices 10000]
       [--flows 3] [--requests 200] [--skip-release] [--skip-list] [--json]
       [--py-spy DIR]

``--py-spy DIR`` records a py-spy profile of the server during each release
(``DIR/server-<version>.txt``, raw collapsed stacks; needs ``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import psycopg
from _harness import pct
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, insert, select

from agent.fleet.demo import counter_wasm
from agent.server.artifact_store import artifact_url
from agent.server.db import applications as apps_repo
from agent.server.db.engine import Database
from agent.server.db.models import Application, Deployment, Device

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))
from postgres import PostgresCluster, postgres_available  # noqa: E402

EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))
TICK = os.sysconf("SC_CLK_TCK")
PREFIX = "edge"
FLOW = "counter"


# ------------------------------------------------------------------ processes and CPU
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children, the ones that exited included
    (PostgreSQL's postmaster and its backends, each of which is a session leader)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            _head, tail = stat.read_text().rsplit(")", 1)
            fields = tail.split()
        except (OSError, ValueError):
            continue
        if stat.parent.name == str(pid) or int(fields[1]) == pid:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / TICK


def wait(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def mosquitto(work: Path) -> Iterator[tuple[int, int]]:
    """A private Mosquitto: (port, pid). A server hears every device, so a burst of
    reports must not overflow the broker's per-client queue (1,000 by default)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        f"max_queued_messages 100000\nlog_dest file {work / 'mosquitto.log'}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:

        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return True
            return False

        wait(up, 10, "mosquitto")
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def admin(db_url: str, state_dir: Path, *argv: str) -> str:
    done = subprocess.run(
        [EDGE_AGENT, "server", "admin", "--db", db_url, "--state-dir", str(state_dir), *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


class Server:
    """``edge-agent server`` as its own process."""

    def __init__(self, db_url: str, broker: str, state_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    EDGE_AGENT,
                    "server",
                    "--db",
                    db_url,
                    "--broker",
                    broker,
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--state-dir",
                    str(state_dir),
                    "--log-level",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/openapi.json", timeout=2).status_code == 200
            return False

        wait(ready, 30, "the server")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def variant(tag: str) -> bytes:
    """The counter with a custom section naming ``tag``: a module of its own (its own
    digest, downloaded and compiled anew), running the same code."""
    name = b"edge-bench"
    body = bytes([len(name)]) + name + tag.encode()
    assert len(body) < 128  # one LEB128 byte
    return counter_wasm() + bytes([0, len(body)]) + body


class StateWatcher:
    """Each device's reported (currentVersion, status) of the flow, from the broker.
    It connects before the simulator, so its paho loop's select() gets a low fd."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.flows: dict[str, tuple[str | None, str | None]] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-state-watcher")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/+/state", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return
        flow = (json.loads(msg.payload).get("flows") or {}).get(FLOW) or {}
        with self.lock:
            self.flows[msg.topic.split("/")[-2]] = (flow.get("currentVersion"), flow.get("status"))

    def count(self, version: str) -> int:
        with self.lock:
            return sum(1 for v in self.flows.values() if v == (version, "success"))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------ (a) release
def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` (threads on a CPU, not idle ones) until it gets SIGINT."""
    spy = Path(sys.executable).with_name("py-spy")
    opts = ["--rate", "200", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(
        [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid), *opts],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def release_bench(n: int, rounds: int, work: Path, profile: Path | None) -> dict[str, Any]:
    results: dict[str, Any] = {"devices": n, "releases": []}
    work.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        port, broker_pid = stack.enter_context(mosquitto(work))
        broker = f"mqtt://127.0.0.1:{port}"
        pg = PostgresCluster(work / "pg")
        pg.start()
        stack.callback(pg.remove)
        db_url = pg.url
        state_dir = work / "server"
        app = admin(db_url, state_dir, "create-application", "--name", "bench", "--prefix", PREFIX)
        token = admin(
            db_url, state_dir, "create-token", "--application", app, "--scope", "all.Application"
        )
        watcher = StateWatcher(port)
        stack.callback(watcher.close)
        server = Server(db_url, broker, state_dir, work / "server.log")
        stack.callback(server.stop)
        http = stack.enter_context(
            httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=300
            )
        )
        db = Database(db_url)
        stack.callback(db.close)
        started = time.monotonic()
        with (work / "sim.log").open("ab") as log:
            sim = subprocess.Popen(
                [
                    EDGE_AGENT,
                    "sim",
                    "--devices",
                    str(n),
                    "--broker",
                    broker,
                    "--prefix",
                    PREFIX,
                    "--state-root",
                    str(work / "sim"),
                    "--log-level",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def stop_sim() -> None:
            sim.send_signal(signal.SIGINT)
            try:
                sim.wait(180)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()

        stack.callback(stop_sim)

        def inventory() -> bool:
            got = http.get(f"/applications/{app}/devices", params={"perPage": n}).json()
            online = sum(d["connectionInfo"]["connected"] == 1 for d in got["items"])
            return got["totalCount"] == n and online == n

        wait(inventory, 120 + n / 10, f"{n} devices in the server's inventory", every=1)
        results["online_s"] = round(time.monotonic() - started, 1)
        time.sleep(3)  # start-up work done before the first release
        ids = [f"sim-{i:04d}" for i in range(1, n + 1)]
        with db.transaction() as s:
            row = s.get(Application, app)
            assert row is not None
            url_key = row.url_key

        def recorded(version: str) -> int:
            with db.transaction() as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(Deployment)
                        .where(
                            Deployment.application_id == app,
                            Deployment.flow_id == FLOW,
                            Deployment.current_version == version,
                            Deployment.status == "success",
                        )
                    )
                    or 0
                )

        for rnd in range(rounds):
            for way in ("server API", "fleet tool, MQTT artifact", "fleet tool, server URL"):
                version = f"r{rnd}-{way.split()[0]}-{way.split()[-1].lower()}"
                data = variant(version)
                arg = ""
                if way == "fleet tool, MQTT artifact":
                    path = work / f"{version}.wasm"
                    path.write_bytes(data)
                    arg = str(path)
                else:  # uploaded to the server's store, as a flow version
                    r = http.post(
                        f"/applications/{app}/flows/{FLOW}/versions",
                        data={"version": version},
                        files={"artifact": ("counter.wasm", data, "application/octet-stream")},
                    )
                    r.raise_for_status()
                    sha = r.json()["sha256"]
                    arg = artifact_url(server.url, url_key, app, sha)
                print(f"[{time.strftime('%H:%M:%S')}] {way} ...", file=sys.stderr, flush=True)
                cpu0 = (
                    cpu_seconds(server.proc.pid),
                    tree_cpu_seconds(pg.proc.pid if pg.proc else 0),
                    cpu_seconds(broker_pid),
                    cpu_seconds(sim.pid),
                )
                spy = None
                if profile is not None:
                    profile.mkdir(parents=True, exist_ok=True)
                    out = profile / f"server-{version}.txt"
                    spy = start_profiler(server.proc.pid, out)
                    time.sleep(1)  # py-spy attaches
                t0 = time.monotonic()
                tool_cpu = 0.0
                if way == "server API":
                    r = http.post(
                        f"/applications/{app}/edge/deployments/release",
                        json={"flowId": FLOW, "version": version, "deviceIds": ids},
                    )
                    r.raise_for_status()
                else:
                    tool = subprocess.Popen(
                        [
                            EDGE_AGENT,
                            "fleet",
                            "release",
                            "--broker",
                            broker,
                            "--prefix",
                            PREFIX,
                            "--flow",
                            FLOW,
                            "--version",
                            version,
                            "--artifact",
                            arg,
                            "--all",
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=(work / "fleet.log").open("ab"),
                    )
                    _pid, status, usage = os.wait4(tool.pid, 0)
                    tool.returncode = os.waitstatus_to_exitcode(status)
                    if tool.returncode != 0:
                        raise RuntimeError(f"fleet release exited {tool.returncode}")
                    tool_cpu = usage.ru_utime + usage.ru_stime
                command_s = time.monotonic() - t0
                wait(lambda v=version: watcher.count(v) == n, 300, f"{version} on every device")
                converge_s = time.monotonic() - t0
                cpu1 = (
                    cpu_seconds(server.proc.pid),
                    tree_cpu_seconds(pg.proc.pid if pg.proc else 0),
                    cpu_seconds(broker_pid),
                    cpu_seconds(sim.pid),
                )
                wait(lambda v=version: recorded(v) == n, 120, f"{version} recorded", every=0.1)
                recorded_s = time.monotonic() - t0
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                cpu = [round(b - a, 2) for a, b in zip(cpu0, cpu1, strict=True)]
                results["releases"].append(
                    {
                        "round": rnd,
                        "way": way,
                        "command_s": round(command_s, 2),
                        "converge_s": round(converge_s, 2),
                        "recorded_s": round(recorded_s, 2),
                        "server_cpu_s": cpu[0],
                        "postgres_cpu_s": cpu[1],
                        "broker_cpu_s": cpu[2],
                        "sim_cpu_s": cpu[3],
                        "tool_cpu_s": round(tool_cpu, 2),
                    }
                )
                time.sleep(2)
        got = http.get(
            f"/applications/{app}/edge/deployments", params={"flowId": FLOW, "perPage": n}
        ).json()
        assert got["totalCount"] == n, got["totalCount"]
    return results


# ------------------------------------------------------------------ (b) listing
def fill(db: Database, devices: int, flows: int) -> str:
    """An application with ``devices`` devices × ``flows`` edge deployments, inserted
    through the ORM in bulk; returns its id."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with db.transaction() as s:
        app = apps_repo.create_application(s, "list", "list").id
    for start in range(0, devices, 2000):
        chunk = range(start, min(devices, start + 2000))
        with db.transaction() as s:
            s.execute(
                insert(Device),
                [
                    {
                        "application_id": app,
                        "id": f"dev-{i:05d}",
                        "name": f"dev-{i:05d}",
                        "tags": [],
                        "attributes": [],
                        "device_type": "gw",
                        "online": True,
                        "desired": {},
                        "creation_date": base,
                        "last_updated": base,
                    }
                    for i in chunk
                ],
            )
            s.execute(
                insert(Deployment),
                [
                    {
                        "application_id": app,
                        "device_id": f"dev-{i:05d}",
                        "flow_id": f"flow-{f}",
                        "kind": "edge",
                        "desired_version": "1.0.0",
                        "current_version": "1.0.0",
                        "status": "success",
                        "current_sha256": "ab" * 32,
                        "creation_date": base,
                        "last_updated": base + timedelta(seconds=i * flows + f),
                    }
                    for i in chunk
                    for f in range(flows)
                ],
            )
    # The planner's statistics, as a database in use has them (PostgreSQL's autovacuum
    # gathers them soon after a bulk load; without them it sorts all 30,000 rows).
    with db.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    return app


def raw_query(db_url: str, app: str) -> Callable[[], int]:
    """The page's two statements through the driver alone: a function running them."""
    page = (
        "SELECT * FROM deployments WHERE application_id = {p} AND kind = 'edge' "
        "ORDER BY last_updated ASC, id ASC LIMIT 1000 OFFSET 0"
    )
    count = "SELECT count(*) FROM deployments WHERE application_id = {p} AND kind = 'edge'"
    if db_url.startswith("sqlite"):
        sconn = sqlite3.connect(db_url.removeprefix("sqlite:///"), check_same_thread=False)

        def run_sqlite() -> int:
            rows = sconn.execute(page.format(p="?"), (app,)).fetchall()
            sconn.execute(count.format(p="?"), (app,)).fetchone()
            return len(rows)

        return run_sqlite
    pconn = psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"))

    def run_pg() -> int:
        with pconn.cursor() as cur:
            rows = cur.execute(page.format(p="%s"), (app,)).fetchall()
            cur.execute(count.format(p="%s"), (app,)).fetchone()
        pconn.rollback()
        return len(rows)

    return run_pg


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    for _ in range(5):
        fn()  # warm
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def list_bench(
    label: str, db_url: str, broker: str, work: Path, devices: int, flows: int, requests: int
) -> dict[str, Any]:
    db = Database(db_url)
    db.migrate()
    t0 = time.monotonic()
    app = fill(db, devices, flows)
    fill_s = time.monotonic() - t0
    with db.transaction() as s:
        _token, secret = apps_repo.create_token(s, app, ["all.Application"])
    db.close()
    server = Server(db_url, broker, work / f"server-{label}", work / f"server-{label}.log")
    try:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60
        ) as http:
            path = f"/applications/{app}/edge/deployments"
            size = 0

            def page(per_page: int) -> Callable[[], None]:
                def get() -> None:
                    nonlocal size
                    r = http.get(path, params={"perPage": per_page})
                    r.raise_for_status()
                    body = r.json()
                    assert body["count"] == min(per_page, devices * flows), body["count"]
                    assert body["totalCount"] == devices * flows, body["totalCount"]
                    size = len(r.content)

                return get

            c0 = cpu_seconds(server.proc.pid)
            full = timed(page(1000), requests)
            server_cpu = (cpu_seconds(server.proc.pid) - c0) / (requests + 5)
            full_size = size
            one = timed(page(1), requests)
    finally:
        server.stop()
    raw = timed(raw_query(db_url, app), requests)
    return {
        "database": label,
        "rows": devices * flows,
        "fill_s": round(fill_s, 1),
        "page_kib": round(full_size / 1024),
        "p50_ms": round(pct(full, 50), 1),
        "p99_ms": round(pct(full, 99), 1),
        "server_cpu_ms": round(server_cpu * 1000, 1),
        "one_row_p50_ms": round(pct(one, 50), 1),
        "one_row_p99_ms": round(pct(one, 99), 1),
        "raw_sql_p50_ms": round(pct(raw, 50), 2),
        "raw_sql_p99_ms": round(pct(raw, 99), 2),
    }


# ------------------------------------------------------------------ main
def print_release(r: dict[str, Any]) -> None:
    print(
        f"\n(a) release to {r['devices']} devices (all online in the server's inventory "
        f"{r['online_s']} s after the simulator started)"
    )
    print(
        f"  {'way':28} {'command':>8} {'all success':>12} {'in the DB':>10} "
        f"{'server':>7} {'postgres':>9} {'broker':>7} {'sim':>7} {'tool':>6}  (s; CPU s)"
    )
    for x in r["releases"]:
        print(
            f"  {x['way']:28} {x['command_s']:8.2f} {x['converge_s']:12.2f} "
            f"{x['recorded_s']:10.2f} {x['server_cpu_s']:7.2f} {x['postgres_cpu_s']:9.2f} "
            f"{x['broker_cpu_s']:7.2f} {x['sim_cpu_s']:7.2f} {x['tool_cpu_s']:6.2f}"
        )


def print_list(rows: list[dict[str, Any]]) -> None:
    print("\n(b) GET …/edge/deployments?perPage=1000")
    for x in rows:
        print(
            f"  {x['database']:10} {x['rows']} rows: p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms "
            f"({x['page_kib']} KiB, server CPU {x['server_cpu_ms']} ms per request); "
            f"baselines: perPage=1 p50 {x['one_row_p50_ms']} / p99 {x['one_row_p99_ms']} ms, "
            f"the SQL alone p50 {x['raw_sql_p50_ms']} / p99 {x['raw_sql_p99_ms']} ms "
            f"(filled in {x['fill_s']} s)"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--list-devices", type=int, default=10_000)
    ap.add_argument("--flows", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--skip-release", action="store_true")
    ap.add_argument("--skip-list", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR")
    args = ap.parse_args()
    reason = postgres_available()
    if reason is not None:
        sys.exit(f"bench/server.py: {reason}")
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPU {platform.machine()}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
    }
    work = Path(tempfile.mkdtemp(prefix="edge-bench-server-"))
    try:
        if not args.skip_release:
            results["release"] = release_bench(
                args.devices, args.rounds, work / "release", args.py_spy
            )
            if not args.json:
                print_release(results["release"])
        if not args.skip_list:
            lw = work / "list"
            lw.mkdir(parents=True)
            rows = []
            with mosquitto(lw) as (port, _pid):
                broker = f"mqtt://127.0.0.1:{port}"
                print(f"[{time.strftime('%H:%M:%S')}] list: SQLite ...", file=sys.stderr)
                rows.append(
                    list_bench(
                        "SQLite",
                        f"sqlite:///{lw / 'list.db'}",
                        broker,
                        lw,
                        args.list_devices,
                        args.flows,
                        args.requests,
                    )
                )
                pg = PostgresCluster(lw / "pg")
                pg.start()
                try:
                    print(f"[{time.strftime('%H:%M:%S')}] list: PostgreSQL ...", file=sys.stderr)
                    rows.append(
                        list_bench(
                            "PostgreSQL",
                            pg.url,
                            broker,
                            lw,
                            args.list_devices,
                            args.flows,
                            args.requests,
                        )
                    )
                finally:
                    pg.remove()
            results["list"] = rows
            if not args.json:
                print_list(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
