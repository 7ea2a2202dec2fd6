"""The fleet tool against a real Mosquitto and real agents (a simulated fleet).

Every ``edge-agent fleet`` subcommand runs in-process through the CLI's ``main`` on a
worker thread (it is synchronous; the agents run on the test's event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import wat
from broker import Broker
from common import COUNTER_WASM, MakeConfig, wait_until

from agent import cli
from agent.device.config import AgentConfig
from agent.fleet.controller import (
    Device,
    FleetClient,
    FleetError,
    failure_limit,
    flow_status,
    outcome,
    phase_sizes,
)
from agent.fleet.sim import Simulation

COUNTER = COUNTER_WASM
COUNTER_MANIFEST = {
    "triggers": [
        {"type": "command", "command": "counter.get"},
        {"type": "interval", "name": "tick", "ms": 100},
    ]
}

_stdout_lock = threading.Lock()


async def fleet(broker: Broker, *argv: str) -> tuple[int, str]:
    """Run ``edge-agent fleet ARGV --broker <test broker>``; (exit status, stdout)."""

    def run() -> tuple[int, str]:
        out = io.StringIO()
        with _stdout_lock, contextlib.redirect_stdout(out):
            rc = cli.main(["fleet", *argv, "--broker", broker.url])
        return rc, out.getvalue()

    return await asyncio.to_thread(run)


async def fleet_json(broker: Broker, *argv: str) -> Any:
    rc, out = await fleet(broker, *argv)
    assert rc == 0, out
    return json.loads(out)


async def rows(broker: Broker, *argv: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await fleet_json(broker, "get", "--json", *argv))["items"]
    return items


async def converged(
    broker: Broker, want: Callable[[list[dict[str, Any]]], bool], *argv: str, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Poll ``fleet get --json`` until ``want(rows)``."""
    last: list[dict[str, Any]] = []

    async def check() -> bool:
        nonlocal last
        last = await rows(broker, *argv)
        return want(last)

    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"fleet did not converge: {json.dumps(last, indent=1)}")
        await asyncio.sleep(0.2)
    return last


def by_device(items: list[dict[str, Any]], flow: str) -> dict[str, dict[str, Any]]:
    return {r["deviceId"]: r for r in items if r["flowId"] == flow}


@pytest.fixture
def files(tmp_path: Path) -> Path:
    d = tmp_path / "files"
    d.mkdir()
    (d / "counter.json").write_text(json.dumps(COUNTER_MANIFEST))
    (d / "v1.wasm").write_bytes(wat.reactor("v1"))
    (d / "v2.wasm").write_bytes(wat.reactor("v2"))
    (d / "big.wasm").write_bytes(wat.big_memory(32))  # 2 MiB minimum memory
    return d


SimFactory = Callable[..., Any]


@pytest.fixture
async def sim(make_config: MakeConfig, tmp_path: Path) -> AsyncIterator[SimFactory]:
    """Start a simulated fleet (real agents sharing one runtime); stopped at the end."""
    sims: list[Simulation] = []

    async def start(
        n: int,
        customize: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None,
        base: AgentConfig | None = None,
    ) -> Simulation:
        s = Simulation(
            base or make_config("sim"), n, tmp_path / f"sim{len(sims)}", customize=customize
        )
        await s.__aenter__()
        sims.append(s)
        assert await s.wait_connected(20) == n
        return s

    yield start
    for s in sims:
        await s.__aexit__(None, None, None)


# ------------------------------------------------------------------ pure parts
@pytest.mark.parametrize(
    ("phases", "total", "sizes"),
    [
        (["10%", "50%", "100%"], 10, [1, 5, 10]),
        (["10%", "100%"], 3, [1, 3]),  # at least one device in a phase
        (["1", "2", "100%"], 4, [1, 2, 4]),  # counts and percentages mix
        (["50%", "60%", "100%"], 2, [1, 2]),  # phases that round to the same size merge
        (["100%"], 1, [1]),
    ],
)
def test_phase_sizes(phases: list[str], total: int, sizes: list[int]) -> None:
    assert phase_sizes(phases, total) == sizes


