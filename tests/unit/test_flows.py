"""Flows with the edge host API: triggers, storage, permissions, limits, supervision.

Real wasmtime, real asyncio timing; published messages are collected from the
host's publish hook (the MQTT path is covered by the end-to-end tests).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import wat
from common import wait_until
from hosts import BASE, LIMITS, Host, recording_host

from agent.device.runtime.flows import FlowHost
from agent.device.runtime.hostapi import (
    EDGE_ERR_BOUNDS,
    EDGE_ERR_BUFFER,
    EDGE_ERR_DENIED,
    EDGE_ERR_INVALID,
    EDGE_ERR_NOT_FOUND,
    EDGE_ERR_QUOTA,
    EDGE_OK,
)
from agent.device.runtime.runner import Health, RunSpec
from agent.device.runtime.sandbox import Runtime
from agent.errors import InstantiationError
from agent.wire.manifest import Permissions


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Host]:
    async with recording_host(tmp_path) as rec:
        yield rec


def u32(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


async def test_startup_trigger_runs_during_prepare(h: Host) -> None:
    await h.deploy(wat.echo_flow(), triggers=[{"type": "startup"}])
    assert h.on(f"{BASE}/flows/f1/startup") == [b"startup"]


async def test_interval_counts_and_storage_survives_an_upgrade(h: Host) -> None:
    trig = [{"type": "interval", "name": "tick", "ms": 50}]
    await h.deploy(wat.echo_flow(), triggers=trig)
    topic = f"{BASE}/flows/f1/count"
    await wait_until(lambda: len(h.on(topic)) >= 3, what="three ticks")
    counts = [u32(p) for p in h.on(topic)]
    assert counts[:3] == [1, 2, 3]
    assert h.on(f"{BASE}/flows/f1/interval")[0] == b"tick"
    # Blue/green upgrade: the new version continues from the stored counter.
    await h.deploy(wat.echo_flow(), version="v2", triggers=trig)
    last_v1 = max(u32(p) for p in h.on(topic))
    await wait_until(lambda: max(u32(p) for p in h.on(topic)) >= last_v1 + 2, what="v2 ticks")
    assert sorted(u32(p) for p in h.on(topic)) == list(range(1, len(h.on(topic)) + 1))


async def test_storage_is_persisted_and_purged_on_removal(h: Host, tmp_path: Path) -> None:
    await h.deploy(wat.echo_flow(), triggers=[{"type": "interval", "ms": 20}])
    await wait_until(lambda: len(h.on(f"{BASE}/flows/f1/count")) >= 2, what="ticks")
    await h.host.remove("f1")  # a stop flushes the store
    assert (tmp_path / "flows" / "f1" / "kv.json").exists()
    await h.host.remove("f1", purge=True)
    assert not (tmp_path / "flows" / "f1").exists()


async def test_command_trigger_gets_matching_commands_only(h: Host) -> None:
    await h.deploy(wat.echo_flow(), triggers=[{"type": "command", "command": "reset"}])
    assert h.host.command("reset", b'{"x":1}') == ["f1"]
    assert h.host.command("other", b"{}") == []
    await wait_until(lambda: h.on(f"{BASE}/flows/f1/command"), what="the command echo")
    assert h.on(f"{BASE}/flows/f1/command") == [b'reset{"x":1}']


async def test_mqtt_trigger_subscribes_routes_and_unsubscribes(h: Host) -> None:
    await h.deploy(wat.echo_flow(), triggers=[{"type": "mqtt", "topic": "sensors/+/temp"}])
    await h.deploy(
        wat.echo_flow(), flow_id="f2", triggers=[{"type": "mqtt", "topic": "sensors/+/temp"}]
    )
    assert h.subscribed == ["sensors/+/temp"]  # one subscription for both flows
    assert h.host.route("sensors/a/temp", b"21.5") == ["f1", "f2"]
    assert h.host.route("sensors/a/humidity", b"40") == []
    await wait_until(lambda: h.on(f"{BASE}/flows/f2/mqtt"), what="delivery")
    assert h.on(f"{BASE}/flows/f1/mqtt") == [b"sensors/a/temp21.5"]
    await h.host.remove("f1")
    assert h.unsubscribed == []
    await h.host.remove("f2")
    assert h.unsubscribed == ["sensors/+/temp"]


PUB = "(call $publish (i32.const {t}) (i32.const {tl}) (i32.const 0) (i32.const 0) (i32.const {q}))"


@pytest.mark.parametrize(
    ("call", "expected", "perms"),
    [
        (PUB.format(t=1056, tl=9, q=1), EDGE_OK, {}),  # own area
        (PUB.format(t=-16, tl=10, q=1), EDGE_ERR_BOUNDS, {}),  # pointer OOB
        (PUB.format(t=1024, tl=1_000_000, q=1), -2, {}),  # too large
        (PUB.format(t=1056, tl=9, q=2), EDGE_ERR_INVALID, {}),  # qos 2
        (PUB.format(t=2000, tl=11, q=1), EDGE_ERR_DENIED, {}),  # flows/other
        (PUB.format(t=2000, tl=11, q=1), EDGE_OK, {"publish": ["flows/other/#"]}),  # granted
        (PUB.format(t=2100, tl=7, q=1), EDGE_ERR_DENIED, {"publish": ["#"]}),  # desired: never
        (PUB.format(t=2200, tl=16, q=1), EDGE_ERR_DENIED, {"publish": ["#"]}),  # command/...
        (
            "(call $kv_get (i32.const 1088) (i32.const 5) (i32.const 0) (i32.const 4)"
            " (i32.const 8))",
            EDGE_ERR_NOT_FOUND,
            {},
        ),
        (
            "(call $kv_set (i32.const 1088) (i32.const 5) (i32.const 0) (i32.const 2000))",
            EDGE_ERR_QUOTA,
            {"storageQuota": 1000},
        ),
        (
            "(call $kv_set (i32.const 1088) (i32.const 5) (i32.const 0) (i32.const -1))",
            EDGE_ERR_BOUNDS,
            {},
        ),
        ("(call $config_get (i32.const 0) (i32.const 1) (i32.const 8))", EDGE_ERR_BUFFER, {}),
        (
            "(call $config_get (i32.const 0) (i32.const 100) (i32.const 70000000))",
            EDGE_ERR_BOUNDS,
            {},
        ),
        ("(call $log (i32.const 1) (i32.const 1024) (i32.const 9))", EDGE_OK, {}),
        ("(call $log (i32.const 1) (i32.const 262140) (i32.const 100))", EDGE_ERR_BOUNDS, {}),
    ],
)
async def test_host_api_result_codes(
    h: Host, call: str, expected: int, perms: dict[str, Any]
) -> None:
    data = wat.edge_flow(
        f"""
    (i32.store (i32.const 600) {call})
    (drop (call $publish (i32.const 1120) (i32.const 4) (i32.const 600) (i32.const 4)
                         (i32.const 1)))""",
        {**wat.ECHO_STRINGS, 2000: "flows/other", 2100: "desired", 2200: "command/response"},
    )
    runner = await h.deploy(data, triggers=[{"type": "startup"}], permissions=perms)
    assert [u32(p) for p in h.on(f"{BASE}/flows/f1/rc")] == [expected]
    if expected == EDGE_ERR_BOUNDS:
        assert runner.context is not None
        assert runner.context.counters.bad_pointers == 1


async def test_config_reaches_the_flow_through_config_get(h: Host) -> None:
    data = wat.edge_flow(
        """
    (drop (call $config_get (i32.const 3000) (i32.const 200) (i32.const 8)))
    (drop (call $publish (i32.const 1056) (i32.const 9) (i32.const 3000)
                         (i32.load (i32.const 8)) (i32.const 1)))""",
        wat.ECHO_STRINGS,
    )
    await h.deploy(data, triggers=[{"type": "startup"}], config={"rate": 5})
    assert h.on(f"{BASE}/flows/f1/command") == [b'{"rate":5}']


async def test_unknown_edge_import_is_refused(h: Host) -> None:
    data = wat.wasmtime.wat2wasm(
        '(module (import "edge" "open_socket" (func (param i32) (result i32))))'
    )
    with pytest.raises(InstantiationError, match=r"edge\.open_socket"):
        await h.deploy(data)


async def test_publish_flood_is_rate_limited(h: Host) -> None:
    flood = wat.edge_flow(
        f"""
    (loop $l
      (drop {PUB.format(t=1056, tl=9, q=0)})
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 1500))))""",
        wat.ECHO_STRINGS,
    )
    started = time.monotonic()
    runner = await h.deploy(flood, triggers=[{"type": "startup"}], permissions={"publishRate": 100})
    took = time.monotonic() - started
    assert runner.context is not None
    sent = len(h.on(f"{BASE}/flows/f1/command"))
    # The burst (2 x rate) plus what refills while the loop runs (at 100/s, for at most
    # as long as the whole deploy took: measured, so a loaded machine does not fail
    # it). 1,500 calls: the loop must finish inside the 300 ms call deadline even at
    # ~100 µs a host call on a busy machine.
    assert 200 <= sent <= 200 + 100 * min(took, 0.3) + 1
    assert runner.context.counters.publish_dropped == 1500 - sent


async def test_log_flood_is_rate_limited(h: Host) -> None:
    flood = wat.edge_flow(
        """
    (loop $l
      (drop (call $log (i32.const 1) (i32.const 1024) (i32.const 9)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 1500))))""",
        wat.ECHO_STRINGS,
    )
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        runner = await h.deploy(flood, triggers=[{"type": "startup"}])
    took = time.monotonic() - started
    lines = [e for e in logs if e["event"] == "flow log"]
    assert runner.context is not None
    # The burst (2 x 100/s) plus the refill while the loop runs (bounded by the
    # measured time, as above).
    assert len(lines) <= 200 + 100 * min(took, 0.3) + 1
    assert runner.context.counters.logs_dropped == 1500 - len(lines)


async def test_trapping_flow_is_restarted_then_marked_broken(h: Host) -> None:
    bad = wat.edge_flow("unreachable")
    runner = await h.deploy(bad, triggers=[{"type": "interval", "ms": 20}])
    await wait_until(lambda: runner.state.health == Health.BROKEN, 10, "broken")
    assert runner.state.restarts == 2  # three failures: two restarts, then broken
    assert runner.state.traps == {"unreachable": 3}
    assert "unreachable" in (runner.state.last_error or "")
    assert ("f1", Health.RESTARTING) in h.health
    assert ("f1", Health.BROKEN) in h.health
    assert runner.instance is None
    assert not runner.offer(runner_event())
    assert h.host.info("f1") == {
        "health": "broken",
        "restarts": 2,
        "lastError": runner.state.last_error,
    }


def runner_event() -> Any:
    from agent.device.runtime.runner import Event

    return Event(2, b"x", b"")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("(loop $l (br $l))", "deadline"),
        (
            "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable",
            "unreachable",
        ),
        ("(drop (call $recurse (i32.const 0)))", "stack"),
    ],
)
async def test_hostile_handlers_are_contained(h: Host, body: str, needle: str) -> None:
    recurse = (
        "(func $recurse (param i32) (result i32) "
        "(call $recurse (i32.add (local.get 0) (i32.const 1))))"
    )
    bad = wat.edge_flow(body, extra=recurse)
    runner = await h.deploy(bad, triggers=[{"type": "interval", "ms": 50}])
    await wait_until(lambda: runner.state.last_error, 10, "a contained failure")
    assert needle in (runner.state.last_error or "")


async def test_good_flow_keeps_its_interval_beside_a_spinning_flow(h: Host) -> None:
    """A flow spinning to its deadline on every tick runs beside a well-behaved flow
    ticking every 100 ms: the good flow's gaps stay bounded (measured, generous)."""
    spinner = wat.edge_flow("(loop $l (br $l))")
    await h.deploy(spinner, flow_id="bad", triggers=[{"type": "interval", "ms": 100}])
    await h.deploy(
        wat.echo_flow(), flow_id="good", triggers=[{"type": "interval", "name": "t", "ms": 100}]
    )
    stamps: list[float] = []
    topic = f"{BASE}/flows/good/count"
    seen = 0
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        n = len(h.on(topic))
        if n > seen:
            stamps.extend([time.monotonic()] * (n - seen))
            seen = n
        await asyncio.sleep(0.005)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    print(f"good flow: {len(stamps)} ticks in 2.5 s, max gap {max(gaps) * 1000:.0f} ms")
    assert len(stamps) >= 15
    assert max(gaps) < 0.35


