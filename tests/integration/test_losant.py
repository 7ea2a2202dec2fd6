"""The Losant profile, against a Mosquitto that behaves like Losant's broker."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wat
from broker import Broker, Operator
from common import SHARED, wait_until

from agent.device.daemon import Agent
from agent.device.losant import gunzip_bounded
from agent.device.pacer import PaceLimits, Pacer, Windows

LOSANT_LIKE = "retain_available false\nmax_packet_size 262144\n"


# ---------------------------------------------------------------- the pacer
def recording_publisher() -> tuple[list[tuple[str, bytes]], Any]:
    """A publish function that records and acknowledges at once."""
    sent: list[tuple[str, bytes]] = []

    def publish(topic: str, payload: bytes, **_: Any) -> asyncio.Future[None]:
        sent.append((topic, payload))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    return sent, publish


def test_windows_per_topic_and_per_connection() -> None:
    now = [100.0]
    w = Windows(PaceLimits(window_s=15, per_topic=3, per_connection=5), clock=lambda: now[0])
    for _ in range(3):
        assert w.wait_for("a") == 0
        w.sent("a")
    assert w.wait_for("a") == pytest.approx(15.0)  # the 4th on a topic waits a window
    assert w.wait_for("b") == 0
    w.sent("b")
    w.sent("b")
    assert w.wait_for("c") == pytest.approx(15.0)  # 5 on the connection: all wait
    now[0] += 10
    assert w.wait_for("c") == pytest.approx(5.0)
    now[0] += 5.01
    assert w.wait_for("a") == 0


async def test_pacer_keeps_order_and_drops_oldest_past_its_queue() -> None:
    sent, publish = recording_publisher()

    pacer = Pacer(publish, PaceLimits(window_s=0.2, per_topic=2, per_connection=100, queue=5))
    futures = [pacer.publish("t", str(i).encode()) for i in range(7)]
    task = asyncio.create_task(pacer.run())
    await wait_until(lambda: len(sent) == 5, 5, "paced sends")
    task.cancel()
    assert [p for _, p in sent] == [b"2", b"3", b"4", b"5", b"6"]  # 0 and 1 dropped
    assert pacer.dropped == 2
    assert futures[0].cancelled()
    assert pacer.delayed >= 1


def test_gunzip_is_bounded() -> None:
    assert gunzip_bounded(gzip.compress(b"abc"), 10) == b"abc"
    with pytest.raises(Exception, match="more than 1000 bytes"):
        gunzip_bounded(gzip.compress(b"\0" * 10_000_000), 1000)
    with pytest.raises(Exception, match="not valid gzip"):
        gunzip_bounded(b"\x1f\x8bnope", 1000)


# ---------------------------------------------------------------- end to end
@pytest.fixture
def losant_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "losant-broker", extra_conf=LOSANT_LIKE)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def watcher(losant_broker: Broker) -> Iterator[Operator]:
    op = Operator(losant_broker).connect()
    op.subscribe("losant/dev1/#")
    yield op
    op.close()


def losant_config(make_config: Any, broker: Broker, **losant: Any) -> Any:
    return make_config(
        losant={
            "enabled": True,
            "broker": broker.url,
            "access_key": "key",
            "access_secret": "secret",
            **losant,
        }
    )


def bundle(ident: str | None, **kw: Any) -> bytes:
    data = wat.eea_bundle(**kw)
    if ident is not None:
        data += wat.custom_section("bundleIdentifier", ident.encode())
    return data


async def hello(op: Operator, bundle_id: str) -> dict[str, Any]:
    return await op.wait_for("losant/dev1/fromAgent/hello", lambda d: d["bundle"] == bundle_id)


async def test_bundle_lifecycle_on_a_losant_like_broker(
    losant_broker: Broker, watcher: Operator, make_config: Any
) -> None:
    cfg = losant_config(make_config, losant_broker)
    async with Agent(cfg) as agent:
        first = await hello(watcher, "nullVersion")
        assert first == {
            "service": "embeddedWorkflowAgent",
            "version": "1.0.0",
            "bundle": "nullVersion",
            "compilerOptions": {"exportMemory": False, "traceLevel": 2, "gzip": True},
        }
        # a gzip-compressed bundle, not retained (the broker keeps no retained messages)
        watcher.publish(
            "losant/dev1/toAgent/flows", gzip.compress(bundle("bundle-a")), retain=False
        )
        await hello(watcher, "bundle-a")
        await wait_until(lambda: watcher.messages("losant/dev1/conn") == [b"1"], what="conn")
        watcher.publish("losant/dev1/command", {"name": "blink"}, retain=False)
        watcher.publish("losant/dev1/toAgent/virtualButton", b"{}", retain=False)
        await wait_until(lambda: len(watcher.messages("losant/dev1/echo")) == 2, what="echo")
        assert watcher.messages("losant/dev1/echo") == [
            b'losant/dev1/command {"name": "blink"}',
            b"losant/dev1/toAgent/virtualButton {}",
        ]
        # bad bundles: refused or failing eea_init; bundle-a keeps running
        watcher.publish("losant/dev1/toAgent/flows", b"not wasm at all", retain=False)
        failing = wat.wasmtime.wat2wasm(
            '(module (import "env" "eea_trace" (func (param i32 i32 i32) (result i32)))'
            ' (memory (export "memory") 1)'
            ' (func (export "eea_init") (result i32) (i32.const 1))'
            ' (func (export "eea_loop") (param i64) (result i32) (i32.const 0)))'
        )
        watcher.publish("losant/dev1/toAgent/flows", failing, retain=False)
        await wait_until(
            lambda: agent.reconciler.state.flows["losant"].status.value == "failure",
            what="the failing bundle",
        )
        assert "eea_init returned 1" in (agent.reconciler.state.flows["losant"].error or "")
        assert json.loads(watcher.latest["losant/dev1/fromAgent/hello"])["bundle"] == "bundle-a"
        watcher.publish("losant/dev1/command", {"name": "again"}, retain=False)
        await wait_until(lambda: len(watcher.messages("losant/dev1/echo")) == 3, what="echo")
        # nothing was published on the edge protocol topics
        assert not [t for t, _ in watcher.history if not t.startswith("losant/")]
    # a clean shutdown publishes nothing retained: the broker never disconnected it
    assert agent.session.connects == 1

    hellos = len(watcher.messages("losant/dev1/fromAgent/hello"))
    async with Agent(cfg):  # reloaded at boot from the local store
        await wait_until(
            lambda: len(watcher.messages("losant/dev1/fromAgent/hello")) > hellos,
            what="the restarted agent's hello",
        )
        assert json.loads(watcher.latest["losant/dev1/fromAgent/hello"])["bundle"] == "bundle-a"
        before = len(watcher.messages("losant/dev1/echo"))
        watcher.publish("losant/dev1/command", {"name": "after-restart"}, retain=False)
        await wait_until(
            lambda: len(watcher.messages("losant/dev1/echo")) > before, what="echo after restart"
        )


async def test_sending_is_paced_to_the_rate_limits(
    losant_broker: Broker, watcher: Operator, make_config: Any
) -> None:
    """A bundle sending every loop (~50/s) on one topic: with a limit of 4 per 0.5 s,
    the broker never sees more than that in any window, and nothing is reordered."""
    cfg = losant_config(make_config, losant_broker, window_s=0.5, per_topic=4, per_connection=100)
    loop_send = """
      (i32.store8 (i32.const 13312) (i32.const 65))
      (call $send_to (i32.const 16416) (i32.const 5) (i32.const 1))"""
    async with Agent(cfg):
        await hello(watcher, "nullVersion")  # subscribed: a bundle is not retained
        watcher.publish(
            "losant/dev1/toAgent/flows", bundle("pacing", loop_body=loop_send), retain=False
        )
        await hello(watcher, "pacing")
        start = time.monotonic()
        stamps: list[float] = []
        seen = 0
        while time.monotonic() - start < 2.0:
            n = len(watcher.messages("losant/dev1/echo"))
            stamps += [time.monotonic()] * (n - seen)
            seen = n
            await asyncio.sleep(0.01)
    assert len(stamps) >= 8  # it kept sending, paced
    for i, t in enumerate(stamps):  # no window of 0.5 s holds more than 4 (+1 for timing)
        assert sum(1 for u in stamps[i:] if u - t < 0.45) <= 5


@pytest.mark.skipif(
    not (SHARED / "eea-samples").is_dir(), reason="../shared/eea-samples is not present"
)
async def test_losant_sample_bundle_over_toagent_flows(
    losant_broker: Broker, watcher: Operator, make_config: Any
) -> None:
    import structlog

    data = (SHARED / "eea-samples" / "hello-world-memory-export.wasm").read_bytes()
    async with Agent(losant_config(make_config, losant_broker)) as agent:
        await hello(watcher, "nullVersion")
        with structlog.testing.capture_logs() as logs:
            watcher.publish("losant/dev1/toAgent/flows", gzip.compress(data), retain=False)
            await wait_until(
                lambda: (
                    agent.reconciler.state.flows.get("losant") is not None
                    and agent.reconciler.state.flows["losant"].status.value == "success"
                ),
                what="the sample loaded",
            )
            await wait_until(
                lambda: any("Loop called with value" in str(e.get("line")) for e in logs),
                what="eea_loop traces",
            )


async def test_a_waiting_topic_does_not_hold_up_the_others() -> None:
    sent, publish = recording_publisher()

    pacer = Pacer(publish, PaceLimits(window_s=60, per_topic=2, per_connection=100))
    for i in range(5):
        pacer.publish("chatty", str(i).encode())
    pacer.publish("hello", b"h")
    task = asyncio.create_task(pacer.run())
    await wait_until(lambda: ("hello", b"h") in sent, 5, "the other topic's message")
    task.cancel()
    assert sent == [("chatty", b"0"), ("chatty", b"1"), ("hello", b"h")]


async def test_platform_compiled_bundle_identity_in_the_hello(
    losant_broker: Broker, watcher: Operator, make_config: Any
) -> None:
    """A bundle exporting its identity as globals (as Losant's platform compiles them):
    the hello reports its identifier, after it arrives and after a restart, so the
    platform does not send it again; the flow's version is that identifier; its
    timer fires on the Losant device's debug topic."""
    from wat_eea import platform_bundle

    device = "5f0c3e9a1b2c3d4e5f6a7b8c"
    watcher.subscribe(f"losant/{device}/#")
    cfg = make_config(
        device_id=device,
        losant={
            "enabled": True,
            "broker": losant_broker.url,
            "access_key": "key",
            "access_secret": "secret",
        },
    )
    topic = f"losant/{device}/fromAgent/hello"
    async with Agent(cfg) as agent:
        await watcher.wait_for(topic, lambda d: d["bundle"] == "nullVersion")
        watcher.publish(
            f"losant/{device}/toAgent/flows",
            gzip.compress(platform_bundle(identifier="1635302774192")),
            retain=False,
        )
        await watcher.wait_for(topic, lambda d: d["bundle"] == "1635302774192")
        rec = agent.reconciler.state.flows["losant"]
        assert rec.installed is not None
        assert rec.installed.version == "1635302774192"
        runtime = agent.reporter.snapshot().flows["losant"].runtime
        assert runtime is not None
        assert runtime.bundle is not None
        assert runtime.bundle.identifier == "1635302774192"
        await wait_until(
            lambda: watcher.messages(f"losant/{device}/fromAgent/debug"), what="the bundle's timer"
        )
    hellos = len(watcher.messages(topic))
    async with Agent(cfg):
        await wait_until(lambda: len(watcher.messages(topic)) > hellos, what="hello again")
        assert json.loads(watcher.latest[topic])["bundle"] == "1635302774192"


async def test_stale_losant_commands_are_not_delivered(
    losant_broker: Broker, watcher: Operator, make_config: Any
) -> None:
    """In the Losant profile too, a command whose time (ISO-8601, epoch ms or
    {"$date": ...}) is older than commands.max_age_s does not reach the bundle."""
    async with Agent(losant_config(make_config, losant_broker)) as agent:
        await hello(watcher, "nullVersion")
        watcher.publish("losant/dev1/toAgent/flows", bundle("cmds"), retain=False)
        await hello(watcher, "cmds")
        old = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 3600))
        for stale in ({"$date": old}, old, int((time.time() - 3600) * 1000)):
            watcher.publish("losant/dev1/command", {"name": "old", "time": stale}, retain=False)
        now = {"$date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        watcher.publish("losant/dev1/command", {"name": "fresh", "time": now}, retain=False)
        watcher.publish("losant/dev1/command", b"not json", retain=False)
        await wait_until(lambda: len(watcher.messages("losant/dev1/echo")) == 2, what="echo")
        echoed = watcher.messages("losant/dev1/echo")
        assert b'"name": "fresh"' in echoed[0]
        assert echoed[1] == b"losant/dev1/command not json"  # the bundle judges its input
        assert agent.losant is not None
        assert agent.losant.stale_commands == 3
