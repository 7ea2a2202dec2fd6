"""Everything the agent tells the operator side: state, events, status, deployment logs.

The retained state report is coalesced: status changes mark it dirty and one
publisher task sends the latest snapshot, at most once per ``coalesce`` window
(an isolated change goes out at once), and only while connected (every connect
marks it dirty again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from agent import __version__
from agent.device.deploy.state import FlowRecord, PersistedState
from agent.device.mqtt import MqttSession
from agent.device.outbox import Outbox
from agent.wire.protocol import (
    DeploymentLog,
    DeviceStatus,
    Event,
    FlowHealth,
    FlowRuntime,
    FlowState,
    HealthState,
    LogMessage,
    OutboxState,
    Progress,
    StateReport,
    Status,
    dump,
    utc_now_iso,
)
from agent.wire.topics import Topics

log = structlog.get_logger("agent.device.reporter")


#: Re-announcements per connection when the broker keeps saying offline.
MAX_REBIRTHS = 5


def offline_status(time: str | None = None) -> bytes:
    """``{"online": false}``: the last will, and what a clean shutdown publishes."""
    return dump(DeviceStatus(online=False, time=time), exclude_none=True)


class Reporter:
    def __init__(
        self,
        session: MqttSession,
        topics: Topics,
        state: PersistedState,
        *,
        device_type: str,
        runtime: str,
        coalesce_ms: int = 50,
        outbox: Outbox | None = None,
        silent: bool = False,
    ) -> None:
        self.session = session
        self.outbox = outbox
        #: Publish nothing on the edge protocol topics (the Losant profile).
        self.silent = silent
        self.topics = topics
        self.state = state
        self.device_type = device_type
        self.runtime = runtime
        self.coalesce = coalesce_ms / 1000
        self._dirty = asyncio.Event()
        #: A change an operator waits for (a verdict): published without waiting for
        #: the rest of the coalescing window.
        self._urgent = asyncio.Event()
        # flow id -> (download started, last progress event, events sent)
        self._progress: dict[str, tuple[float, float, int]] = {}
        self.published = 0
        #: Set at shutdown, before the agent publishes its own offline status.
        self.stopping = False
        #: Re-announcements made on this connection (bounded: see on_own_status).
        self._reborn = 0
        #: Supervision info per flow (set by the agent; None outside an agent).
        self.runtime_info: Callable[[str], FlowRuntime | None] = lambda _flow_id: None

    def snapshot(self) -> StateReport:
        flows = {
            flow_id: self._flow(flow_id, rec) for flow_id, rec in sorted(self.state.flows.items())
        }
        return StateReport(
            deviceId=self.topics.device_id,
            generation=self.state.generation,
            flows=flows,
            rejected=self.state.rejected,
            outbox=OutboxState(**self.outbox.info()) if self.outbox is not None else None,
            time=utc_now_iso(),
        )

    def _flow(self, flow_id: str, rec: FlowRecord) -> FlowState:
        """A flow's report. A revert is saved before the previous version starts (a
        crash then resumes it); until it has started, the version that runs is still
        the one being left, and the report says so: the verdict (``failure`` or
        ``aborted``, ``reverted``) at once, the version once it runs."""
        running, former = rec.installed, rec.previous
        if rec.inflight == "revert":
            running, former = former, running
        return FlowState(
            desiredVersion=rec.desired_version,
            currentVersion=running.version if running else None,
            status=rec.status,
            error=rec.error,
            attempts=rec.attempts,
            retryAt=_iso(rec.next_retry_at) if rec.status == Status.FAILURE else None,
            deploymentId=rec.deployment_id,
            lastUpdated=rec.last_updated,
            sha256=running.sha256 if running else None,
            previousVersion=former.version if former else None,
            previousSha256=former.sha256 if former else None,
            reverted=rec.reverted,
            health=_health(rec),
            deferredUntil=_iso(rec.deferred_until) if rec.status == Status.PENDING else None,
            runtime=self.runtime_info(flow_id),
        )

    def mark_dirty(self, *, urgent: bool = False) -> None:
        """The state changed; ``urgent``: report it now (a verdict such as ``success``
        or ``failure``), not at the end of the coalescing window."""
        self._dirty.set()
        if urgent:
            self._urgent.set()

    def on_own_status(self, payload: bytes) -> None:
        """The broker's copy of this device's status, heard through the agent's own
        subscription. If it says offline while the device is connected, the birth
        message was lost or overtaken: a last will of an earlier connection of this
        device published after it (a broker that answered a CONNACK late, a session
        taken over), or a clustered broker that lost the retained message in a
        failover. The device then announces itself again, at most MAX_REBIRTHS times
        per connection, so two writers cannot ping-pong for ever."""
        if self.stopping or self.silent or not self.session.established.is_set():
            return
        try:
            online = json.loads(payload).get("online") if payload else False
        except (ValueError, AttributeError):
            return
        if online is not False or self._reborn >= MAX_REBIRTHS:
            return
        self._reborn += 1
        log.warning("the broker says this device is offline; announcing it again")
        self._birth()

    def on_connect(self) -> None:
        """Birth message and a fresh state report after every (re)connect."""
        self._reborn = 0
        self._birth()

    def _birth(self) -> None:
        self._direct(
            self.topics.status,
            dump(
                DeviceStatus(
                    online=True,
                    agentVersion=__version__,
                    deviceType=self.device_type,
                    runtime=self.runtime,
                    dropped=self.outbox.dropped if self.outbox is not None else None,
                    time=utc_now_iso(),
                ),
                exclude_none=True,
            ),
            retain=True,
        )
        self.mark_dirty()

    async def run(self) -> None:
        """Publish the state when dirty: at once if the last report is older than the
        coalesce window or the change is urgent, else at the end of the window (so a
        burst of intermediate statuses gives one report)."""
        loop = asyncio.get_running_loop()
        last = -self.coalesce
        while True:
            await self._dirty.wait()
            await self.session.connected.wait()
            wait = last + self.coalesce - loop.time()
            if wait > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), wait)
            self._dirty.clear()
            self._urgent.clear()
            self.publish_state_now()
            last = loop.time()

    def publish_state_now(self) -> None:
        self._publish(self.topics.state, dump(self.snapshot()), retain=True, coalesce="state")
        self.published += 1

    def event(self, flow_id: str, rec: FlowRecord, progress: Progress | None = None) -> None:
        if progress is None:
            self._progress.pop(flow_id, None)  # a transition starts a new progress series
        self._publish(
            self.topics.events,
            dump(
                Event(
                    flowId=flow_id,
                    deploymentId=rec.deployment_id,
                    version=rec.desired_version,
                    status=rec.status,
                    error=rec.error,
                    progress=progress,
                    time=utc_now_iso(),
                )
            ),
        )

    def progress(self, flow_id: str, rec: FlowRecord, done: int, total: int | None) -> None:
        """``downloading`` events with progress: one per second per flow while a download
        lasts, and a final one if any was sent (a quick download sends none)."""
        if rec.status != Status.DOWNLOADING:
            return
        now = time.monotonic()
        started, last, sent = self._progress.setdefault(flow_id, (now, now, 0))
        final = total is not None and done >= total
        if final:
            self._progress[flow_id] = (started, now, 0)  # the series ends: one final event
            if sent:
                self.event(flow_id, rec, Progress(bytes=done, total=total))
        elif now - last >= 1.0:
            self._progress[flow_id] = (started, now, sent + 1)
            self.event(flow_id, rec, Progress(bytes=done, total=total))

    def deployment_log(self, flow_id: str, rec: FlowRecord, lines: list[LogMessage]) -> None:
        doc = DeploymentLog(
            deviceId=self.topics.device_id,
            flowId=flow_id,
            deploymentId=rec.deployment_id,
            version=rec.desired_version,
            attempts=rec.attempts,
            messages=lines,
            time=utc_now_iso(),
        )
        topic = self.topics.deployment_log(rec.deployment_id or flow_id)
        self._publish(topic, dump(doc), retain=True, coalesce=f"log:{topic}")

    def _publish(
        self, topic: str, payload: bytes, *, retain: bool = False, coalesce: str | None = None
    ) -> None:
        """QoS 1, through the outbox (persisted, in order) when there is one."""
        if self.silent:
            return
        if self.outbox is None:
            self._direct(topic, payload, retain=retain)
            return
        self.outbox.put(topic, payload, retain=retain, coalesce=coalesce)

    def _direct(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.silent:
            return
        try:
            self.session.publish(topic, payload, qos=1, retain=retain)
        except (RuntimeError, ValueError) as exc:  # queue full; a topic paho refuses
            log.warning("publish dropped", topic=topic, error=str(exc))


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _health(rec: FlowRecord) -> FlowHealth | None:
    if rec.installed is None:
        return None
    if rec.probation_until is not None:
        return FlowHealth(state=HealthState.PROBATION, until=_iso(rec.probation_until))
    if rec.no_retry and not rec.reverted and rec.status == Status.FAILURE:
        return FlowHealth(state=HealthState.FAILED)
    return FlowHealth(state=HealthState.HEALTHY)
