"""The agent as a real process: kill -9 mid-download, SIGTERM, wrong credentials."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wat
from artifact_server import ArtifactServer
from broker import Broker, Operator
from common import wait_until
from scenario import DESIRED, STATE, AgentProcess, flow_state, write_config

from agent.device.daemon import Agent

pytestmark = pytest.mark.slow


@pytest.fixture
def agent_proc(tmp_path: Path, broker: Broker) -> Iterator[AgentProcess]:
    ap = AgentProcess(write_config(tmp_path, broker.url), tmp_path / "agent.log")
    yield ap
    if ap.proc is not None and ap.proc.poll() is None:
        ap.proc.kill()
        ap.wait()


async def test_kill_9_mid_download_then_restart_converges(
    tmp_path: Path, operator: Operator, artifact_server: ArtifactServer, agent_proc: AgentProcess
) -> None:
    data = wat.reactor("big", pad=400_000)
    artifact_server.add("/big.wasm", data)
    artifact_server.set_fault("/big.wasm", chunk_delay=0.15)  # ~16 KiB every 150 ms
    operator.subscribe("edge/dev1/#")
    agent_proc.start()
    operator.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "f1": {
                    "version": "v1",
                    "deploymentId": "d-kill",
                    "artifact": {
                        "url": artifact_server.url("/big.wasm"),
                        "sha256": wat.sha256(data),
                        "size": len(data),
                    },
                }
            },
        },
    )
    await operator.wait_for(STATE, flow_state("f1", status="downloading"))
    partial = tmp_path / "state" / "artifacts" / "partial" / f"{wat.sha256(data)}.part"
    await wait_until(
        lambda: partial.exists() and partial.stat().st_size > 32_000, what="some bytes downloaded"
    )
    agent_proc.signal(signal.SIGKILL)
    assert agent_proc.wait() == -signal.SIGKILL
    persisted = json.loads((tmp_path / "state" / "state.json").read_text())
    assert persisted["flows"]["f1"]["inflight"] == "download"

    artifact_server.clear_fault("/big.wasm")
    artifact_server.clear_requests()
    agent_proc.start()
    state = await operator.wait_for(
        STATE, flow_state("f1", status="success", currentVersion="v1"), timeout=30
    )
    assert state["flows"]["f1"]["attempts"] == 1  # resumed, not a new attempt
    ranges = [r.range for r in artifact_server.requests_for("/big.wasm")]
    assert ranges
    assert ranges[0] is not None
    assert ranges[0].startswith("bytes=")
    assert int(ranges[0][len("bytes=") : -1]) > 0  # resumed from the partial, not from zero
    stored = tmp_path / "state" / "artifacts" / "sha256" / wat.sha256(data)
    assert stored.read_bytes() == data


async def test_sigterm_is_a_clean_shutdown(
    operator: Operator, artifact_server: ArtifactServer, agent_proc: AgentProcess, tmp_path: Path
) -> None:
    operator.subscribe("edge/dev1/#")
    agent_proc.start()
    data = wat.reactor("v1")
    artifact_server.add("/v1.wasm", data)
    operator.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "f1": {
                    "version": "v1",
                    "artifact": {
                        "url": artifact_server.url("/v1.wasm"),
                        "sha256": wat.sha256(data),
                    },
                }
            },
        },
    )
    await operator.wait_for(STATE, flow_state("f1", status="success"))
    started = time.monotonic()
    agent_proc.signal(signal.SIGTERM)
    assert agent_proc.wait() == 0
    elapsed = time.monotonic() - started
    status = await operator.wait_for("edge/dev1/status", lambda d: d["online"] is False)
    assert set(status) <= {"online", "time"}
    events = [e["event"] for e in agent_proc.log_lines()]
    assert "agent stopped" in events
    assert not list((tmp_path / "state").glob(".state.json.*.tmp"))
    print(f"SIGTERM to exit: {elapsed:.2f} s")


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    pwfile = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(pwfile), "dev1", "right"],
        check=True,
        capture_output=True,
    )
    os.chmod(pwfile, 0o600)
    return pwfile


async def test_wrong_credentials_clear_error_and_keeps_running(
    tmp_path: Path, make_config: Any, password_file: Path
) -> None:
    pwfile = password_file
    secure = Broker(
        tmp_path / "secure", extra_conf=f"allow_anonymous false\npassword_file {pwfile}\n"
    )
    secure.start()
    try:
        cfg = make_config(mqtt={"broker": secure.url, "username": "dev1", "password": "wrong"})
        async with Agent(cfg) as agent:
            await wait_until(
                lambda: agent.session.last_error and "refused" in agent.session.last_error,
                what="a refusal",
            )
            assert (
                "Not authorized" in (agent.session.last_error or "")
                or "auth" in (agent.session.last_error or "").lower()
            )
            assert not agent.session.connected.is_set()
            # still alive: the reconciler and dispatcher tasks run
            assert agent.reconciler.runs >= 0
            assert agent._task is not None
            assert not agent._task.done()
    finally:
        secure.stop()


def _demo_story(out: str) -> None:
    """What every run of the demo tells (asserted on its output)."""
    import re

    assert "6 simulated devices sim-0001...sim-0006 online" in out
    assert re.search(r"the console: http://127\.0\.0\.1:\d+/console/\n", out), out
    assert re.search(r"sign in with the token  eat_\S+", out), out
    assert "artifacts: counter-1.0.0, counter-1.1.0" in out
    # The phased deployment: half the fleet first, then all of it, converged.
    assert "phase 1: 3 devices, started at once" in out
    assert re.search(r"phase 2: 3 devices, started 20\S+Z", out), out
    assert 'finished: {"success": 6}' in out
    # The command's response, matched by the server to the command it sent.
    assert re.search(r'"result": \{"count": \d+, "command": "counter.get"\}', out), out
    # The second deployment, aborted in its first phase; the device's events show it.
    assert "status: finished, aborted: True" in out
    assert 'statistics: {"aborted": 6}' in out
    assert re.search(r"counter 1\.1\.0 aborted deployment \S+ aborted; reverted", out), out
    assert "counter 1.1.0 installing" in out


def test_demo_command_converges(tmp_path: Path) -> None:
    """The README's demonstration runs end to end, tells its story, finishes by
    itself and removes what it made."""
    # Its own temporary directory: another demo may run meanwhile (the tests run in
    # parallel), and what it leaves behind must be this one's.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "agent", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "demo finished" in out
    _demo_story(out)
    assert "--keep" not in out
    assert list(tmp.iterdir()) == []


def _signs_in_to_the_console(url: str, token: str) -> None:
    """The printed console URL and token sign in (the page contract's form#login,
    its hidden csrf), and the fleet page lists the demo's devices."""
    import re

    import httpx

    with httpx.Client(base_url=url, timeout=10, follow_redirects=True) as c:
        page = c.get("/console/login")
        assert page.status_code == 200
        assert 'id="login"' in page.text
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        csrf = found.group(1) if found else ""
        fleet = c.post("/console/login", data={"token": token, "csrf": csrf})
        assert fleet.status_code == 200, fleet.text
        assert str(fleet.url).endswith("/console/")
        for n in range(1, 7):
            assert f'data-device-id="sim-{n:04d}"' in fleet.text