@pytest.mark.parametrize(
    ("phases", "error"),
    [
        (["50%"], "last phase must cover every device"),
        (["50%", "10%", "100%"], "cumulative"),
        (["abc", "100%"], "expected a percentage"),
        (["0%", "100%"], "expected a percentage"),
        (["150%"], "expected a percentage"),
    ],
)
def test_phase_sizes_errors(phases: list[str], error: str) -> None:
    with pytest.raises(FleetError, match=error):
        phase_sizes(phases, 10)


@pytest.mark.parametrize(
    ("spec", "total", "limit"),
    [("0", 10, 0), ("3", 10, 3), ("5%", 100, 5), ("5%", 10, 0), ("25%", 4, 1)],
)
def test_failure_limit(spec: str, total: int, limit: int) -> None:
    assert failure_limit(spec, total) == limit


def _dev(gen: int, state_gen: int, status: str | None, **flow: Any) -> Device:
    desired = {"generation": gen, "flows": {"f": {"version": "v2"}}}
    state = {"generation": state_gen, "flows": {"f": {"status": status, **flow}} if status else {}}
    return Device("d", desired=desired, state=state)


@pytest.mark.parametrize(
    ("dev", "status", "result"),
    [
        (_dev(3, 2, "success"), "pending", "waiting"),  # not yet seen: old status ignored
        (_dev(3, 3, "success"), "success", "ok"),
        (_dev(3, 3, "success", health={"state": "healthy"}), "success", "ok"),
        (  # still in its health window: it may yet fail and revert
            _dev(3, 3, "success", health={"state": "probation", "until": "…"}),
            "success",
            "waiting",
        ),
        (_dev(3, 3, "failure", reverted=True, retryAt=None), "failure", "failed"),
        (_dev(3, 4, "already-installed"), "already-installed", "ok"),
        (_dev(3, 3, "downloading"), "downloading", "waiting"),
        (_dev(3, 3, "failure", retryAt="2026-11-21T00:00:00Z"), "failure", "waiting"),  # retrying
        (_dev(3, 3, "failure", retryAt=None), "failure", "failed"),
        (_dev(3, 3, "aborted"), "aborted", "failed"),
        (_dev(3, 3, "noartifact"), "noartifact", "skipped"),
        (_dev(3, 3, None), "pending", "waiting"),
        (
            Device(
                "d",
                desired={"generation": 3, "flows": {"f": {"version": "v2"}}},
                state={"generation": 2, "rejected": {"generation": 3, "reason": "x"}},
            ),
            "failure",
            "failed",
        ),  # the agent refused the document
    ],
)
def test_flow_status_and_rollout_outcome(dev: Device, status: str, result: str) -> None:
    assert flow_status(dev, "f") == status
    assert outcome(dev, "f") == result