async def test_data_dir_is_opt_in_and_confined(h: Host, tmp_path: Path) -> None:
    await h.deploy(wat.write_file("note.txt", "kept"), flow_id="nodir")
    assert not (tmp_path / "flows" / "nodir" / "data").exists()  # off by default
    await h.deploy(
        wat.write_file("note.txt", "kept"), flow_id="withdir", permissions={"dataDir": True}
    )
    assert (tmp_path / "flows" / "withdir" / "data" / "note.txt").read_text() == "kept"
    await h.deploy(
        wat.write_file("../escape.txt", "x"), flow_id="escape", permissions={"dataDir": True}
    )
    assert not list(tmp_path.rglob("escape.txt"))


async def test_compiled_modules_are_cached_on_disk(tmp_path: Path) -> None:
    data = wat.echo_flow()
    sha = wat.sha256(data)
    cache = tmp_path / "cache"
    async with Runtime(LIMITS, cache_dir=cache) as first:
        first.compile(data, sha)
        assert first.cache_hits == 0
    assert len(list(cache.glob(f"{sha}.*.cwasm"))) == 1
    assert cache.stat().st_mode & 0o777 == 0o700
    async with Runtime(LIMITS, cache_dir=cache) as second:  # e.g. after a restart
        module = second.compile(data, sha)
        assert second.cache_hits == 1
        host = FlowHost(second, LIMITS, "dev1", flows_dir=tmp_path / "flows")
        runner = await host.prepare(
            RunSpec(
                flow_id="f",
                version="v",
                sha256=sha,
                kind="wasm",
                config={},
                triggers=(),
                permissions=Permissions(),
            ),
            data,
        )
        assert runner.instance is not None
        assert runner.module is module
        runner.stop()
        assert second.forget_cached(keep=set()) == 1
    assert not list(cache.glob("*.cwasm"))


