"""Applying desired state: runs the planner's steps for the document taken in.

- Documents come in through :class:`~agent.device.deploy.intake.DesiredIntake` (bounds,
  signature policy, generation order, intent persisted before any work).

- Exactly one reconcile run at a time (:meth:`Reconciler.run_forever`). Within a run
  each flow's steps run as one named task, so flows don't wait for each other.
- A newer desired document supersedes the run in flight: the run is cancelled, and
  every flow whose in-flight target changed is reported ``aborted``. Downloads keep
  their partial file and resume; ``Activate`` is shielded, so a swap completes.
- Every record change goes through :class:`~agent.device.deploy.records.FlowRecords` (the
  one writer, with the table of legal transitions); :meth:`Reconciler._announce`
  turns a status change into the log line, the event and a state report. The
  executors (:mod:`agent.device.deploy.executors`) persist before the work that follows.
- A failed attempt is retried with exponential backoff until ``retries`` is spent.
- At most :data:`MAX_RUNS_WITHOUT_TRIGGER` consecutive runs happen without a new
  trigger; past that the loop backs off (a guard against a planner that never settles).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import structlog

from agent.device._logging import capture
from agent.device.artifacts import ArtifactStore, Fetcher
from agent.device.config import AgentConfig
from agent.device.deploy.cleanup import collect_garbage
from agent.device.deploy.executors import Chain, Executors
from agent.device.deploy.health import HealthWatch
from agent.device.deploy.intake import DesiredIntake
from agent.device.deploy.local import LocalStore
from agent.device.deploy.planner import (
    Defer,
    Download,
    Step,
    Wait,
    flow_id_of,
    plan,
)
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.revert import Reverter
from agent.device.deploy.state import (
    FlowRecord,
    PersistedState,
    StateStore,
    serialise,
)
from agent.device.deploy.writer import StateWriter
from agent.device.reporter import Reporter
from agent.device.runtime.flows import FlowHost
from agent.device.settings import health_defaults, update_policy
from agent.errors import AgentError
from agent.wire.protocol import DesiredState, Status
from agent.wire.signing import Trust

log = structlog.get_logger("agent.device.deploy.reconciler")

MAX_RUNS_WITHOUT_TRIGGER = 10
MIN_WAKE_S = 0.01
IN_PROGRESS = frozenset({Status.PENDING, Status.DOWNLOADING, Status.INSTALLING})


class Reconciler:
    def __init__(
        self,
        cfg: AgentConfig,
        state: PersistedState,
        store: StateStore,
        host: FlowHost,
        artifacts: ArtifactStore,
        fetcher: Fetcher,
        reporter: Reporter,
        trust: Trust | None = None,
        records: FlowRecords | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.host = host
        self.artifacts = artifacts
        self.fetcher = fetcher
        self.reporter = reporter
        self.device_id = cfg.device_id
        #: The one writer of flow records (see :mod:`agent.device.deploy.records`).
        self.records = records or FlowRecords(state)
        self.records.on_change = self._announce
        self.records.on_touch = lambda _flow_id: self.reporter.mark_dirty()
        self._trigger = asyncio.Event()
        self._writer = StateWriter(store)
        self.intake = DesiredIntake(
            cfg,
            state,
            self.records,
            reporter,
            persist=self.persist,
            write=self._writer.write,
            persist_soon=self.persist_soon,
            trigger=self.trigger,
            trust=trust or Trust({}),
        )
        #: Held while a desired document is taken in (supersede, apply, persist) and
        #: while the loop plans and starts a run, so a run never starts from a
        #: document whose intent is not yet on disk (or was refused for it).
        self._intake_lock = asyncio.Lock()
        self._run_task: asyncio.Task[None] | None = None
        self._flow_locks: dict[str, asyncio.Lock] = {}
        self._active: dict[str, str] = {}
        #: Called on every status change (the Losant profile says hello after a load).
        self.on_status: Callable[[str, Status], None] = lambda _f, _s: None
        self._background: set[asyncio.Task[None]] = set()
        self.runs = 0
        #: Installed flows, started from the local store (at boot, on command, on revert).
        self.local = LocalStore(self.records, host, artifacts)
        self.reverter = Reverter(
            self.records,
            self.local,
            reporter,
            self.persist,
            device_id=cfg.device_id,
            log_lines=cfg.reconcile.log_lines,
        )
        self.health = HealthWatch(
            self.records,
            host,
            self.reverter,
            self.persist_soon,
            self.flow_lock,
            health_defaults(cfg),
        )
        #: ``[updates]``: the maintenance window and the bound on defer requests.
        self.updates = update_policy(cfg)
        self.executors = Executors(
            self.records,
            host,
            artifacts,
            fetcher,
            reporter,
            self.persist,
            on_activated=self._completed,
            reverter=self.reverter,
            health=self.health,
        )
        # Last, with every part in place: what recovery changes is announced (an interrupted
        # install counted as a failed attempt gets its event).
        for note in self.records.recover():
            log.info("recovered after restart", note=note)

    def flow_lock(self, flow_id: str) -> asyncio.Lock:
        """Held by a run while it works on ``flow_id`` (and by health verdicts)."""
        return self._flow_locks.setdefault(flow_id, asyncio.Lock())

    @property
    def cfg(self) -> AgentConfig:
        return self.intake.cfg

    @cfg.setter
    def cfg(self, cfg: AgentConfig) -> None:
        self.intake.cfg = cfg

    @property
    def desired(self) -> DesiredState | None:
        return self.intake.desired

    @property
    def trust(self) -> Trust:
        return self.intake.trust

    async def set_trust(self, trust: Trust) -> None:
        """A new signature policy (configuration reload): re-judge the desired state,
        and stop an attempt in flight whose artifact the policy now refuses."""
        async with self._intake_lock:
            self.intake.set_trust(trust)
        await self.reconsider()

    async def reconsider(self) -> None:
        """Judge the applied document again after a reload (a new device type picks
        another artifact; a new policy refuses one): targets that changed are
        ``pending`` first, and an attempt in flight for an old target stops."""
        async with self._intake_lock:
            if self.desired is not None:
                await self._supersede(self.desired)
                self.intake.mark_pending(self.desired)
                await self.persist()
        self.trigger()

    # ------------------------------------------------------------ desired in
    async def offer_desired(self, payload: bytes) -> bool:
        """Accept or reject a desired document. Returns whether it was accepted."""
        async with self._intake_lock:
            return await self.intake.take_in(payload, self._supersede)

    def _plan(self, desired: DesiredState | None = None) -> list[Step]:
        return plan(
            desired if desired is not None else self.desired,
            self.state.flows,
            device_type=self.cfg.device_type,
            now=time.time(),
            hold=self.updates.hold_fn(self.host.defer_until),
        )

    async def _supersede(self, desired: DesiredState) -> None:
        task = self._run_task
        if task is None or task.done():
            return
        new_plan = self._plan(desired)
        new_targets = {
            s.target.flow_id: s.target.key for s in new_plan if isinstance(s, Download | Defer)
        }
        changed = {f for f, key in self._active.items() if new_targets.get(f) != key}
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.executors.settle()  # a swap that began completes (and is recorded)
        for flow_id in sorted(changed):
            rec = self.state.flows.get(flow_id)
            # Only an attempt still in progress is aborted; one whose activation
            # completed while we waited for the run to stop stays a success.
            if rec is not None and rec.status in IN_PROGRESS:
                self.records.transition(
                    flow_id,
                    Status.ABORTED,
                    error=f"superseded by generation {desired.generation}",
                    inflight=None,
                )

    def trigger(self) -> None:
        self._trigger.set()

    def _completed(self, flow_id: str) -> None:
        """An attempt activated: a newer document can no longer abort it."""
        self._active.pop(flow_id, None)

    # ------------------------------------------------------------ transitions
    def _announce(self, flow_id: str, rec: FlowRecord, previous: Status | None) -> None:
        """Every status change (from :class:`FlowRecords`): log, event, state report."""
        status = rec.status
        if previous is None or previous != status or status == Status.FAILURE:
            log.info(
                "flow status",
                flow_id=flow_id,
                device_id=self.device_id,
                status=status.value,
                version=rec.desired_version,
                error=rec.error,
            )
            self.reporter.event(flow_id, rec)
        self.reporter.mark_dirty(urgent=status not in IN_PROGRESS)
        if previous != status:
            self.on_status(flow_id, status)

    def persist_soon(self) -> None:
        """Persist from synchronous code (a fire-and-forget, still ordered, write)."""
        task = asyncio.get_running_loop().create_task(self.persist(), name="persist")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_persist_done)

    async def persist(self) -> None:
        """Write the state now (ordered, survives cancellation of the caller)."""
        await self._writer.write(serialise(self.state))

    # ------------------------------------------------------------ the loop
    async def run_forever(self) -> None:
        self.health.resume()  # probations saved before a restart go on
        runs_without_trigger = 0
        wake_at: float | None = None  # the earliest retry the last plan waits for
        self.trigger()
        while True:
            # (at least MIN_WAKE_S: a wait that is already due must not spin the loop)
            timeout = None if wake_at is None else max(MIN_WAKE_S, wake_at - time.time())
            try:
                await asyncio.wait_for(self._trigger.wait(), timeout)
                self._trigger.clear()
                runs_without_trigger = 0
            except TimeoutError:
                pass
            while True:
                async with self._intake_lock:  # no run from a document still being taken in
                    if self._trigger.is_set():  # new work (a document, a command), not a
                        self._trigger.clear()  # planner that does not settle
                        runs_without_trigger = 0
                    steps = self._plan()  # one plan per run: its waits give the next wake
                    work = [s for s in steps if not isinstance(s, Wait)]
                    waits = [s.until for s in steps if isinstance(s, Wait)]
                    wake_at = min(waits) if waits else None
                    runs_without_trigger += 1 if work else 0
                    settling = runs_without_trigger <= MAX_RUNS_WITHOUT_TRIGGER
                    if work and settling:
                        self._run_task = asyncio.create_task(self._run(work), name="reconcile-run")
                if not work:
                    break
                if not settling:
                    log.error("reconcile loop is not settling; backing off", steps=len(work))
                    await asyncio.sleep(5)
                    runs_without_trigger = 0
                    break
                assert self._run_task is not None
                try:
                    await self._run_task
                except asyncio.CancelledError:
                    if self._run_task.cancelled() and not _current_task_cancelling():
                        break  # superseded: offer_desired triggers the next run
                    raise
                finally:
                    self._run_task = None

    async def _run(self, steps: Sequence[Step]) -> None:
        self.runs += 1
        by_flow: dict[str, list[Step]] = {}
        for step in steps:
            by_flow.setdefault(flow_id_of(step), []).append(step)
        async with asyncio.TaskGroup() as tg:
            for flow_id, flow_steps in by_flow.items():
                tg.create_task(self._run_flow(flow_id, flow_steps), name=f"reconcile-{flow_id}")
        await collect_garbage(self.records, self.desired, self.artifacts, self.host)

    async def _run_flow(self, flow_id: str, steps: list[Step]) -> None:
        structlog.contextvars.bind_contextvars(flow_id=flow_id, device_id=self.device_id)
        chain = Chain()
        target = next((s.target for s in steps if isinstance(s, Download)), None)
        if target is not None:
            self._active[flow_id] = target.key
            capture.start(self.device_id, flow_id, self.cfg.reconcile.log_lines)
        try:
            async with self.flow_lock(flow_id):  # no health verdict in between
                for step in steps:
                    chain.steps.append(type(step).__name__)
                    await self.executors.execute(step, chain)
        except asyncio.CancelledError:
            if chain.runner is not None and self.host.running.get(flow_id) is not chain.runner:
                chain.runner.stop()
            raise
        except Exception as exc:
            if chain.runner is not None and self.host.running.get(flow_id) is not chain.runner:
                chain.runner.stop()
            if not isinstance(exc, AgentError):
                log.exception("internal error in reconcile step", steps=chain.steps)
            reason = str(exc) if isinstance(exc, AgentError) else f"internal error: {exc!r}"
            if target is not None:
                rc = self.cfg.reconcile
                await self.executors.fail(
                    flow_id,
                    target,
                    reason,
                    backoff=(rc.retry_backoff_initial, rc.retry_backoff_max),
                    device_id=self.device_id,
                    log_lines=rc.log_lines,
                )
            else:
                log.error("step failed", error=reason)
        finally:
            self._active.pop(flow_id, None)
            if target is not None:
                capture.take(self.device_id, flow_id)

    async def close(self) -> None:
        await self.health.close()
        task = self._run_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.executors.settle()
        await self.persist()
        self._writer.close()


def _persist_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cannot persist state", error=str(task.exception()))


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
