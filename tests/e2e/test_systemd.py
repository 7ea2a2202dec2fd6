"""systemd integration: notify protocol, watchdog, reload, shutdown budget, the unit file."""

from __future__ import annotations

import asyncio
import configparser
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Operator
from common import REPO, wait_until

from agent.device import daemon
from agent.device.daemon import Agent
from agent.device.sdnotify import Notifier

UNIT = REPO / "systemd" / "edge-agent.service"


class NotifySocket:
    """A fake systemd: a datagram socket that records what the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self, key: str) -> list[tuple[float, str]]:
        return [
            (t, m) for t, m in self.messages if any(line.startswith(key) for line in m.split("\n"))
        ]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def test_notifier_paths_abstract_socket_and_watchdog_pid(
    tmp_path: Path, notify: NotifySocket
) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "500000"})
    assert n.watchdog_interval == 0.25
    assert n.ready("up")
    assert n.watchdog()
    assert n.stopping()
    time.sleep(0.3)  # the recorder thread reads them
    assert [m for _, m in notify.messages] == [
        "READY=1\nSTATUS=up",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping",
    ]
    assert not Notifier({}).ready()  # not under systemd: a no-op
    other_pid = Notifier({"NOTIFY_SOCKET": "x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval is None  # the watchdog is for another process
    name = f"edge-agent-test-notify-{os.getpid()}"  # (one per test process)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(f"\0{name}")
    try:
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).notify("X=1")
        assert abstract.recv(100) == b"X=1"
    finally:
        abstract.close()


def write_config(tmp_path: Path, broker_url: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "dev1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nbroker = "{broker_url}"\nreconnect_min = 0.05\nreconnect_max = 0.3\n'
        '[log]\nformat = "json"\n'
    )
    return path


@pytest.mark.slow
async def test_daemon_under_a_fake_systemd(
    tmp_path: Path, broker: Broker, notify: NotifySocket
) -> None:
    """READY, STATUS, WATCHDOG every half interval, RELOADING+READY on SIGHUP (a new
    broker in the file: the agent moves to it), STOPPING on SIGTERM, exit 0."""
    second = Broker(tmp_path / "second")
    second.start()
    config = write_config(tmp_path, broker.url)
    env = {**__import__("os").environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - the daemon under test
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    op2 = Operator(second).connect()
    op2.subscribe("edge/dev1/status")
    try:
        await wait_until(lambda: notify.lines("READY=1"), 20, "READY=1")
        await wait_until(lambda: len(notify.lines("WATCHDOG=1")) >= 4, 10, "watchdog pings")
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.1 < g < 0.6 for g in gaps), gaps  # about every 0.2 s
        await wait_until(
            lambda: any("connected to" in m for _, m in notify.lines("STATUS=")),
            10,
            "a connected STATUS",
        )
        config.write_text(config.read_text().replace(broker.url, second.url))
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: notify.lines("RELOADING=1"), 10, "RELOADING=1")
        await wait_until(lambda: len(notify.lines("READY=1")) >= 2, 10, "READY after reload")
        status = await op2.wait_for("edge/dev1/status", lambda d: d["online"] is True)
        assert status["online"] is True  # reconnected to the broker named in the new file
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert notify.lines("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        op2.close()
        second.stop()


async def test_watchdog_pings_stop_while_the_loop_is_blocked(
    notify: NotifySocket, make_config: Any
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
    async with Agent(make_config(), notifier=notifier):
        await wait_until(lambda: len(notify.lines("WATCHDOG=1")) >= 3, 10, "pings")
        blocked_at = time.monotonic()
        time.sleep(1.0)  # noqa: ASYNC251 - a hung event loop, on purpose
        unblocked_at = time.monotonic()
        await wait_until(
            lambda: any(t > unblocked_at for t, _ in notify.lines("WATCHDOG=1")),
            5,
            "pings again after the loop is free",
        )
    during = [t for t, _ in notify.lines("WATCHDOG=1") if blocked_at + 0.05 < t < unblocked_at]
    assert during == []


async def test_no_pings_when_the_reconciler_is_dead(notify: NotifySocket, make_config: Any) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
    async with Agent(make_config(), notifier=notifier) as agent:
        await wait_until(lambda: len(notify.lines("WATCHDOG=1")) >= 2, 10, "pings")
        assert agent._reconciler_task is not None
        agent._reconciler_task.cancel()  # stands in for a crashed reconcile worker
        await asyncio.sleep(0.05)
        dead_at = time.monotonic()
        await asyncio.sleep(0.6)
        assert [t for t, _ in notify.lines("WATCHDOG=1") if t > dead_at] == []


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_shutdown_stages_fit_in_timeout_stop_sec() -> None:
    stop = float(unit()["Service"]["TimeoutStopSec"])
    stages = (
        daemon.STOP_RECONCILE_S
        + daemon.STOP_FLOWS_S
        + daemon.STOP_OFFLINE_ACK_S
        + daemon.STOP_MQTT_S
    )
    assert stages < stop
    watchdog = float(unit()["Service"]["WatchdogSec"])
    assert watchdog >= 10  # pings at half of it; a slow SD card must not trip it


SERVER_UNIT = REPO / "systemd" / "edge-agent-server.service"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
@pytest.mark.parametrize("unit_file", [UNIT, SERVER_UNIT], ids=["agent", "server"])
def test_unit_verifies_and_exposure_is_at_most_1_5(tmp_path: Path, unit_file: Path) -> None:
    # verify wants ExecStart to exist: point it at this checkout's edge-agent.
    exe = Path(sys.executable).parent / "edge-agent"
    copy = tmp_path / unit_file.name
    text = unit_file.read_text().replace("/opt/edge-agent-server/bin/edge-agent", str(exe))
    copy.write_text(text.replace("/usr/bin/edge-agent", str(exe)))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout)
    assert match, res.stdout[-500:] + res.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security {unit_file.name}: overall exposure {exposure}")
    assert exposure <= 1.5
    # The agent's unit says why it cannot have W^X (wasmtime); the server's has it.
    assert "MemoryDenyWriteExecute" in unit_file.read_text()