@pytest.mark.timeout(240)  # (up to 120 s to come up, 60 to stop and say why)
def test_demo_keep_stays_up_until_ctrl_c(tmp_path: Path) -> None:
    """With --keep the server stays up (the token signs in to its API), until
    SIGINT; then everything is removed."""
    import re

    import httpx

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        # (-X faulthandler: a SIGABRT below prints every thread's stack, should it hang)
        [sys.executable, "-X", "faulthandler", "-m", "agent", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "press Ctrl-C" in out, out
        _demo_story(out)
        url = re.findall(r"the console: (http://\S+)/console/", out)[-1]
        token = re.findall(r"sign in with the token  (\S+)", out)[-1]
        time.sleep(1.0)  # still up a moment later
        r = httpx.get(
            f"{url}/api/management/v1/deployments/deployments",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        assert len(r.json()) == 2
        assert (
            httpx.get(f"{url}/api/management/v1/deployments/deployments", timeout=10).status_code
            == 401
        )
        _signs_in_to_the_console(url, token)
        proc.send_signal(signal.SIGINT)
        try:
            rest, err = proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # (its threads' stacks, then it ends)
            rest, err = proc.communicate(timeout=15)
            pytest.fail(f"the demo did not stop within 45 s of SIGINT:\n{rest}\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, rest + err
    assert "demo finished" in rest
    assert list(tmp.iterdir()) == []


async def test_kill_9_while_offline_loses_nothing_from_the_outbox(
    tmp_path: Path, broker: Broker, operator: Operator, agent_proc: AgentProcess
) -> None:
    """A flow publishes a sequence every 50 ms; the broker stops; the agent is killed
    with SIGKILL while offline and started again; the broker returns: every number
    arrives (first arrivals in order, no gap)."""
    import sqlite3

    from test_outbox import durable_operator, first_seen

    watcher, got = durable_operator(broker, "kill9-watcher")
    try:
        operator.subscribe("edge/dev1/#")
        agent_proc.start()
        data = wat.echo_flow()
        (tmp_path / "echo.wasm").write_bytes(data)
        operator.publish(
            DESIRED,
            {
                "generation": 1,
                "flows": {
                    "f1": {
                        "version": "v1",
                        "triggers": [{"type": "interval", "ms": 50}],
                        "artifact": {
                            "url": (tmp_path / "echo.wasm").as_uri(),
                            "sha256": wat.sha256(data),
                        },
                    }
                },
            },
        )
        await wait_until(lambda: len(got) >= 3, 20, "messages while online")
        broker.stop()
        db = tmp_path / "state" / "outbox.sqlite3"

        def queued() -> int:
            with contextlib.closing(sqlite3.connect(db)) as con:
                return int(con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

        await wait_until(lambda: queued() >= 20, 20, "an outbox filling while offline")
        agent_proc.signal(signal.SIGKILL)
        assert agent_proc.wait() == -signal.SIGKILL
        left = queued()
        assert left >= 20  # committed rows survived the kill
        agent_proc.start()
        broker.start()
        await wait_until(lambda: len(first_seen(got)) >= 3 + left, 30, "the backlog delivered")
        numbers = first_seen(got)
        assert numbers == list(range(1, len(numbers) + 1)), numbers
    finally:
        watcher.loop_stop()
        watcher.disconnect()