# ------------------------------------------------------------------ against real agents
async def test_release_get_filters_sort_paging_and_stats(
    broker: Broker, sim: SimFactory, files: Path
) -> None:
    await sim(3)
    rc, out = await fleet(
        broker,
        "release",
        "--flow",
        "counter",
        "--version",
        "1.0.0",
        "--artifact",
        str(COUNTER),
        "--manifest",
        str(files / "counter.json"),
        "--device",
        "sim-0001",
        "--device",
        "sim-0002",
        "--deployment-id",
        "dep-counter-1",
    )
    assert rc == 0, out
    assert "deployment dep-counter-1: 2 device(s)" in out
    rc, out = await fleet(
        broker,
        "release",
        "--flow",
        "hello",
        "--version",
        "v1",
        "--artifact",
        str(files / "v1.wasm"),
        "--all",
    )
    assert rc == 0, out
    items = await converged(
        broker, lambda rs: len(rs) == 5 and all(r["status"] == "success" for r in rs)
    )
    assert {
        (r["deviceId"], r["flowId"], r["desiredVersion"], r["currentVersion"]) for r in items
    } == {
        ("sim-0001", "counter", "1.0.0", "1.0.0"),
        ("sim-0002", "counter", "1.0.0", "1.0.0"),
        ("sim-0001", "hello", "v1", "v1"),
        ("sim-0002", "hello", "v1", "v1"),
        ("sim-0003", "hello", "v1", "v1"),
    }
    assert all(r["online"] and r["lastUpdated"] for r in items)

    # filters, sorting, paging (the order of Losant's "get edge deployments")
    assert [r["deviceId"] for r in await rows(broker, "--flow", "counter")] == [
        "sim-0001",
        "sim-0002",
    ]
    assert [(r["deviceId"], r["flowId"]) for r in await rows(broker, "--device", "sim-0002")] == [
        ("sim-0002", "counter"),
        ("sim-0002", "hello"),
    ]
    two = await rows(broker, "--device", "sim-0001", "--device", "sim-0003")
    assert {r["deviceId"] for r in two} == {"sim-0001", "sim-0003"}  # both, not the last
    assert {r["flowId"] for r in await rows(broker, "--version", "1.0.0")} == {"counter"}
    desc = await rows(broker, "--sort-field", "deviceId", "--sort-direction", "desc")
    assert [r["deviceId"] for r in desc] == [
        "sim-0003",
        "sim-0002",
        "sim-0002",
        "sim-0001",
        "sim-0001",
    ]
    page = await fleet_json(broker, "get", "--json", "--per-page", "2", "--page", "1")
    assert page["count"] == 2
    assert page["totalCount"] == 5
    assert [(r["deviceId"], r["flowId"]) for r in page["items"]] == [
        ("sim-0002", "counter"),
        ("sim-0002", "hello"),
    ]
    by_version = await rows(broker, "--sort-field", "desiredVersion")
    assert [r["desiredVersion"] for r in by_version] == ["1.0.0", "1.0.0", "v1", "v1", "v1"]

    stats = await fleet_json(broker, "stats", "--deployment", "dep-counter-1")
    assert stats["success"] == 2
    assert sum(stats.values()) == 2
    assert set(stats) >= {
        "pending",
        "downloading",
        "installing",
        "success",
        "failure",
        "already-installed",
        "noartifact",
        "aborted",
    }
    assert (await fleet_json(broker, "stats", "--flow", "hello", "--version", "v1"))["success"] == 3

    rc, table = await fleet(broker, "get", "--flow", "counter")
    assert rc == 0
    for word in (
        "deviceId",
        "desiredVersion",
        "currentVersion",
        "status",
        "online",
        "sim-0001",
        "1.0.0",
        "success",
        "2 of 2 flow deployments",
    ):
        assert word in table

    # a command to the flows, answered through edge.respond
    rc, out = await fleet(broker, "command", "--device", "sim-0001", "--name", "counter.get")
    assert rc == 0, out
    answer = json.loads(out.split(": ", 1)[1])
    assert answer["flows"]["counter"]["result"]["command"] == "counter.get"
    assert answer["flows"]["counter"]["result"]["count"] >= 0


