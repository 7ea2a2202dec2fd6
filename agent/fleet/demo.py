"""``edge-agent demo``: a fleet deployment, locally, with nothing but Mosquitto.

It starts a private Mosquitto on a free port (or uses ``--broker``), runs a small
simulated fleet (real agents, ``edge-agent sim``), and then, as an operator would,
runs ``edge-agent fleet`` commands: a phased rollout of the counter example, the
fleet converging (``fleet get``), a command to the flow and its answer, and a
replace of the version, converging again. It finishes by itself and removes what
it created (``--keep`` keeps the temp directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.device.config import AgentConfig, MqttConfig

DEVICES = 5
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

    def __init__(self, broker: str, root: Path) -> None:
        self.broker = broker
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
                "mqtt": {"broker": self.broker, "reconnect_min": 0.1},
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


def _fleet(broker: str, *argv: str) -> None:
    """Run and show one ``edge-agent fleet`` command, as a user would type it."""
    from agent.cli import main as cli_main

    shown = " ".join(a if a and " " not in a else json.dumps(a) for a in argv)
    print(f"\n$ edge-agent fleet {shown}", flush=True)
    rc = cli_main(["fleet", *argv, "--broker", broker])
    sys.stdout.flush()
    if rc != 0:
        raise RuntimeError(f"edge-agent fleet {argv[0]} exited with {rc}")


def _wait_converged(broker: str, flow: str, version: str, timeout: float = 30.0) -> float:
    from agent.fleet.controller import FleetClient, table_rows

    started = time.monotonic()
    with FleetClient(MqttConfig.model_validate({"broker": broker})) as client:
        while time.monotonic() - started < timeout:
            client.settle(quiet=0.1)
            rows = [r for r in table_rows(client.devices().values()) if r["flowId"] == flow]
            if len(rows) == DEVICES and all(
                r["currentVersion"] == version and r["status"] == "success" for r in rows
            ):
                return time.monotonic() - started
            time.sleep(0.2)
    raise RuntimeError(f"the fleet did not converge on {flow} {version} in {timeout:g} s")


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
        return 1
    (work / "counter-1.0.0.wasm").write_bytes(counter)
    (work / "counter-1.1.0.wasm").write_bytes(versioned(counter, "1.1.0"))
    (work / "counter.json").write_text(json.dumps(COUNTER_MANIFEST, indent=1))
    try:
        with contextlib.ExitStack() as stack:
            if broker is None:
                port = stack.enter_context(mosquitto_server(work))
                broker = f"mqtt://127.0.0.1:{port}"
                print(f"  started a private Mosquitto: {broker}")
            fleet = stack.enter_context(_Fleet(broker, work / "devices"))
            print(f"  {fleet.summary}")
            _steps(broker, work)
    except Exception as exc:  # noqa: BLE001 - any failure ends the demo with its reason
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    else:
        print(
            f"\ndemo finished in {time.monotonic() - started:.1f} s: the fleet converged on "
            "every release."
        )
        return 0
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _steps(broker: str, work: Path) -> None:
    print(
        "\n== 1. a phased rollout: 20% of the fleet, then 60%, then all; each phase waits\n"
        "      for its devices' 2 s health window, and stops on a failure (or a revert)"
    )
    _fleet(
        broker,
        "rollout",
        "--flow",
        "counter",
        "--version",
        "1.0.0",
        "--artifact",
        str(work / "counter-1.0.0.wasm"),
        "--manifest",
        str(work / "counter.json"),
        "--phase",
        "20%",
        "--phase",
        "60%",
        "--phase",
        "100%",
        "--max-failures",
        "0",
        "--health-window",
        "2",
    )
    _fleet(broker, "get", "--flow", "counter")

    print("\n== 2. a command to the flow on one device; the flow answers (edge_respond)")
    time.sleep(1.2)  # let the counter tick once
    _fleet(broker, "command", "--device", "sim-0003", "--name", "counter.get")

    print("\n== 3. replace 1.0.0 by 1.1.0 everywhere (blue/green on each device)")
    _fleet(
        broker,
        "replace",
        "--flow",
        "counter",
        "--old-version",
        "1.0.0",
        "--new-version",
        "1.1.0",
        "--artifact",
        str(work / "counter-1.1.0.wasm"),
    )
    took = _wait_converged(broker, "counter", "1.1.0")
    print(f"\n(converged in {took:.1f} s)")
    _fleet(broker, "get", "--flow", "counter")
    _fleet(broker, "stats", "--flow", "counter", "--version", "1.1.0")
    _fleet(broker, "command", "--device", "sim-0003", "--name", "counter.get")
    print("(the count went on across the upgrade: a flow's storage survives new versions)")
