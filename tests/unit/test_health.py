"""The health watch's timers and its verdict after a restart (no runner, no I/O)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from agent.device.deploy.health import HealthDefaults, HealthWatch
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.state import FlowRecord, Installed, PersistedState
from agent.wire.protocol import Status


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def watch_over(state: PersistedState) -> tuple[HealthWatch, FlowRecords, list[str]]:
    records = FlowRecords(state)
    persisted: list[str] = []

    @contextlib.asynccontextmanager
    async def lock(_flow_id: str) -> AsyncIterator[None]:
        yield

    host: Any = None  # (not reached: no runner reports here)
    reverter: Any = None
    watch = HealthWatch(
        records, host, reverter, lambda: persisted.append("x"), lock, HealthDefaults(60, True)
    )
    return watch, records, persisted


async def test_after_a_restart_a_version_on_probation_gets_its_whole_window_again() -> None:
    now = time.time()
    installed = Installed(version="v2", sha256="b" * 64, installed_at=_iso(now - 100))
    # A 60 s window that ended while the agent was down.
    state = PersistedState(
        flows={
            "f": FlowRecord(status=Status.SUCCESS, installed=installed, probation_until=now - 40)
        }
    )
    watch, records, _ = watch_over(state)
    watch.resume()
    try:
        until = records["f"].probation_until
        assert until is not None
        assert now + 59 <= until <= time.time() + 61  # not marked healthy unseen
    finally:
        await watch.close()


async def test_the_window_ends_healthy_and_is_saved() -> None:
    now = time.time()
    state = PersistedState(
        flows={
            "f": FlowRecord(
                status=Status.SUCCESS,
                installed=Installed(version="v2", sha256="b" * 64),
                probation_until=now + 0.05,
            )
        }
    )
    watch, records, persisted = watch_over(state)
    watch.watch("f")
    deadline = time.monotonic() + 5
    while records["f"].probation_until is not None:
        assert time.monotonic() < deadline, "the window did not end"
        await asyncio.sleep(0.01)
    assert persisted
    await watch.close()


async def test_a_wall_clock_far_ahead_does_not_make_probation_last_for_years() -> None:
    state = PersistedState(
        flows={
            "f": FlowRecord(
                status=Status.SUCCESS,
                installed=Installed(version="v2", sha256="b" * 64),
                probation_until=time.time() + 10 * 365 * 86_400,
            )
        }
    )
    watch, _, _ = watch_over(state)
    watch.watch("f")
    try:
        timer = watch._timers["f"]
        assert timer.when() - asyncio.get_running_loop().time() <= 86_400 + 1
    finally:
        await watch.close()
