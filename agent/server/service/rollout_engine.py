"""The rollout engine: Mender's phased deployments, run by the server.

One thread per server process looks at every unfinished rollout every
``rollout_tick_s`` seconds, at once when a rollout is created, aborted or a device
decommissioned, and when a phase's start time comes. Device reports do not make it
look more often (a burst of reports is read at the next look: at most one look per
rollout per ``rollout_tick_s``). Per rollout, one transaction holds its row locked
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL: another process's engine skips it this
time; SQLite's writers are serial anyway) and

1. reads the statuses of its started devices that are not final yet
   (:func:`agent.server.service.rollout_actions.observe`): only those whose device
   row changed since the last look (less ``OBSERVE_SLACK_S``, for other processes'
   clocks and commit delays), every ``FULL_LOOK_S`` all of them; a device gone or
   decommissioned is ``decommissioned``, one whose entry another release replaced is
   ``aborted`` (superseded);
2. fails the started devices with no final status within ``edge.device_timeout``;
3. enrols the devices that match a dynamic rollout's filter now (into its last
   phase), while it has fewer than ``max_devices``, skipping devices that another
   unfinished rollout of the same flow holds;
4. checks the failure threshold (:func:`agent.server.service.phases.threshold_exceeded`)
   and stops the rollout (:func:`agent.server.service.rollout_actions.halt_durable`);
5. sees whether the next phase is due: its ``start_ts`` has come, every device of
   the earlier phases is final (``success`` only after its health window) and their
   failures are within the threshold (:func:`agent.server.service.phases.may_start_next`);
6. finishes it when every phase started and every device is final (a dynamic one:
   once ``max_devices`` devices are final; without ``max_devices`` it runs until
   aborted).

The counting is done by the database (``GROUP BY``): a look at a rollout of 10,000
devices where nothing happened reads a few rows. What writes desired documents
(starting devices, the abort entries of a halt) happens after that transaction
commits, through :mod:`agent.server.service.rollout_actions`, which checks again
under the lock. A halted rollout whose abort entries are not all written
(``halting``) is looked at too, until they are. Everything is in the database: a
restarted server, or another process, carries on where the last look left off.
Every transition is a ``RolloutEvent``.

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
``stopped``, ``aborted``, ``aborts_written``, ``finished``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.server.db import applications as apps_repo
from agent.server.db import artifacts as artifacts_repo
from agent.server.db import rollouts as repo
from agent.server.db.models import Device, Rollout, RolloutPhase, utcnow
from agent.server.service import inventory_filter
from agent.server.service.phases import FINAL, may_start_next, threshold_exceeded
from agent.server.service.rollout_actions import (
    Stale,
    finish_halt,
    halt_durable,
    observe,
    start_devices,
)

if TYPE_CHECKING:
    from agent.server.context import ServerContext

log = structlog.get_logger("agent.server.rollouts")

#: Seconds of overlap when reading the device rows changed since the last enrolment
#: scan: the rows are stamped by whichever server process wrote them, by its clock,
#: at its flush, and committed later. Enrolling is checked again (idempotent).
SCAN_SLACK_S = 60.0
#: The same for the started devices' rows (a report missed by it is read at the next
#: full look, ``FULL_LOOK_S`` later).
OBSERVE_SLACK_S = 10.0
#: Seconds between looks that read every started device of a rollout, changed or not.
FULL_LOOK_S = 60.0
#: Seconds between enrolment scans of every device of the application (devices
#: another rollout held at the last scan are enrolled once it let them go).
FULL_SCAN_S = 60.0


@dataclass
class Next:
    """What a look at a rollout decided to do once its transaction committed."""

    halt: bool = False
    start: list[str] = field(default_factory=list)
    phase: int | None = None
    due: datetime | None = None
    #: When the enrolment scan began (recorded once the look committed).
    scanned: datetime | None = None
    full_scan: bool = False


class RolloutEngine:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._wake = threading.Event()
        #: Rollout id → (the start of its last committed look, of its last full one).
        #: Only an optimisation: a new process reads everything once.
        self._looked: dict[str, tuple[datetime, datetime]] = {}
        #: Rollout id → (the start of its last enrolment scan, of its last full one).
        self._scanned: dict[str, tuple[datetime, datetime]] = {}
        self._due: datetime | None = None
        self._last = 0.0
        self._urgent = False

    def kick(self, urgent: bool = False) -> None:
        """``urgent`` (a rollout created or aborted, a device decommissioned): look at
        once. Otherwise (devices reported; the server stopping) wake the loop only:
        the reports are read at the next look, within ``rollout_tick_s``."""
        if urgent:
            self._urgent = True
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        tick = self.ctx.cfg.rollout_tick_s
        while not stop.is_set():
            wait = tick - (time.monotonic() - self._last)
            if self._due is not None:
                wait = min(wait, (self._due - utcnow()).total_seconds() + 0.01)
            if wait > 0 and not self._urgent:
                self._wake.wait(wait)
                self._wake.clear()
                if not self._urgent:
                    continue  # (woken early by reports, or to stop: look again when due)
            if stop.is_set():
                return
            self._urgent = False
            self._last = time.monotonic()
            try:
                self.tick()
            except Exception:  # the database away for a moment: never the end of the loop
                log.exception("rollout engine tick failed")
                stop.wait(tick)

    def tick(self) -> None:
        """One look at every unfinished (or halting) rollout."""
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
        self._looked = {r: t for r, t in self._looked.items() if r in live}
        self._scanned = {r: t for r, t in self._scanned.items() if r in live}

    def step(self, app_id: str, rollout_id: str) -> None:
        now = utcnow()
        since, full = self._since(rollout_id, now)
        with self.ctx.db.transaction() as s:
            rollout = repo.lock_active(s, rollout_id)
            if rollout is None:
                return
            app = apps_repo.get_application(s, app_id)
            if app is None:
                return
            if rollout.status == "finished":  # halted, abort entries still to write
                nxt = Next(halt=True)
            else:
                nxt = self._look(s, rollout, now, since)
        # Committed: what the next look may leave out.
        last_full = now if full else self._looked[rollout_id][1]
        self._looked[rollout_id] = (now, last_full)
        if nxt.scanned is not None:
            before = self._scanned.get(rollout_id)
            full_at = nxt.scanned if nxt.full_scan or before is None else before[1]
            self._scanned[rollout_id] = (nxt.scanned, full_at)
        if nxt.due is not None and (self._due is None or nxt.due < self._due):
            self._due = nxt.due
        if nxt.halt:
            finish_halt(self.ctx, app, rollout_id, kick=False)
        elif nxt.start or nxt.phase is not None:
            start_devices(self.ctx, app, rollout_id, nxt.start, nxt.phase)

    def _since(self, rollout_id: str, now: datetime) -> tuple[datetime | None, bool]:
        """From when the device rows are read this look (None: all), and whether
        this is a full look."""
        last = self._looked.get(rollout_id)
        if last is None or (now - last[1]).total_seconds() >= FULL_LOOK_S:
            return None, True
        return last[0] - timedelta(seconds=OBSERVE_SLACK_S), False

    # ------------------------------------------------------------------ one look
    def _look(self, s: Session, r: Rollout, now: datetime, since: datetime | None) -> Next:
        phases = repo.phases(s, r.id)
        opts = r.options or {}
        observe(s, r, now, since)
        _time_out(s, r, opts.get("device_timeout"), now)
        nxt = Next()
        if r.dynamic and r.filter:
            nxt.full_scan = self._enrol(s, r, phases, now)
            nxt.scanned = now
        s.flush()
        counts = repo.phase_status_counts(s, r.id)
        totals: Counter[str] = Counter()
        for (_phase, status, _sent), n in counts.items():
            totals[status] += n
        threshold = opts.get("failure_threshold")
        if threshold_exceeded(totals, threshold):
            failed = totals["failure"]
            done = failed + totals["success"] + totals["already-installed"]
            halt_durable(
                s, r, f"{failed} of {done} devices failed, over the threshold {threshold}%", now
            )
            nxt.halt = True
            return nxt
        started = sorted(p.number for p in phases if p.started is not None)
        if _waiting(counts, started):
            nxt.start = repo.to_start(s, r.id, started)
        upcoming = next((p for p in phases if p.started is None), None)
        if upcoming is not None:
            due = upcoming.start_ts is None or upcoming.start_ts <= now
            earlier: Counter[str] = Counter()
            for (phase, status, _sent), n in counts.items():
                if phase < upcoming.number:
                    earlier[status] += n
            if due and may_start_next(earlier, threshold):
                nxt.phase = upcoming.number
                nxt.start += repo.to_start(s, r.id, [upcoming.number])
            elif not due:
                nxt.due = upcoming.start_ts
        _set_status(s, r, phases, totals, now)
        if upcoming is None and not nxt.start and _complete(r, totals):
            r.status, r.finished = "finished", now
            repo.add_event(s, r.id, "finished", time=now)
        return nxt

    def _enrol(self, s: Session, r: Rollout, phases: list[RolloutPhase], now: datetime) -> bool:
        """Enrol the devices that match now; returns whether every device of the
        application was looked at (else only those changed since the last scan)."""
        have = repo.count_devices(s, r.id)
        room = (r.max_devices - have) if r.max_devices is not None else None
        if room is not None and room <= 0:
            return True
        try:
            terms = inventory_filter.parse(r.filter)
        except inventory_filter.FilterError:
            return True
        stmt = select(
            Device.id,
            Device.name,
            Device.device_type,
            Device.agent_version,
            Device.online,
            Device.tags,
        ).where(Device.application_id == r.application_id, Device.decommissioned.is_(False))
        last = self._scanned.get(r.id)
        full = last is None or (now - last[1]).total_seconds() >= FULL_SCAN_S
        if not full and last is not None:
            stmt = stmt.where(Device.last_updated >= last[0] - timedelta(seconds=SCAN_SLACK_S))
        matching = [
            row.id
            for row in s.execute(stmt.order_by(Device.id))
            if inventory_filter.matches(terms, inventory_filter.attributes(row))
        ]
        if not matching:
            return full
        present = repo.progress_of(s, r.id, matching)
        new = [d for d in matching if d not in present]
        if not new:
            return full
        apps_repo.lock(s, r.application_id)  # (as a creation: one at a time per application)
        held = _held(s, r, new)
        new = [d for d in new if d not in held]
        if room is not None:
            new = new[:room]
        if not new:
            return full
        number = phases[-1].number if phases else 0
        types = repo.device_types_of(s, r.application_id, new)
        repo.insert_devices(
            s,
            [
                {
                    "rollout_id": r.id,
                    "device_id": device_id,
                    "application_id": r.application_id,
                    "phase": number,
                    "status": "pending",
                    "substate": None,
                    "device_type": types.get(device_id),
                    "created": now,
                }
                for device_id in new
            ],
        )
        repo.add_events(
            s,
            [
                repo.event_row(r.id, "device_enrolled", device_id, now, phase=number)
                for device_id in new
            ],
        )
        return full


def _held(s: Session, r: Rollout, device_ids: list[str]) -> dict[str, str]:
    """Of these devices, those another unfinished rollout of one of the same flows
    holds (not final there), with that rollout's id."""
    return held_by_others(s, r.application_id, r.artifact_name, device_ids, exclude=r.id)