async def test_blank_version_replace_and_remove(
    broker: Broker, sim: SimFactory, files: Path
) -> None:
    await sim(3)
    await fleet(
        broker,
        "release",
        "--flow",
        "hello",
        "--version",
        "v1",
        "--artifact",
        str(files / "v1.wasm"),
        "--device",
        "sim-0001",
        "--device",
        "sim-0002",
    )
    await fleet(
        broker,
        "release",
        "--flow",
        "hello",
        "--version",
        "v2",
        "--artifact",
        str(files / "v2.wasm"),
        "--device",
        "sim-0003",
    )
    await fleet(
        broker,
        "release",
        "--flow",
        "other",
        "--version",
        "v1",
        "--artifact",
        str(files / "v1.wasm"),
        "--device",
        "sim-0001",
    )
    await converged(broker, lambda rs: len(rs) == 4 and all(r["status"] == "success" for r in rs))

    # replace v1 -> v2 touches only the devices on v1
    rc, out = await fleet(
        broker,
        "replace",
        "--flow",
        "hello",
        "--old-version",
        "v1",
        "--new-version",
        "v2",
        "--artifact",
        str(files / "v2.wasm"),
    )
    assert rc == 0, out
    assert "2 device(s) changed" in out
    items = await converged(
        broker,
        lambda rs: all(
            r["currentVersion"] == "v2" and r["status"] == "success"
            for r in rs
            if r["flowId"] == "hello"
        ),
    )
    assert {d: r["desiredVersion"] for d, r in by_device(items, "hello").items()} == {
        "sim-0001": "v2",
        "sim-0002": "v2",
        "sim-0003": "v2",
    }

    # a blank version is a removal (Losant's release semantics)
    rc, out = await fleet(
        broker, "release", "--flow", "hello", "--version", "", "--device", "sim-0002"
    )
    assert rc == 0, out
    items = await converged(
        broker, lambda rs: by_device(rs, "hello")["sim-0002"]["status"] == "removed"
    )
    assert by_device(items, "hello")["sim-0002"]["currentVersion"] is None
    # --filter-empty leaves out a row with neither a desired nor a current version
    assert "sim-0002" not in by_device(await rows(broker, "--filter-empty"), "hello")

    # remove: one flow from every device ...
    rc, out = await fleet(broker, "remove", "--flow", "hello")
    assert rc == 0, out
    assert "2 device(s) changed" in out  # sim-0002 had it removed already
    await converged(
        broker, lambda rs: all(r["status"] == "removed" for r in rs if r["flowId"] == "hello")
    )
    # ... and every flow from one device
    rc, out = await fleet(broker, "remove", "--device", "sim-0001")
    assert rc == 0, out
    items = await converged(
        broker, lambda rs: all(r["status"] == "removed" for r in rs if r["deviceId"] == "sim-0001")
    )
    assert not any(r["currentVersion"] for r in items)
    rc, _ = await fleet(broker, "remove")
    assert rc == 1  # neither --flow nor --device


async def test_rollout_stops_at_the_failure_threshold_and_rolls_back(
    broker: Broker, sim: SimFactory, files: Path
) -> None:
    """sim-0002 cannot run v2 (its memory cap is below v2's minimum memory): the second
    phase fails, the rollout stops before phase 3, and sim-0002 gets v1 back."""

    def small_memory(index: int, data: dict[str, Any]) -> dict[str, Any]:
        if index == 2:
            data["sandbox"] = {**data["sandbox"], "memory_limit": 1 << 20}
        return data

    await sim(4, small_memory)
    rc, out = await fleet(
        broker,
        "rollout",
        "--health-window",
        "0.3",
        "--flow",
        "app",
        "--version",
        "v1",
        "--artifact",
        str(files / "v1.wasm"),
        "--phase",
        "50%",
        "--phase",
        "100%",
    )
    assert rc == 0, out
    assert "complete: 4 device(s) succeeded" in out
    assert "phase 2/2" in out

    rc, out = await fleet(
        broker,
        "rollout",
        "--health-window",
        "0.3",
        "--flow",
        "app",
        "--version",
        "v2",
        "--artifact",
        str(files / "big.wasm"),
        "--retries",
        "0",
        "--deployment-id",
        "app-v2",
        "--phase",
        "25%",
        "--phase",
        "50%",
        "--phase",
        "100%",
        "--max-failures",
        "0",
        "--wait-timeout",
        "30s",
        "--rollback",
    )
    assert rc == 2, out
    assert "stopped after phase 2" in out
    assert "not started: 2 (sim-0003, sim-0004)" in out
    assert "rolled back: 1 (sim-0002)" in out

    items = await converged(
        broker,
        lambda rs: (
            by_device(rs, "app")["sim-0002"]["desiredVersion"] == "v1"
            and by_device(rs, "app")["sim-0002"]["status"] in ("success", "already-installed")
        ),
    )
    app = by_device(items, "app")
    assert (app["sim-0001"]["desiredVersion"], app["sim-0001"]["currentVersion"]) == ("v2", "v2")
    assert app["sim-0002"]["currentVersion"] == "v1"  # v1 kept running throughout
    assert app["sim-0002"]["deploymentId"] == "app-v2-rollback"
    for untouched in ("sim-0003", "sim-0004"):
        assert (app[untouched]["desiredVersion"], app[untouched]["status"]) == ("v1", "success")
    assert (await fleet_json(broker, "stats", "--deployment", "app-v2"))["success"] == 1

    # the failed attempt's deployment log, as the device published it
    rc, out = await fleet(broker, "logs", "--device", "sim-0002", "--deployment", "app-v2")
    assert rc == 0, out
    assert "deployment app-v2, attempt 1" in out
    assert "memory" in out.lower()


