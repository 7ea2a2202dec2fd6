"""Agents and the fleet tool on a clustered broker: three NATS servers with MQTT.

The devices connect to node 1, the operators to nodes 2 and 3, so every desired
document, state report, command and response crosses the cluster, and the retained
messages the fleet tool reads are the cluster's (JetStream, replicated). NATS speaks
MQTT 3.1.1 only, so agents and operators use ``protocol = "3.1.1"``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from common import COUNTER_WASM, wait_until
from nats_cluster import NATS_SERVER, NatsCluster

from agent import cli
from agent.device.config import AgentConfig, MqttConfig
from agent.fleet.controller import FleetClient
from agent.fleet.sim import Simulation

pytestmark = pytest.mark.skipif(
    not Path(NATS_SERVER).exists(),
    reason="nats-server is not installed (Debian: apt-get install nats-server)",
)

COUNTER = COUNTER_WASM
DEVICES = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path_factory.mktemp("nats"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def env_311(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet CLI reads the protocol from the agent's environment variables."""
    monkeypatch.setenv("EDGE_AGENT_MQTT__PROTOCOL", "3.1.1")


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A topic prefix per test: the cluster (and its retained messages) is shared."""
    return f"t{abs(hash(request.node.name)) % 10**8}"


@pytest.fixture
async def fleet_sim(cluster: NatsCluster, tmp_path: Path, prefix: str) -> AsyncIterator[Simulation]:
    base = AgentConfig.model_validate(
        {
            "device_id": "sim",
            "state_dir": str(tmp_path / "unused"),
            "mqtt": {
                "broker": cluster.nodes[0].url,
                "protocol": "3.1.1",
                "keepalive": 5,
                "reconnect_min": 0.1,
                "reconnect_max": 1.0,
                "topic_prefix": prefix,
            },
            "reconcile": {"retry_backoff_initial": 0.2, "retry_backoff_max": 1.0},
        }
    )
    sim = Simulation(base, DEVICES, tmp_path / "sim")
    await sim.__aenter__()
    try:
        assert await sim.wait_connected(30) == DEVICES
        # Their birth messages have reached the operators' nodes (replication is not
        # instant, and `--all` means the devices the tool's node has seen).
        for node in cluster.nodes[1:]:
            client = await asyncio.to_thread(
                FleetClient,
                MqttConfig.model_validate(
                    {"broker": node.url, "protocol": "3.1.1", "topic_prefix": prefix}
                ),
            )
            try:
                await wait_until(
                    lambda c=client: (
                        sum(  # type: ignore[misc]
                            d.online for d in c.devices().values()
                        )
                        == DEVICES
                    ),
                    30,
                    f"the devices online as seen from {node.name}",
                )
            finally:
                await asyncio.to_thread(client.close)
        yield sim
    finally:
        await sim.__aexit__(None, None, None)


_stdout_lock = threading.Lock()


async def fleet(url: str, prefix: str, *argv: str) -> tuple[int, str]:
    def run() -> tuple[int, str]:
        out = io.StringIO()
        with _stdout_lock, contextlib.redirect_stdout(out):
            rc = cli.main(["fleet", *argv, "--broker", url, "--prefix", prefix])
        return rc, out.getvalue()

    return await asyncio.to_thread(run)


async def table(url: str, prefix: str) -> list[dict[str, Any]]:
    rc, out = await fleet(url, prefix, "get", "--json")
    assert rc == 0, out
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


@pytest.mark.usefixtures("env_311")
async def test_a_rollout_through_one_node_converges_devices_on_another(
    cluster: NatsCluster, fleet_sim: Simulation, tmp_path: Path, prefix: str
) -> None:
    _n1, n2, n3 = cluster.nodes
    manifest = tmp_path / "counter.json"
    manifest.write_text(json.dumps({"triggers": [{"type": "command", "command": "counter.get"}]}))
    rc, out = await fleet(
        n2.url,
        prefix,
        "rollout",
        "--health-window",
        "0.3",
        "--flow",
        "counter",
        "--version",
        "1.0.0",
        "--artifact",
        str(COUNTER),
        "--manifest",
        str(manifest),
        "--phase",
        "1",
        "--phase",
        "50%",
        "--phase",
        "100%",
        "--wait-timeout",
        "60s",
    )
    assert rc == 0, out
    assert f"complete: {DEVICES} device(s) succeeded" in out
    # Read back through the third node: the retained state is the cluster's.
    items = await table(n3.url, prefix)
    assert [(r["deviceId"], r["currentVersion"], r["status"], r["online"]) for r in items] == [
        (f"sim-{i:04d}", "1.0.0", "success", True) for i in range(1, DEVICES + 1)
    ]
    rc, out = await fleet(n3.url, prefix, "stats", "--flow", "counter", "--version", "1.0.0")
    assert json.loads(out)["success"] == DEVICES
    # A command and its response cross the cluster both ways.
    rc, out = await fleet(
        n3.url, prefix, "command", "--device", "sim-0004", "--name", "counter.get"
    )
    assert rc == 0, out
    assert out.startswith("sim-0004: {")
    assert '"ok": true' in out


async def test_operators_on_two_nodes_lose_no_change(
    cluster: NatsCluster, fleet_sim: Simulation, prefix: str
) -> None:
    """Two operators, connected to different nodes, change the same device's desired
    document at the same moment: each detects a lost write by reading back and applies
    its change again, so both changes land, whichever node's order won."""
    urls = [cluster.nodes[1].url, cluster.nodes[2].url]
    configs = [
        MqttConfig.model_validate({"broker": u, "protocol": "3.1.1", "topic_prefix": prefix})
        for u in urls
    ]
    clients = [
        await asyncio.to_thread(FleetClient, cfg, f"racer{i}") for i, cfg in enumerate(configs)
    ]
    calls = collections.Counter[int]()
    try:
        for rnd in range(5):
            for c in clients:
                await asyncio.to_thread(c.settle)
            barrier = threading.Barrier(2)

            def write(i: int, rnd: int = rnd, barrier: threading.Barrier = barrier) -> int | None:
                def change(_d: str, current: dict[str, Any]) -> dict[str, Any]:
                    calls[i] += 1
                    return {
                        **current,
                        "flows": {**current.get("flows", {}), f"op{i}-{rnd}": {"version": ""}},
                    }

                barrier.wait(5)
                return clients[i].update_desired("sim-0006", change)

            gens = await asyncio.gather(*(asyncio.to_thread(write, i) for i in (0, 1)))
            assert all(g is not None for g in gens)

            def final(c: FleetClient) -> dict[str, Any] | None:
                c.settle()
                return c.devices()["sim-0006"].desired

            docs = [await asyncio.to_thread(final, c) for c in clients]
            for doc in docs:
                assert doc is not None
                assert {f"op0-{rnd}", f"op1-{rnd}"} <= set(doc["flows"]), doc
            assert docs[0] == docs[1]  # both nodes hold the same retained document
        assert sum(calls.values()) > 10, calls  # some writes really raced and were redone
    finally:
        for c in clients:
            await asyncio.to_thread(c.close)


