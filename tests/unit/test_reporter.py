"""The reporter against a fake session: what it publishes, how often, and how."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from agent.device.deploy.state import FlowRecord, Installed, PersistedState
from agent.device.reporter import Reporter
from agent.wire.protocol import Status
from agent.wire.topics import Topics


class FakeSession:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.sent: list[tuple[str, dict[str, Any], bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any:
        self.sent.append((topic, json.loads(payload), retain))


def reporter(state: PersistedState, coalesce_ms: int = 100) -> tuple[Reporter, FakeSession]:
    session = FakeSession()
    rep = Reporter(
        session,  # type: ignore[arg-type]
        Topics("edge", "dev1"),
        state,
        device_type="rpi4",
        runtime="wasmtime x",
        coalesce_ms=coalesce_ms,
    )
    return rep, session


async def test_a_burst_of_changes_gives_one_coalesced_state_report() -> None:
    state = PersistedState(generation=3)
    rep, session = reporter(state)
    task = asyncio.create_task(rep.run())
    try:
        rep.mark_dirty()  # an isolated change goes out at once
        await asyncio.sleep(0.02)
        for _ in range(20):
            rep.mark_dirty()
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.25)
    finally:
        task.cancel()
    states = [doc for topic, doc, retain in session.sent if topic == "edge/dev1/state" and retain]
    assert len(states) == 2
    assert states[-1]["generation"] == 3


async def test_a_verdict_is_reported_at_once_inside_the_coalescing_window() -> None:
    """Intermediate statuses coalesce; a verdict (success, failure, ...) does not wait
    for the rest of the window (a 60 s window here: waiting for it would time out)."""
    from common import wait_until

    state = PersistedState(generation=3)
    rep, session = reporter(state, coalesce_ms=60_000)

    def reports() -> list[dict[str, Any]]:
        return [doc for topic, doc, retain in session.sent if topic == "edge/dev1/state"]

    task = asyncio.create_task(rep.run())
    try:
        rep.mark_dirty()  # the first report goes out at once (none for a window)
        await wait_until(lambda: len(reports()) == 1, what="the first report")
        for _ in range(5):  # downloading, installing, ...: held for the window
            rep.mark_dirty()
        await asyncio.sleep(0.05)
        assert len(reports()) == 1
        state.generation = 4
        rep.mark_dirty(urgent=True)  # success
        await wait_until(lambda: len(reports()) == 2, what="the verdict's report", timeout=10)
        assert reports()[-1]["generation"] == 4
    finally:
        task.cancel()


def test_state_and_event_documents() -> None:
    rec = FlowRecord(
        status=Status.FAILURE,
        desired_version="v2",
        error="download failed for url 'https://u:tok@h/a.wasm?sig=x'",
        attempts=2,
        next_retry_at=1_800_000_000.0,
        installed=Installed(version="v1", sha256="a" * 64),
    )
    rep, session = reporter(PersistedState(generation=1, flows={"f": rec}))
    snap = rep.snapshot()
    flow = snap.flows["f"]
    assert (flow.current_version, flow.desired_version, flow.attempts) == ("v1", "v2", 2)
    assert flow.retry_at == "2027-01-15T08:00:00.000Z"
    rep.event("f", rec)
    topic, event, retain = session.sent[-1]
    assert (topic, retain) == ("edge/dev1/events", False)
    assert event["status"] == "failure"
    assert "tok" not in event["error"]
    assert event["error"].endswith("'https://h/a.wasm?…'")


def test_birth_message_then_a_fresh_state() -> None:
    rep, session = reporter(PersistedState())
    rep.on_connect()
    topic, status, retain = session.sent[0]
    assert (topic, retain) == ("edge/dev1/status", True)
    assert status["online"] is True
    assert status["deviceType"] == "rpi4"
    assert rep._dirty.is_set()


def test_a_revert_in_flight_reports_the_version_that_still_runs() -> None:
    """The revert is saved (installed = the previous version, in flight ``revert``)
    before the previous version starts: until it has, the report names the version
    that runs, and the verdict already."""
    v1 = Installed(version="v1", sha256="1" * 64)
    v2 = Installed(version="v2", sha256="2" * 64)
    rec = FlowRecord(
        installed=v1,
        previous=v2,
        status=Status.FAILURE,
        reverted=True,
        inflight="revert",
        desired_version="v2",
    )
    state = PersistedState(generation=1, flows={"f1": rec})
    rep, _ = reporter(state)
    f1 = rep.snapshot().flows["f1"]
    assert (f1.current_version, f1.sha256, f1.previous_version) == ("v2", "2" * 64, "v1")
    assert (f1.status, f1.reverted) == (Status.FAILURE, True)
    rec.inflight = None  # the previous version started
    f1 = rep.snapshot().flows["f1"]
    assert (f1.current_version, f1.sha256, f1.previous_version) == ("v1", "1" * 64, "v2")