async def test_signatures_required_invalid_and_rotated_keys(
    broker: Broker, sim: SimFactory, files: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    for name in ("old", "new"):
        assert await asyncio.to_thread(cli.main, ["fleet", "sign", "keygen", str(keys / name)]) == 0
    assert oct((keys / "old.key").stat().st_mode & 0o777) == "0o600"

    def trust(index: int, data: dict[str, Any]) -> dict[str, Any]:
        chosen = {1: ["old.pub"], 2: ["old.pub", "new.pub"], 3: []}[index]
        data["artifacts"] = {
            **data["artifacts"],
            "trusted_keys": [str(keys / k) for k in chosen],
            "require_signature": bool(chosen),
        }
        return data

    await sim(3, trust)

    async def release(version: str, *extra: str) -> dict[str, dict[str, Any]]:
        rc, out = await fleet(
            broker,
            "release",
            "--flow",
            "s",
            "--version",
            version,
            "--artifact",
            str(files / f"{version}.wasm"),
            "--all",
            "--retries",
            "0",
            *extra,
        )
        assert rc == 0, out
        return by_device(
            await converged(
                broker,
                lambda rs: len(rs) == 3 and all(r["status"] in ("success", "failure") for r in rs),
            ),
            "s",
        )

    unsigned = await release("v1")
    assert {d: r["status"] for d, r in unsigned.items()} == {
        "sim-0001": "failure",
        "sim-0002": "failure",
        "sim-0003": "success",
    }
    assert "not signed" in unsigned["sim-0001"]["error"]

    # signed with the new key: only devices that trust it (rotation: old + new) accept it
    signed = await release("v2", "--sign", str(keys / "new.key"))
    assert {d: r["status"] for d, r in signed.items()} == {
        "sim-0001": "failure",
        "sim-0002": "success",
        "sim-0003": "success",
    }
    assert "unknown key" in signed["sim-0001"]["error"]
    assert signed["sim-0002"]["currentVersion"] == "v2"

    # signed with the old key: sim-0001 accepts it too
    (files / "v3.wasm").write_bytes(wat.reactor("v3"))
    old = await release("v3", "--sign", str(keys / "old.key"))
    assert {r["status"] for r in old.values()} == {"success"}

    # a signature that belongs to other bytes is refused by every device that checks
    (files / "v4.wasm").write_bytes(wat.reactor("v4"))
    assert (
        await asyncio.to_thread(
            cli.main,
            ["fleet", "sign", "artifact", str(files / "v1.wasm"), "--key", str(keys / "old.key")],
        )
        == 0
    )
    client = await asyncio.to_thread(FleetClient, _mqtt(broker))
    try:
        await asyncio.to_thread(client.settle)
        art = await asyncio.to_thread(
            client.publish_artifact, (files / "v4.wasm").read_bytes(), 1 << 20
        )
        entry = {
            "version": "v4",
            "artifact": {
                **art.entry(),
                "signature": _sig(keys / "old.key", wat.sha256((files / "v1.wasm").read_bytes())),
            },
        }
        await asyncio.to_thread(
            client.update_many,
            ["sim-0001", "sim-0002", "sim-0003"],
            lambda _d, doc: {**doc, "flows": {"s": entry}},
        )
    finally:
        await asyncio.to_thread(client.close)
    forged = by_device(
        await converged(
            broker,
            lambda rs: all(
                r["desiredVersion"] == "v4" and r["status"] in ("success", "failure") for r in rs
            ),
        ),
        "s",
    )
    assert {d: r["status"] for d, r in forged.items()} == {
        "sim-0001": "failure",
        "sim-0002": "failure",
        "sim-0003": "success",
    }
    assert "does not verify" in forged["sim-0001"]["error"]
    assert forged["sim-0001"]["currentVersion"] == "v3"  # the running version keeps running


def _mqtt(broker: Broker) -> Any:
    from agent.device.config import MqttConfig

    return MqttConfig(broker=broker.url)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_the_tool_leaves_no_session_on_the_broker(broker: Broker, protocol: str) -> None:
    """The tool connects with the agent's [mqtt] settings, which ask for a persistent
    session; its own must end with it (a session per run would pile up on the broker,
    on NATS as JetStream consumers). A client that resumes its client id finds none."""
    from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, Client, MQTTv5, MQTTv311
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.device.config import MqttConfig

    cfg = MqttConfig(broker=broker.url, protocol=protocol)
    assert cfg.persistent_session
    tool = await asyncio.to_thread(FleetClient, cfg, "op-session")
    await asyncio.to_thread(tool.close)

    def session_present() -> bool:
        found: list[bool] = []
        done = threading.Event()
        v5 = protocol == "5"
        probe = Client(
            CallbackAPIVersion.VERSION2,
            client_id="op-session",
            protocol=MQTTv5 if v5 else MQTTv311,
            clean_session=None if v5 else False,
        )

        def on_connect(_c: Any, _u: Any, flags: Any, _rc: Any, _p: Any) -> None:
            found.append(bool(flags.session_present))
            done.set()

        probe.on_connect = on_connect
        probe.connect(
            "127.0.0.1", broker.port, clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY
        )
        probe.loop_start()
        try:
            assert done.wait(5), "no CONNACK"
        finally:
            probe.disconnect()
            probe.loop_stop()
        return found[0]

    assert not await asyncio.to_thread(session_present)


def _sig(key: Path, sha: str) -> dict[str, str]:
    from agent.wire.signing import load_private_key, sign

    return sign(load_private_key(key), sha).model_dump(by_alias=True)


async def test_key_rotation_by_reload(
    make_config: MakeConfig, broker: Broker, sim: SimFactory, files: Path, tmp_path: Path
) -> None:
    """A device that does not trust the new key yet refuses its artifact; once the new
    key is added (SIGHUP reload), the same desired document is judged again and installs."""
    keys = tmp_path / "keys"
    for name in ("old", "new"):
        await asyncio.to_thread(cli.main, ["fleet", "sign", "keygen", str(keys / name)])
    base = make_config(
        "sim", artifacts={"trusted_keys": [str(keys / "old.pub")], "require_signature": True}
    )
    fleet_sim = await sim(1, base=base)
    await fleet(
        broker,
        "release",
        "--flow",
        "r",
        "--version",
        "v1",
        "--artifact",
        str(files / "v1.wasm"),
        "--all",
        "--retries",
        "0",
        "--sign",
        str(keys / "new.key"),
    )
    await converged(broker, lambda rs: rs and rs[0]["status"] == "failure")
    agent = fleet_sim.agents[0]
    rotated = agent.cfg.model_copy(
        update={
            "artifacts": agent.cfg.artifacts.model_copy(
                update={"trusted_keys": [keys / "old.pub", keys / "new.pub"]}
            )
        }
    )
    await agent.reload(rotated)
    items = await converged(broker, lambda rs: rs[0]["status"] == "success")
    assert items[0]["currentVersion"] == "v1"


async def test_concurrent_operators_lose_no_change(broker: Broker, sim: SimFactory) -> None:
    """Two operators change the same device's desired document at the same moment: the
    write that lost the race is detected by reading back, and applied again on top."""
    await sim(1)
    clients = [await asyncio.to_thread(FleetClient, _mqtt(broker), f"op{i}") for i in (1, 2)]
    calls = {"op1": 0, "op2": 0}
    try:
        for rnd in range(3):
            for c in clients:
                await asyncio.to_thread(c.settle)
            barrier = threading.Barrier(2)

            def write(
                c: FleetClient, name: str, rnd: int = rnd, barrier: threading.Barrier = barrier
            ) -> int | None:
                def change(_d: str, doc: dict[str, Any]) -> dict[str, Any]:
                    calls[name] += 1
                    return {
                        **doc,
                        "flows": {**doc.get("flows", {}), f"{name}-{rnd}": {"version": ""}},
                    }

                barrier.wait(5)
                return c.update_desired("sim-0001", change)

            gens = await asyncio.gather(
                *(asyncio.to_thread(write, c, f"op{i + 1}") for i, c in enumerate(clients))
            )
            assert all(g is not None for g in gens)
            await asyncio.to_thread(clients[0].settle)
            final = clients[0].devices()["sim-0001"].desired
            assert final is not None
            assert {f"op1-{rnd}", f"op2-{rnd}"} <= set(final["flows"]), final
            assert final["generation"] == max(g or 0 for g in gens)
        # at least one of the rounds was a real race that had to be retried
        assert calls["op1"] + calls["op2"] > 6, calls
    finally:
        for c in clients:
            await asyncio.to_thread(c.close)


async def test_errors_are_one_clear_line(
    broker: Broker, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def err(*argv: str, url: str | None = None) -> str:
        capsys.readouterr()
        args = ["fleet", *argv, "--broker", url or broker.url]
        rc = await asyncio.to_thread(cli.main, args)
        assert rc == 1
        return capsys.readouterr().err

    assert "cannot connect to mqtt://127.0.0.1:1" in await err("get", url="mqtt://127.0.0.1:1")
    assert "--artifact is required" in await err(
        "release", "--flow", "f", "--version", "v1", "--device", "d"
    )
    big = files / "large.bin"
    big.write_bytes(b"\0" * 2048)
    too_big = await err(
        "release",
        "--flow",
        "f",
        "--version",
        "v1",
        "--device",
        "d",
        "--artifact",
        str(big),
        "--mqtt-limit",
        "1024",
    )
    assert "over the 1024-byte limit" in too_big
    assert "serve it over HTTP" in too_big
    assert "invalid device id" in await err(
        "release", "--flow", "f", "--version", "", "--device", "a/b"
    )
    assert "last phase must cover" in await err(
        "rollout",
        "--health-window",
        "0.3",
        "--flow",
        "f",
        "--version",
        "v1",
        "--artifact",
        str(files / "v1.wasm"),
        "--device",
        "d",
        "--device",
        "e",
        "--phase",
        "40%",
    )
    assert "would be invalid: triggers" in await err(
        "release",
        "--flow",
        "f",
        "--version",
        "v1",
        "--device",
        "d",
        "--artifact",
        str(files / "v1.wasm"),
        "--manifest",
        str(_write(files / "m.json", {"triggers": [{"type": "x"}]})),
    )
    assert "cannot read" in await err(
        "release",
        "--flow",
        "f",
        "--version",
        "v1",
        "--device",
        "d",
        "--artifact",
        str(files / "missing.wasm"),
    )


def _write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


async def test_sim_command_runs_a_fleet(broker: Broker, tmp_path: Path) -> None:
    """``edge-agent sim`` as a process: N agents come online, report memory, stop cleanly."""
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "sim",
        "--devices",
        "3",
        "--broker",
        broker.url,
        "--state-root",
        str(tmp_path / "simstate"),
        "--duration",
        "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    client = await asyncio.to_thread(FleetClient, _mqtt(broker))
    try:
        await wait_until(
            lambda: sum(d.online for d in client.devices().values()) == 3,
            timeout=20,
            what="three simulated devices online",
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        text = out.decode()
        assert "3 agents (sim-0001...sim-0003)" in text
        assert "3 connected" in text
        assert "KiB per device" in text
        await wait_until(
            lambda: not any(d.online for d in client.devices().values()),
            what="offline after a clean stop",
        )
        assert sorted(p.name for p in (tmp_path / "simstate").iterdir()) == [
            "modules",
            "sim-0001",
            "sim-0002",
            "sim-0003",
        ]
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.to_thread(client.close)


def test_sim_raises_its_open_file_limit_and_warns_when_the_hard_limit_is_too_low() -> None:
    """Each agent keeps several files open; a default soft limit of 1024 would stop a
    few hundred agents half-way with EMFILE."""
    import resource
    import subprocess
    import sys

    probe = (
        "import resource; from agent.fleet.sim import raise_open_file_limit as r; "
        "print(r(10)); print(r(1000)); print(resource.getrlimit(resource.RLIMIT_NOFILE))"
    )

    def low_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))

    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=low_limits,
    ).stdout.splitlines()
    assert out[0] == "None"  # 10 agents fit in 2048
    assert "the open-file limit is 2048; 1000 agents need about" in out[1]
    assert out[2] == "(2048, 2048)"  # soft raised to hard