async def test_stdout_flood_is_rate_limited_and_the_flow_keeps_working(h: Host) -> None:
    with structlog.testing.capture_logs() as logs:
        runner = await h.deploy(wat.stdout_flood(20000), triggers=[{"type": "startup"}])
    lines = [e for e in logs if e["event"] == "flow output"]
    assert runner.context is not None
    assert 0 < len(lines) <= 250
    assert runner.context.counters.logs_dropped == 20000 - len(lines)
    assert runner.state.health == Health.RUNNING


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("sensors/+/temp", True),
        ("edge/dev1/flows/other/#", True),
        ("zigbee2mqtt/#", True),
        ("#", False),
        ("+/#", False),
        ("$SYS/broker/load", False),
        ("edge/#", False),
        ("edge/+/desired", False),
        ("edge/dev2/state", False),
        ("edge/dev1/command", False),  # the device's own control topics: use command triggers
        ("edge/dev1/+", False),
        ("edge/dev1/desired", False),
    ],
)
async def test_mqtt_trigger_filters_are_checked(h: Host, topic_filter: str, allowed: bool) -> None:
    from agent.errors import InstantiationError

    trig = [{"type": "mqtt", "topic": topic_filter}]
    if allowed:
        await h.deploy(wat.echo_flow(), triggers=trig)
        assert h.subscribed == [topic_filter]
    else:
        with pytest.raises(InstantiationError, match=r"too broad|other devices|own desired"):
            await h.deploy(wat.echo_flow(), triggers=trig)
        assert h.subscribed == []


async def test_the_agents_own_subscriptions_are_never_released_by_a_flow(tmp_path: Path) -> None:
    from hosts import recording_host

    async with recording_host(tmp_path, protected=frozenset({"losant/dev1/command"})) as rec:
        trig = [{"type": "mqtt", "topic": "losant/dev1/command"}]
        await rec.deploy(wat.echo_flow(), triggers=trig)
        await rec.deploy(wat.echo_flow(), version="v2", triggers=trig)  # an upgrade
        await rec.host.remove("f1")
        assert rec.subscribed == []  # the agent subscribes to it itself
        assert rec.unsubscribed == []


async def test_an_abandoned_start_up_leaves_no_unretrieved_error(h: Host) -> None:
    """A start-up superseded while its module spins: the worker thread still ends at the
    call deadline, and that trap is taken, not left as 'Task exception was never
    retrieved' (found by bench/fuzz.py)."""
    import contextlib
    import gc

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        task = asyncio.create_task(h.deploy(wat.spin_on_start(), flow_id="spin"))
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(LIMITS.call_deadline_ms / 1000 + 0.5)  # past its deadline
        gc.collect()
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    assert reported == []
