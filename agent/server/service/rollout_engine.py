"""The rollout engine: Mender's phased deployments, run by the server.

One thread per server process looks at every unfinished rollout every
``rollout_tick_s`` seconds, at once when kicked (devices reported, a rollout was
created or a device decommissioned), and when a phase's start time comes. Per
rollout, one transaction holds its row locked (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL: another process's engine skips it this time; SQLite's writers are serial
anyway) and

1. reads the statuses of its started devices from their state reports
   (:func:`agent.server.service.phases.device_status`);
2. enrols the devices that match a dynamic rollout's filter now (into its last
   phase), while it has fewer than ``max_devices``;
3. checks the failure threshold (:func:`agent.server.service.phases.threshold_exceeded`);
4. sees whether the next phase is due: its ``start_ts`` has come and every device of
   the earlier phases is final (``success`` only after its health window);
5. finishes it when every phase started and every device is final (a dynamic one:
   once ``max_devices`` devices are final; without ``max_devices`` it runs until
   aborted).

What writes desired documents (starting devices, stopping at the threshold) happens
after that transaction commits, through :mod:`agent.server.service.rollout_actions`,
which checks again under the lock. Everything is in the database: a restarted server,
or another process, carries on where the last look left off. Every transition is a
``RolloutEvent``.

=============  =========================================================  ==========
status         condition                                                  next
=============  =========================================================  ==========
scheduled      the first phase's start time has come                      pending
pending        a device left ``pending`` (or got ``noartifact``)          inprogress
pending,       the failure threshold is exceeded                          finished
inprogress                                                                (stopped)
any but        ``PUT …/status {"status": "aborted"}``                     finished
finished                                                                  (aborted)
pending,       every phase started, every device final (dynamic: and      finished
inprogress     ``max_devices`` devices final)
=============  =========================================================  ==========

Events: ``created``, ``status`` (the rollout's), ``phase_started``,
``device_enrolled``, ``device_started``, ``device_status``, ``device_decommissioned``,
``stopped``, ``aborted``, ``finished``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.server.db import applications as apps_repo
from agent.server.db import devices as devices_repo
from agent.server.db import rollouts as repo
from agent.server.db.models import Device, Rollout, RolloutDevice, RolloutPhase, utcnow
from agent.server.errors import Unprocessable
from agent.server.service import inventory_filter
from agent.server.service.phases import FINAL, device_status, threshold_exceeded
from agent.server.service.rollout_actions import Stale, halt, start_devices

if TYPE_CHECKING:
    from agent.server.context import ServerContext

log = structlog.get_logger("agent.server.rollouts")

#: Seconds of overlap when looking for devices changed since the last enrolment scan.
SCAN_SLACK_S = 2.0


@dataclass
class Next:
    """What a look at a rollout decided to do once its transaction committed."""

    stop: str | None = None
    start: list[str] = field(default_factory=list)
    phase: int | None = None
    due: datetime | None = None


class RolloutEngine:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._kick = threading.Event()
        #: Rollout id → when its dynamic filter last looked at every device (only an
        #: optimisation: a new process looks at all of them once).
        self._scanned: dict[str, datetime] = {}
        self._due: datetime | None = None

    def kick(self) -> None:
        self._kick.set()

    def run(self, stop: threading.Event) -> None:
        tick = self.ctx.cfg.rollout_tick_s
        while not stop.is_set():
            wait = tick
            if self._due is not None:
                wait = min(tick, max((self._due - utcnow()).total_seconds(), 0.0) + 0.01)
            self._kick.wait(wait)
            self._kick.clear()
            if stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # the database away for a moment: never the end of the loop
                log.exception("rollout engine tick failed")
                stop.wait(tick)

    def tick(self) -> None:
        """One look at every unfinished rollout."""
        with self.ctx.db.transaction() as s:
            active = repo.active(s)
        self._due = None
        for app_id, rollout_id in active:
            try:
                self.step(app_id, rollout_id)
            except Stale as exc:
                log.info("rollout changed meanwhile; next look", rollout=rollout_id, why=str(exc))
            except Exception:
                log.exception("rollout step failed", rollout=rollout_id)
        live = {r for _a, r in active}
        self._scanned = {r: t for r, t in self._scanned.items() if r in live}

    def step(self, app_id: str, rollout_id: str) -> None:
        with self.ctx.db.transaction() as s:
            rollout = repo.lock_active(s, rollout_id)
            if rollout is None:
                return
            app = apps_repo.get_application(s, app_id)
            if app is None:
                return
            nxt = self._look(s, rollout)
        if nxt.due is not None and (self._due is None or nxt.due < self._due):
            self._due = nxt.due
        if nxt.stop is not None:
            log.warning("rollout stopped", rollout=rollout_id, reason=nxt.stop)
            try:
                halt(self.ctx, app, rollout_id, reason=nxt.stop)
            except Unprocessable:  # aborted (or stopped by another process) meanwhile
                return
        elif nxt.start or nxt.phase is not None:
            start_devices(self.ctx, app, rollout_id, nxt.start, nxt.phase)

    # ------------------------------------------------------------------ one look
    def _look(self, s: Session, r: Rollout) -> Next:
        now = utcnow()
        phases = repo.phases(s, r.id)
        devs = repo.devices(s, r.id)
        _observe(s, r, devs, now)
        if r.dynamic and r.filter:
            devs += self._enrol(s, r, devs, phases, now)
        counts = Counter(d.status for d in devs)
        threshold = (r.options or {}).get("failure_threshold")
        if threshold_exceeded(counts, threshold):
            failed, done = (
                counts["failure"],
                sum(counts[k] for k in ("success", "failure", "already-installed")),
            )
            return Next(stop=f"{failed} of {done} devices failed, over the threshold {threshold}%")
        nxt = Next()
        started = {p.number for p in phases if p.started is not None}
        nxt.start = sorted(
            d.device_id
            for d in devs
            if d.phase in started and d.attempt_id is None and d.status == "pending"
        )
        upcoming = next((p for p in phases if p.started is None), None)
        if upcoming is not None:
            due = upcoming.start_ts is None or upcoming.start_ts <= now
            earlier_final = all(d.status in FINAL for d in devs if d.phase < upcoming.number)
            if due and earlier_final:
                nxt.phase = upcoming.number
                nxt.start += sorted(
                    d.device_id
                    for d in devs
                    if d.phase == upcoming.number and d.attempt_id is None and d.status == "pending"
                )
            elif not due:
                nxt.due = upcoming.start_ts
        _set_status(s, r, phases, devs, now)
        if upcoming is None and not nxt.start and _complete(r, devs):
            r.status, r.finished = "finished", now
            repo.add_event(s, r.id, "finished", time=now)
        return nxt

    def _enrol(
        self,
        s: Session,
        r: Rollout,
        devs: list[RolloutDevice],
        phases: list[RolloutPhase],
        now: datetime,
    ) -> list[RolloutDevice]:
        room = (r.max_devices - len(devs)) if r.max_devices is not None else None
        if room is not None and room <= 0:
            return []
        try:
            terms = inventory_filter.parse(r.filter)
        except inventory_filter.FilterError:
            return []
        have = {d.device_id for d in devs}
        stmt = select(Device).where(
            Device.application_id == r.application_id, Device.decommissioned.is_(False)
        )
        since = self._scanned.get(r.id)
        if since is not None:
            stmt = stmt.where(Device.last_updated >= since - timedelta(seconds=SCAN_SLACK_S))
        self._scanned[r.id] = now
        added: list[RolloutDevice] = []
        last = phases[-1].number if phases else 0
        for dev in s.scalars(stmt.order_by(Device.id)):
            if dev.id in have or not inventory_filter.matches(
                terms, inventory_filter.attributes(dev)
            ):
                continue
            if room is not None and len(added) >= room:
                break
            row = RolloutDevice(
                rollout_id=r.id,
                device_id=dev.id,
                application_id=r.application_id,
                phase=last,
                status="pending",
                device_type=dev.device_type,
                created=now,
            )
            s.add(row)
            added.append(row)
            repo.add_event(s, r.id, "device_enrolled", dev.id, time=now, phase=last)
        return added


def _observe(s: Session, r: Rollout, devs: list[RolloutDevice], now: datetime) -> None:
    """Step 1: the statuses of the started devices, from their state reports."""
    live = [d for d in devs if d.attempt_id is not None and d.status not in FINAL]
    if not live:
        return
    rows = devices_repo.get_many(s, r.application_id, [d.device_id for d in live])
    for d in live:
        dev = rows.get(d.device_id)
        flows = (dev.state or {}).get("flows") if dev is not None else None
        flow = flows.get(d.flow_id) if isinstance(flows, dict) and d.flow_id else None
        seen = device_status(flow if isinstance(flow, dict) else None, d.attempt_id)
        if seen is None or (seen.status, seen.substate) == (d.status, d.substate):
            continue
        if seen.status != d.status:
            repo.add_event(
                s,
                r.id,
                "device_status",
                d.device_id,
                time=now,
                status=seen.status,
                before=d.status,
                substate=seen.substate,
            )
        d.status, d.substate = seen.status, seen.substate
        if seen.status in FINAL:
            d.finished = now


def _set_status(
    s: Session, r: Rollout, phases: list[RolloutPhase], devs: list[RolloutDevice], now: datetime
) -> None:
    first = phases[0] if phases else None
    if first is not None and first.started is None and first.start_ts and first.start_ts > now:
        status = "scheduled"
    elif any(d.status != "pending" for d in devs):
        status = "inprogress"
    else:
        status = "pending"
    if status != r.status:
        repo.add_event(s, r.id, "status", time=now, status=status, before=r.status)
        r.status = status


def _complete(r: Rollout, devs: list[RolloutDevice]) -> bool:
    if not all(d.status in FINAL for d in devs):
        return False
    if not r.dynamic:
        return True
    return r.max_devices is not None and len(devs) >= r.max_devices