def held_by_others(
    s: Session,
    app_id: str,
    artifact_name: str,
    device_ids: list[str] | None,
    exclude: str | None = None,
) -> dict[str, str]:
    """Device id → the unfinished rollout that holds it for one of the flows the
    artifacts named ``artifact_name`` deploy (``device_ids`` None: any device)."""
    flows = {a.flow_id for a in artifacts_repo.by_name(s, app_id, artifact_name)}
    if not flows:
        return {}
    others: dict[str, set[str]] = {}
    names: dict[str, set[str]] = {}
    for rollout_id, _name, art_name in repo.active_naming(s, app_id):
        if rollout_id == exclude:
            continue
        if art_name not in names:
            names[art_name] = {a.flow_id for a in artifacts_repo.by_name(s, app_id, art_name)}
        others[rollout_id] = names[art_name]
    if not others:
        return {}
    return repo.busy(s, app_id, others, device_ids, flows, sorted(FINAL))


def _waiting(counts: dict[tuple[int, str, bool], int], phases: list[int]) -> bool:
    """Whether devices of these phases are pending and were not sent their update."""
    return any(
        n > 0 and phase in phases and status == "pending" and not sent
        for (phase, status, sent), n in counts.items()
    )


def _time_out(s: Session, r: Rollout, timeout: int | None, now: datetime) -> None:
    """``edge.device_timeout``: started devices with no final status within it fail."""
    if not timeout:
        return
    late = repo.timed_out(s, r.id, now - timedelta(seconds=timeout), sorted(FINAL))
    why = f"no final report within {timeout} s"
    repo.add_events(
        s,
        [
            repo.event_row(
                r.id, "device_status", device_id, now, status="failure", before=st, substate=why
            )
            for device_id, st in late
        ],
    )
    repo.update_devices(
        s,
        r.id,
        [
            {"device_id": device_id, "status": "failure", "substate": why, "finished": now}
            for device_id, _st in late
        ],
    )


def _set_status(
    s: Session, r: Rollout, phases: list[RolloutPhase], totals: Counter[str], now: datetime
) -> None:
    first = phases[0] if phases else None
    if first is not None and first.started is None and first.start_ts and first.start_ts > now:
        status = "scheduled"
    elif any(n > 0 and st != "pending" for st, n in totals.items()):
        status = "inprogress"
    else:
        status = "pending"
    if status != r.status:
        repo.add_event(s, r.id, "status", time=now, status=status, before=r.status)
        r.status = status


def _complete(r: Rollout, totals: Counter[str]) -> bool:
    if any(n > 0 and st not in FINAL for st, n in totals.items()):
        return False
    if not r.dynamic:
        return True
    return r.max_devices is not None and sum(totals.values()) >= r.max_devices
