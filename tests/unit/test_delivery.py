"""Event delivery costs: batches of queued events, and export calls per event.

Regression guards without clocks: they count worker jobs (thread hand-offs) and
export calls, so a change that goes back to one job or three calls per event fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from common import wait_until
from hosts import BASE, LIMITS, Host, recording_host

from agent.device.runtime._batch import MAX_BATCH, deliver
from agent.device.runtime.sandbox import Runtime
from agent.errors import FlowTrap

TOPIC = f"{BASE}/flows/f1/command"

_IMPORTS = '(import "edge" "publish" (func $publish (param i32 i32 i32 i32 i32) (result i32)))'


def counting_flow() -> bytes:
    """Publishes each event's payload to ~/command; a payload starting with ``b``
    traps; a payload starting with ``?`` publishes instead the calls made so far of
    ``edge_alloc`` and ``edge_free`` (two u32 LE at 256, 260)."""
    return wasmtime.wat2wasm(f"""
(module
  {_IMPORTS}
  (memory (export "memory") 4)
  (data (i32.const 1024) "~/command")
  (func (export "_initialize"))
  (func (export "edge_alloc") (param $n i32) (result i32)
    (i32.store (i32.const 256) (i32.add (i32.load (i32.const 256)) (i32.const 1)))
    (if (result i32) (i32.gt_u (local.get $n) (i32.const 131072))
      (then (i32.const 0)) (else (i32.const 65536))))
  (func (export "edge_free") (param i32 i32)
    (i32.store (i32.const 260) (i32.add (i32.load (i32.const 260)) (i32.const 1))))
  (func (export "edge_on_event") (param $kind i32) (param $np i32) (param $nl i32)
        (param $pp i32) (param $pl i32) (result i32)
    (if (i32.eq (i32.load8_u (local.get $pp)) (i32.const 98)) (then unreachable))
    (if (i32.eq (i32.load8_u (local.get $pp)) (i32.const 63))
      (then (local.set $pp (i32.const 256)) (local.set $pl (i32.const 8))))
    (drop (call $publish (i32.const 1024) (i32.const 9) (local.get $pp) (local.get $pl)
                         (i32.const 0)))
    (i32.const 0))
)""")


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Host]:
    async with recording_host(tmp_path) as rec:
        yield rec


def count_jobs(h: Host) -> list[int]:
    """Counts the worker jobs the flow host's runtime runs from now on."""
    runtime = h.host.runtime
    jobs = [0]
    real = runtime.run

    async def counted(fn: Any, timeout: float | None = None, what: str = "call") -> Any:
        jobs[0] += 1
        return await real(fn, timeout, what)

    runtime.run = counted  # type: ignore[method-assign]
    return jobs


async def deploy(h: Host) -> Any:
    return await h.deploy(
        counting_flow(),
        triggers=[{"type": "command", "command": "c"}],
        permissions={"publishRate": 10_000},
    )


async def test_queued_events_run_back_to_back_in_few_worker_jobs(h: Host) -> None:
    await deploy(h)
    jobs = count_jobs(h)
    n = 100
    for i in range(n):  # all queued before the worker runs
        assert h.host.command("c", str(i).encode()) == ["f1"]
    await wait_until(lambda: len(h.on(TOPIC)) == n, what="every event delivered")
    assert h.on(TOPIC) == [str(i).encode() for i in range(n)]  # in order
    # One job per event would be 100; batches of up to MAX_BATCH make it 4 when
    # nothing else runs (a slow machine may cut a batch short after SLICE_S).
    assert n // MAX_BATCH <= jobs[0] <= n // 8


async def test_the_events_after_one_that_traps_wait_for_the_restart_in_order(h: Host) -> None:
    runner = await deploy(h)
    for payload in (b"1", b"2", b"boom", b"3", b"4"):
        h.host.command("c", payload)
    # (an event is counted when its batch returns, after what it published arrived)
    await wait_until(lambda: len(h.on(TOPIC)) == 4 and runner.state.events == 4, 10, "the events")
    assert h.on(TOPIC) == [b"1", b"2", b"3", b"4"]
    assert runner.state.traps == {"unreachable": 1}
    assert runner.state.restarts == 1


async def test_an_event_costs_one_export_call_while_its_buffer_fits(h: Host) -> None:
    await deploy(h)
    for i in range(50):
        h.host.command("c", b"x" * i)
    h.host.command("c", b"?")
    await wait_until(lambda: len(h.on(TOPIC)) == 51, what="51 events")
    alloc, free = counts(h.on(TOPIC)[-1])
    assert (alloc, free) == (1, 0)  # one buffer, kept (was: 51 edge_alloc, 51 edge_free)

    # A big event (over 64 KiB) gets a buffer of its own, given back at once; the
    # next small one gets a new kept buffer.
    h.host.command("c", b"y" * 70_000)
    h.host.command("c", b"?")
    await wait_until(lambda: len(h.on(TOPIC)) == 53, what="53 events")
    assert len(h.on(TOPIC)[-2]) == 70_000
    assert counts(h.on(TOPIC)[-1]) == (3, 2)


def counts(report: bytes) -> tuple[int, int]:
    return int.from_bytes(report[:4], "little"), int.from_bytes(report[4:8], "little")


# -- the batch itself, with a plain function for the wasm call


async def test_a_call_blocked_past_the_batch_timeout_ends_the_batch() -> None:
    release = threading.Event()
    invoked: list[str] = []

    def invoke(event: str) -> str:
        invoked.append(event)
        if event == "block":  # a call stuck in a host function
            release.wait(5)
        return event.upper()

    async with Runtime(LIMITS, workers=1) as runtime:
        batch = await deliver(runtime, invoke, ["a", "b", "block", "c"], 0.05, "call")
        assert batch.results == ["A", "B"]
        assert isinstance(batch.error, FlowTrap)
        assert batch.error.code == "deadline"
        assert batch.settled == 3  # "c" was not delivered: the caller puts it back
        release.set()
        await runtime.run(lambda: None)  # the job has ended
    assert invoked == ["a", "b", "block"]


async def test_a_batch_takes_no_further_event_after_its_time_slice() -> None:
    def invoke(event: int) -> int:
        time.sleep(0.015)
        return event

    async with Runtime(LIMITS, workers=1) as runtime:
        batch = await deliver(runtime, invoke, list(range(10)), 1.0, "call")
    assert batch.error is None
    assert 1 <= len(batch.results) < 10
    assert batch.results == list(range(len(batch.results)))


async def test_a_failing_event_ends_the_batch_with_its_error() -> None:
    def invoke(event: int) -> int:
        if event == 2:
            raise FlowTrap("trapped: unreachable", code="unreachable")
        return event

    async with Runtime(LIMITS, workers=1) as runtime:
        batch = await deliver(runtime, invoke, [0, 1, 2, 3], 1.0, "call")
    assert batch.results == [0, 1]
    assert isinstance(batch.error, FlowTrap)
    assert batch.settled == 3