async def test_a_release_per_device_type_lands_in_one_entry(
    broker: Broker, sim: SimFactory, files: Path
) -> None:
    """Releasing one version for gw-a, then for gw-b: each type installs its own build
    and gw-a keeps its (before, the second release overwrote the entry and every gw-a
    device reported noartifact)."""
    types = {1: "gw-a", 2: "gw-b", 3: "gw-c"}  # (sim devices count from 1)
    s = await sim(3, customize=lambda i, data: {**data, "device_type": types[i]})
    for device_type, build in (("gw-a", "v1.wasm"), ("gw-b", "v2.wasm")):
        rc, out = await fleet(
            broker,
            "release",
            "--flow",
            "hello",
            "--version",
            "2.0",
            "--artifact",
            str(files / build),
            "--device-type",
            device_type,
            "--all",
        )
        assert rc == 0, out
    items = await converged(
        broker,
        lambda rs: (
            [r["status"] for r in sorted(rs, key=lambda r: r["deviceId"])]
            == ["already-installed", "success", "noartifact"]
            or [r["status"] for r in sorted(rs, key=lambda r: r["deviceId"])]
            == ["success", "success", "noartifact"]
        ),
        "--flow",
        "hello",
    )
    assert len(items) == 3
    digests = {a.cfg.device_type: a.reconciler.records["hello"].installed for a in s.agents}
    assert digests["gw-a"] is not None
    assert digests["gw-b"] is not None
    assert digests["gw-c"] is None
    assert digests["gw-a"].sha256 == hashlib.sha256((files / "v1.wasm").read_bytes()).hexdigest()
    assert digests["gw-b"].sha256 == hashlib.sha256((files / "v2.wasm").read_bytes()).hexdigest()


