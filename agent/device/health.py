"""The health window: a new version is on probation for a while after it starts.

When a version activates, its record gets ``probation_until`` (the entry's
``health.window``, or the agent's ``[health] window_s``). If the flow traps, exits
or is marked broken before then, the deployment failed: with ``revert`` (the
default) the previous version is started again from the local store
(:class:`~agent.device.revert.Reverter`) and the flow reports ``failure`` with
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

from agent.device.records import FlowRecords
from agent.device.revert import Reverter
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner, Health
from agent.device.state import FlowRecord
from agent.wire.protocol import Status

log = structlog.get_logger("agent.device.health")

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
        exclusive: Callable[[], AbstractAsyncContextManager[object]],
        defaults: HealthDefaults,
    ) -> None:
        self.records = records
        self.host = host
        self.reverter = reverter
        self._persist = persist  # fire-and-forget, ordered (Reconciler.persist_soon)
        #: Held while deciding and reverting, so no reconcile run starts meanwhile.
        self._exclusive = exclusive
        self.defaults = defaults
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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
        delay = max(0.0, rec.probation_until - time.time())
        loop = asyncio.get_running_loop()
        self._timers[flow_id] = loop.call_later(delay, self._spawn, self._end, flow_id)

    def resume(self) -> None:
        """After a restart: every saved probation goes on until its end time."""
        for flow_id in list(self.records):
            self.watch(flow_id)

    def _cancel_timer(self, flow_id: str) -> None:
        timer = self._timers.pop(flow_id, None)
        if timer is not None:
            timer.cancel()

    async def _end(self, flow_id: str) -> None:
        async with self._exclusive():
            self._timers.pop(flow_id, None)
            rec = self.records.get(flow_id)
            if rec is None or rec.probation_until is None:
                return
            if rec.probation_until > time.time():  # re-armed meanwhile
                self.watch(flow_id)
                return
            self.records.healthy(flow_id)
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
        async with self._exclusive():
            rec = self.records.get(flow_id)
            if not _on_probation(rec) or rec is None or rec.installed is None:
                return
            if rec.installed.sha256 != sha256:
                return  # something else happened first (a new deployment, a removal)
            self._cancel_timer(flow_id)
            if rec.revert_on_failure and rec.previous is not None:
                await self.reverter.revert(flow_id, sha256, Status.FAILURE, reason)
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
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _on_probation(rec: FlowRecord | None) -> bool:
    """Whether ``rec``'s installed version is in its health window."""
    return (
        rec is not None
        and rec.probation_until is not None
        and rec.status in ACTIVE
        and rec.installed is not None
    )
