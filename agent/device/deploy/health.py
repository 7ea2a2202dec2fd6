"""The health window: a new version is on probation for a while after it starts.

When a version activates, its record gets ``probation_until`` (the entry's
``health.window``, or the agent's ``[health] window_s``). If the flow traps, exits
or is marked broken before then, the deployment failed: with ``revert`` (the
default) the previous version is started again from the local store
(:class:`~agent.device.deploy.revert.Reverter`) and the flow reports ``failure`` with
``reverted: true``; without a previous version (or with revert off) the flow reports
``failure`` and stays as it is. Either way the target is not retried until a new
one arrives (a new ``deploymentId``). When the window ends without a failure the
version is healthy. Probation survives a restart (the end time is saved).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import structlog

from agent.device.deploy.records import FlowRecords
from agent.device.deploy.revert import Reverter
from agent.device.deploy.state import FlowRecord
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner, Health
from agent.wire.protocol import MAX_HEALTH_WINDOW_S, Status
from agent.wire.timevalue import issued_at

log = structlog.get_logger("agent.device.deploy.health")

#: Runner health that ends a probation: it trapped (and restarts) or is broken.
FAILING = frozenset({Health.RESTARTING, Health.BROKEN})
#: Statuses under which an installed version can be on probation.
ACTIVE = frozenset({Status.SUCCESS, Status.ALREADY_INSTALLED})


@dataclass(frozen=True)
class HealthDefaults:
    """``[health]``: what an entry without ``health`` gets."""

    window_s: float = 60.0
    revert: bool = True


class HealthWatch:
    def __init__(
        self,
        records: FlowRecords,
        host: FlowHost,
        reverter: Reverter,
        persist: Callable[[], object],
        flow_lock: Callable[[str], AbstractAsyncContextManager[object]],
        defaults: HealthDefaults,
    ) -> None:
        self.records = records
        self.host = host
        self.reverter = reverter
        self._persist = persist  # fire-and-forget, ordered (Reconciler.persist_soon)
        #: A flow's lock, held by a reconcile run while it works on the flow: a
        #: verdict (and a revert) never interleaves with a run's steps for that flow.
        self._flow_lock = flow_lock
        self.defaults = defaults
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reverts: set[asyncio.Future[bool]] = set()

    def window(self, entry_window: float | None, entry_revert: bool | None) -> tuple[float, bool]:
        window = self.defaults.window_s if entry_window is None else entry_window
        revert = self.defaults.revert if entry_revert is None else entry_revert
        return window, revert

    # ------------------------------------------------------------ probation timers
    def watch(self, flow_id: str) -> None:
        """(Re)arm the end of ``flow_id``'s probation from its record."""
        self._cancel_timer(flow_id)
        rec = self.records.get(flow_id)
        if rec is None or rec.probation_until is None:
            return
        # (bounded: a wall clock set far ahead, e.g. no RTC at boot, must not make a
        # probation last for years)
        delay = min(MAX_HEALTH_WINDOW_S, max(0.0, rec.probation_until - time.time()))
        loop = asyncio.get_running_loop()
        self._timers[flow_id] = loop.call_later(delay, self._spawn, self._end, flow_id)

    def resume(self) -> None:
        """After a restart: a version still on probation has not been seen running
        since, so it gets its whole window again (from now)."""
        now = time.time()
        for flow_id, rec in list(self.records.items()):
            if rec.probation_until is not None and rec.installed is not None:
                window = rec.probation_until - _epoch(rec.installed.installed_at, now)
                self.records.on_probation(flow_id, now + min(MAX_HEALTH_WINDOW_S, window))
            self.watch(flow_id)

    def _cancel_timer(self, flow_id: str) -> None:
        timer = self._timers.pop(flow_id, None)
        if timer is not None:
            timer.cancel()

    async def _end(self, flow_id: str) -> None:
        async with self._flow_lock(flow_id):
            self._timers.pop(flow_id, None)
            rec = self.records.get(flow_id)
            if rec is None or rec.probation_until is None:
                return
            if rec.probation_until > time.time():  # re-armed meanwhile
                self.watch(flow_id)
                return
            self.records.healthy(flow_id)  # (the probation is over)
            if rec.status in ACTIVE:  # (else a new deployment took over: no verdict)
                log.info(
                    "version is healthy: its health window ended",
                    flow_id=flow_id,
                    version=rec.installed.version if rec.installed else None,
                )
            self._persist()

    # ------------------------------------------------------------ failures
    def on_runner(self, runner: FlowRunner) -> None:
        """A running flow's health changed (from the flow host): a failure on
        probation fails the deployment."""
        flow_id = runner.flow_id
        rec = self.records.get(flow_id)
        if (
            not _on_probation(rec)
            or self.host.running.get(flow_id) is not runner
            or runner.state.health not in FAILING
        ):
            return
        assert rec is not None
        assert rec.installed is not None
        reason = (
            f"version {rec.installed.version} failed within its health window: "
            f"{runner.state.last_error or runner.state.health.value}"
        )
        self._spawn(self._fail, flow_id, rec.installed.sha256, reason)

    async def _fail(self, flow_id: str, sha256: str, reason: str) -> None:
        async with self._flow_lock(flow_id):
            rec = self.records.get(flow_id)
            if not _on_probation(rec) or rec is None or rec.installed is None:
                return
            if rec.installed.sha256 != sha256:
                return  # something else happened first (a new deployment, a removal)
            self._cancel_timer(flow_id)
            if rec.revert_on_failure and rec.previous is not None:
                # Shielded: once begun, a revert completes (close() waits for it).
                revert = asyncio.ensure_future(
                    self.reverter.revert(flow_id, sha256, Status.FAILURE, reason)
                )
                self._reverts.add(revert)
                revert.add_done_callback(self._reverts.discard)
                await asyncio.shield(revert)
                return
            why = "revert is off" if rec.previous is not None else "no previous version"
            log.error("deployment failed its health window", flow_id=flow_id, error=reason)
            rec = self.records.health_failed(flow_id, f"{reason} ({why}; it stays installed)")
            self._persist()
            self.reverter.publish_log(flow_id, rec)

    # ------------------------------------------------------------ tasks
    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        coro = fn(*args)
        assert asyncio.iscoroutine(coro)
        task = asyncio.get_running_loop().create_task(coro, name=f"health-{args[0]}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("health watch failed", error=repr(task.exception()))

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._reverts, return_exceptions=True)


def _on_probation(rec: FlowRecord | None) -> bool:
    """Whether ``rec``'s installed version is in its health window."""
    return (
        rec is not None
        and rec.probation_until is not None
        and rec.status in ACTIVE
        and rec.installed is not None
    )


def _epoch(iso: str, default: float) -> float:
    try:
        return issued_at(iso)
    except (ValueError, OverflowError, OSError):
        return default
