"""The offline outbox: unit behaviour, and an outage with a restart in the middle."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import wat
from artifact_server import ArtifactServer
from broker import Broker, Operator
from common import wait_until
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from scenario import DESIRED, STATE, flow, flow_state

from agent.device.daemon import Agent
from agent.device.outbox import Outbox, OutboxLimits


def test_fifo_ack_and_persistence(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    for i in range(5):
        box.put("t", str(i).encode())
    assert [r.payload for r in box.peek(3)] == [b"0", b"1", b"2"]
    box.ack([r.seq for r in box.peek(2)])
    assert (box.count, box.sent) == (3, 2)
    box.close()
    again = Outbox(tmp_path / "o.db")  # a restart keeps what was not acknowledged
    assert [r.payload for r in again.peek(10)] == [b"2", b"3", b"4"]
    assert again.count == 3
    assert again.bytes == 3


def test_coalesced_messages_keep_only_the_latest_at_the_end(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.put("state", b"s1", retain=True, coalesce="state")
    box.put("events", b"e1")
    box.put("state", b"s2", retain=True, coalesce="state")
    rows = box.peek(10)
    assert [(r.topic, r.payload, r.retain) for r in rows] == [
        ("events", b"e1", False),
        ("state", b"s2", True),
    ]
    assert box.count == 2


def test_full_outbox_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", OutboxLimits(max_messages=10, max_bytes=1 << 20))
    for i in range(25):
        box.put("t", f"{i:03}".encode())
    assert [r.payload for r in box.peek(100)] == [f"{i:03}".encode() for i in range(15, 25)]
    assert box.dropped == 15
    box.close()
    assert Outbox(tmp_path / "o.db").dropped == 15  # the counter is persisted
    by_bytes = Outbox(tmp_path / "b.db", OutboxLimits(max_messages=1000, max_bytes=100))
    for _ in range(10):
        by_bytes.put("t", b"x" * 30)
    assert by_bytes.bytes <= 100
    assert by_bytes.dropped == 7


def first_seen(payloads: list[bytes]) -> list[int]:
    """The sequence numbers in order of first arrival. QoS 1 is at-least-once on every
    hop (agent to broker, broker to subscriber): a repeat is allowed, a gap is not."""
    seen: set[int] = set()
    out = []
    for n in (int.from_bytes(p, "little") for p in payloads):
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def durable_operator(broker: Broker, client_id: str) -> tuple[paho.Client, list[bytes]]:
    """An MQTT 5 client with a persistent session: the broker keeps its subscription
    and queues its QoS 1 messages across the client's own disconnects and a broker
    restart (the test broker persists sessions)."""
    got: list[bytes] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    client.reconnect_delay_set(min_delay=0.05, max_delay=0.3)  # back soon after the broker
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
    client.subscribe("edge/dev1/flows/f1/count", qos=1)
    client.loop_start()
    return client, got


async def test_outage_with_a_restart_loses_nothing_and_keeps_order(
    broker: Broker, operator: Operator, artifact_server: ArtifactServer, make_config: Any
) -> None:
    """A flow publishes a sequence every 50 ms. The broker goes away; the agent is
    restarted while it is away; the broker comes back: every number arrives, in order,
    with no gap (QoS 1: a repeat is allowed, a gap is not)."""
    operator.subscribe("edge/dev1/#")
    watcher, got = durable_operator(broker, "outbox-watcher")
    try:
        cfg = make_config()
        trig = [{"type": "interval", "ms": 50}]
        async with Agent(cfg) as agent:
            operator.publish(
                DESIRED,
                {
                    "generation": 1,
                    "flows": {"f1": flow(artifact_server, "v1", wat.echo_flow(), triggers=trig)},
                },
            )
            await operator.wait_for(STATE, flow_state("f1", status="success"))
            await wait_until(lambda: len(got) >= 3, what="messages while online")
            broker.stop()
            await wait_until(lambda: agent.outbox.count >= 10, what="an outbox filling")
        async with Agent(cfg) as again:  # restarted while the broker is away
            before = again.outbox.count
            assert before >= 10
            await wait_until(lambda: again.outbox.count >= before + 10, what="more offline")
            broker.start()
            await wait_until(
                lambda: again.outbox.count < 5 and len(got) > 40, 30, "the outbox to drain"
            )
        assert first_seen(got) == list(range(1, len(first_seen(got)) + 1)), first_seen(got)
    finally:
        watcher.loop_stop()
        watcher.disconnect()


async def test_overflow_while_offline_drops_the_oldest_and_reports_it(
    broker: Broker, operator: Operator, artifact_server: ArtifactServer, make_config: Any
) -> None:
    operator.subscribe("edge/dev1/#")
    watcher, got = durable_operator(broker, "overflow-watcher")
    try:
        cfg = make_config(outbox={"max_messages": 30})
        async with Agent(cfg) as agent:
            operator.publish(
                DESIRED,
                {
                    "generation": 1,
                    "flows": {
                        "f1": flow(
                            artifact_server,
                            "v1",
                            wat.echo_flow(),
                            triggers=[{"type": "interval", "ms": 20}],
                        )
                    },
                },
            )
            await operator.wait_for(STATE, flow_state("f1", status="success"))
            await wait_until(lambda: len(got) >= 2, what="messages before the outage")
            broker.stop()
            await wait_until(lambda: agent.outbox.dropped >= 20, 20, "an overflow")
            broker.start()
            operator.client.reconnect()
            operator.subscribe("edge/dev1/#")
            state = await operator.wait_for(
                STATE, lambda d: (d.get("outbox") or {}).get("dropped", 0) >= 20, 30
            )
            assert state["outbox"]["queued"] <= 30
            status = await operator.wait_for("edge/dev1/status", lambda d: d["online"])
            assert status["dropped"] >= 20

            # the oldest messages of the outage were dropped: a jump in the sequence
            await wait_until(
                lambda: any(b > a + 1 for a, b in itertools.pairwise(first_seen(got))),
                what="messages from after the outage",
            )
        assert first_seen(got) == sorted(first_seen(got))  # what arrived is in order
    finally:
        watcher.loop_stop()
        watcher.disconnect()


def test_state_report_carries_outbox_counters() -> None:
    from agent.wire.protocol import OutboxState, StateReport

    report = StateReport(
        deviceId="d", flows={}, time="t", outbox=OutboxState(queued=3, bytes=10, dropped=1)
    )
    assert json.loads(report.model_dump_json(by_alias=True))["outbox"] == {
        "queued": 3,
        "bytes": 10,
        "dropped": 1,
    }


async def test_only_a_backlog_from_offline_is_paced(tmp_path: Path) -> None:
    """Live traffic is not paced (drain_rate used to cap every response at 200/s and
    add up to 5 ms to each); a backlog found at reconnect is."""
    import asyncio

    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        pauses.append(delay)
        await real_sleep(0)

    box = Outbox(tmp_path / "o.db", OutboxLimits(drain_rate=10.0, batch=5))
    box.sleep = recording_sleep
    sent: list[bytes] = []

    def publish(topic: str, payload: bytes, **_: Any) -> asyncio.Future[None]:
        sent.append(payload)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    connected = asyncio.Event()
    connected.set()
    drain = asyncio.create_task(box.drain(publish, connected))
    for i in range(20):  # live: produced while connected
        box.put("t", str(i).encode())
        await real_sleep(0)
    await wait_until(lambda: box.count == 0, what="live messages sent")
    assert pauses == []
    connected.clear()
    box.put("t", b"first while offline")
    await real_sleep(0.05)  # the drain loop notices it is offline
    for i in range(19):  # a backlog built while offline
        box.put("t", str(i).encode())
    connected.set()
    await wait_until(lambda: box.count == 0, what="the backlog sent")
    drain.cancel()
    assert len(pauses) >= 3  # 20 messages in batches of 5, paced at 10/s
    assert len(sent) == 40