async def test_a_rollout_waits_for_the_health_window_and_stops_on_a_revert(
    broker: Broker, sim: SimFactory, files: Path
) -> None:
    """A version that runs and then traps in its health window: the first phase's
    device puts v1 back, the rollout counts it failed and never releases phase 2
    (without the gate it counted "running" as done and went on)."""
    (files / "good.wasm").write_bytes(wat.versioned_flow("v1"))
    (files / "breaks.wasm").write_bytes(wat.versioned_flow("v2", trap_from_tick=3))
    (files / "ticks.json").write_text(
        json.dumps({"triggers": [{"type": "interval", "name": "tick", "ms": 100}]})
    )
    await sim(2)
    common = ["--flow", "app", "--manifest", str(files / "ticks.json")]
    rc, out = await fleet(
        broker, "rollout", *common, "--version", "v1", "--artifact", str(files / "good.wasm"),
        "--health-window", "0.3", "--phase", "100%",
    )  # fmt: skip
    assert rc == 0, out
    rc, out = await fleet(
        broker, "rollout", *common, "--version", "v2", "--artifact", str(files / "breaks.wasm"),
        "--health-window", "5", "--phase", "50%", "--phase", "100%", "--wait-timeout", "20s",
    )  # fmt: skip
    assert rc == 2, out  # stopped by failures
    assert "phase 2/2" not in out
    deadline = time.monotonic() + 10  # (the verdict is reported before v1 runs again)
    while True:
        first, second = sorted(by_device(await rows(broker, "--flow", "app"), "app").items())
        if first[1]["currentVersion"] == "v1" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert (first[1]["status"], first[1]["currentVersion"]) == ("failure", "v1")
    assert "reverted to version v1" in first[1]["error"]
    assert second[1]["currentVersion"] == "v1"  # never released
    assert second[1]["desiredVersion"] == "v1"