@pytest.mark.usefixtures("env_311")
@pytest.mark.timeout(240)  # a failover of NATS 2.9's JetStream takes its time
async def test_the_devices_node_dies_and_comes_back(
    cluster: NatsCluster, fleet_sim: Simulation, prefix: str, tmp_path: Path
) -> None:
    """kill -9 of the node the devices use. The cluster keeps every retained document
    (but publishes no last wills: the node that held them is gone, see scaling.md). A
    device that starts meanwhile on another node (where, depending on timing, NATS
    delays its CONNACK or refuses its subscriptions while it cannot place the
    three-replica consumers) converges once the cluster is whole, and so do the others,
    on a release made while they were cut off."""
    n1, n2, n3 = cluster.nodes
    everyone = {f"sim-{i:04d}" for i in range(1, DEVICES + 2)}
    rc, out = await fleet(
        n2.url,
        prefix,
        "release",
        "--flow",
        "hello",
        "--version",
        "v1",
        "--artifact",
        str(COUNTER),
        "--all",
    )
    assert rc == 0, out

    async def rows_where(urls: list[str], pred: Any, count: int = DEVICES) -> list[dict[str, Any]]:
        """Poll ``fleet get`` through each of ``urls`` in turn until every row satisfies
        ``pred``. While the cluster fails over, a read can be refused: that is retried
        too. After a node loss, nats-server 2.9's per-node cache of retained messages
        was seen (rarely) to keep an older desired document and status for a minute
        and more on one surviving node while the other served the new ones (see
        docs/scaling.md): the device side is what is checked, through any node."""
        last: list[dict[str, Any]] | str = []
        turn = 0

        async def check() -> bool:
            nonlocal last, turn
            url = urls[turn % len(urls)]
            turn += 1
            rc, out = await fleet(url, prefix, "get", "--json")
            if rc != 0:
                last = out
                return False
            last = json.loads(out)["items"]
            return len(last) == count and all(pred(r) for r in last)

        deadline = asyncio.get_running_loop().time() + 60
        while not await check():
            assert asyncio.get_running_loop().time() < deadline, json.dumps(last, indent=1)
            await asyncio.sleep(0.5)
        assert isinstance(last, list)
        return last

    await rows_where([n3.url], lambda r: r["status"] == "success")
    late_cfg = fleet_sim.base.model_copy(
        update={"mqtt": fleet_sim.base.mqtt.model_copy(update={"broker": n2.url})}
    )
    late = Simulation(late_cfg, 1, tmp_path / "late", first=DEVICES + 1)
    n1.kill()
    try:
        await wait_until(
            lambda: not any(a.session.connected.is_set() for a in fleet_sim.agents),
            30,
            "devices cut off",
        )
        await late.__aenter__()
        # Released while the devices cannot be reached, to the first six and the late
        # one. While the cluster re-forms it may not acknowledge: the operator retries.
        devices = [a for d in sorted(everyone) for a in ("--device", d)]
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            rc, out = await fleet(
                n2.url,
                prefix,
                "release",
                "--flow",
                "hello",
                "--version",
                "v2",
                "--artifact",
                str(COUNTER),
                *devices,
            )
            if rc == 0 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(1)
        assert rc == 0, out
    finally:
        n1.start()
        await asyncio.to_thread(NatsCluster.wait_ready, [n1])
    try:
        # (A release retried during the failover may have landed twice: the second is
        # then "already-installed".)
        # (Not `online`: nats-server 2.9 was seen in CI to lose the retained birth of
        # the device that connected during the failover, with no message delivered
        # that the device could answer; its status then says offline until its next
        # reconnect, see docs/scaling.md. That every device is connected is checked
        # on the devices themselves.)
        items = await rows_where(
            [n3.url, n2.url],
            lambda r: (
                r["currentVersion"] == "v2" and r["status"] in ("success", "already-installed")
            ),
            DEVICES + 1,
        )
        assert {r["deviceId"] for r in items} == everyone
        await wait_until(
            lambda: all(a.session.connected.is_set() for a in [*fleet_sim.agents, *late.agents]),
            30,
            "every device connected",
        )
    finally:
        await late.__aexit__(None, None, None)


async def test_an_mqtt5_agent_is_told_to_use_3_1_1(cluster: NatsCluster) -> None:
    """NATS refuses an MQTT 5 CONNECT; the agent says which setting fixes it."""
    from agent.device.mqtt import MqttSession

    conf = MqttConfig.model_validate(
        {"broker": cluster.nodes[0].url, "reconnect_min": 0.1, "reconnect_max": 0.5}
    )
    async with MqttSession(conf, "v5-client") as session:
        await wait_until(lambda: session.last_error is not None, 10, "the refusal")
        assert "refused the connection: Unsupported protocol version" in (session.last_error or "")
        assert 'mqtt.protocol = "3.1.1"' in (session.last_error or "")
        assert not session.connected.is_set()
