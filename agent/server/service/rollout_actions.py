"""What moves a rollout's devices: reading their reports into Mender statuses
(:func:`observe`), starting devices (a phase, or devices enrolled into a started
one) and halting a rollout (an abort through the API, or the failure threshold).

Starting is one change of the desired writer: the documents, the deployment
attempts and the rollout's rows commit together or not at all. The rows are
re-checked inside that transaction, with the rollout's row locked (after the
devices' rows, the writer's order): if another server process got there first (it
started the same devices, or finished the rollout), the change is rolled back and
nothing is published.

A halt is two steps, so that it never fails half-way for good:

1. :func:`halt_durable`, in a transaction that holds the rollout's row locked: the
   current reports are read first (a device that finished since the last look keeps
   its real status), then every device not final is ``aborted`` (those not started
   never start), the rollout is ``finished`` (``aborted`` or ``stopped``) and
   ``halting``. One commit; the API answers once it is in.
2. :func:`write_aborts`: an abort entry for each device that was in progress, each
   written only over the entry it aborts and only while the device's report does not
   show that attempt final (both checked under the device's lock, by the writer's
   ``keep``): a newer release is never overwritten and a finished attempt is never
   reverted (such a device gets its real status). When it commits, ``halting`` is
   cleared. It is idempotent: a process that dies between the two steps leaves a
   ``halting`` rollout, and the next engine look (any process) writes what is left.

The lock order is the same everywhere (devices, then a rollout), so these
transactions never wait on each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.orm import Session

from agent.server.db import artifacts as artifacts_repo
from agent.server.db import flow_versions as versions_repo
from agent.server.db import rollouts as repo
from agent.server.db.deployments import NewAttempt
from agent.server.db.models import Application, Device, Rollout, utcnow
from agent.server.errors import ServerError
from agent.server.service.desired import EntryFor, version_entry
from agent.server.service.phases import FINAL, Observed, device_status

if TYPE_CHECKING:
    from agent.server.context import ServerContext

log = structlog.get_logger("agent.server.rollouts")

#: The Losant resource a rollout's records are listed under.
KIND = "edge"
Plan = dict[str, dict[str, tuple[str | None, EntryFor]]]
Attempts = dict[tuple[str, str], NewAttempt]


class Stale(ServerError):
    """The rollout changed between planning a change and committing it."""


@dataclass(frozen=True)
class Choice:
    """What a device gets: an artifact of the rollout's name for its type, or none."""

    artifact_id: str | None
    flow_id: str | None
    device_type: str | None
    reason: str | None = None


def entry_options(rollout: Rollout, make: EntryFor) -> EntryFor:
    """An entry maker with the rollout's ``retries`` and health window. The entry is
    made once and copied per device with its own ``deploymentId`` (its nested parts
    are shared: nothing changes a desired entry in place)."""
    opts = rollout.options or {}
    base = make("")
    base["retries"] = rollout.retries
    health = dict(base.get("health") or {})
    if opts.get("health_window") is not None:
        health["window"] = opts["health_window"]
    if opts.get("revert") is not None:
        health["revert"] = opts["revert"]
    if health:
        base["health"] = health

    def made(deployment_id: str) -> dict[str, Any]:
        return {**base, "deploymentId": deployment_id}

    return made


# ------------------------------------------------------------------ observing
def observe(
    s: Session,
    r: Rollout,
    now: datetime,
    since: datetime | None,
    only: Sequence[str] | None = None,
) -> int:
    """The statuses of the rollout's started devices that are not final yet, from
    their rows: only those whose row changed at or after ``since`` (None: all), and
    every one whose row is gone (``only``: of these devices). Returns how many
    changed status.

    ====================================  ==========================================
    the device                            status
    ====================================  ==========================================
    its report names the attempt          as :func:`phases.device_status` says
    a final status there                  that status, whatever happened since
    gone or decommissioned                ``decommissioned``
    its desired entry for the flow has    ``aborted`` (``superseded by …``): the
    another ``deploymentId`` (or none)    rollout's attempt will never report again
    ====================================  ==========================================
    """
    rows = repo.in_flight(s, r.application_id, r.id, since, sorted(FINAL), only)
    seen: dict[str, Observed] = {}
    check: list[repo.InFlight] = []
    for row in rows:
        flows = (row.state or {}).get("flows") if row.present else None
        flow = flows.get(row.flow_id) if isinstance(flows, dict) and row.flow_id else None
        got = device_status(flow if isinstance(flow, dict) else None, row.attempt_id)
        if got is not None and got.status in FINAL:
            seen[row.device_id] = got
        elif not row.present or row.decommissioned:
            why = "the device was decommissioned" if row.present else "the device is gone"
            seen[row.device_id] = Observed("decommissioned", why, "")
        else:
            check.append(row)
            if got is not None:
                seen[row.device_id] = got
    # Still the rollout's entry on the device? (Its desired documents, only now.)
    desired = repo.desired_of(s, r.application_id, [row.device_id for row in check])
    for row in check:
        entries = (desired.get(row.device_id) or {}).get("flows")
        entry = entries.get(row.flow_id) if isinstance(entries, dict) and row.flow_id else None
        other = entry.get("deploymentId") if isinstance(entry, dict) else None
        if other != row.attempt_id:
            seen[row.device_id] = Observed("aborted", superseded_by(s, r, entry, other), "")
    before = {row.device_id: (row.status, row.substate) for row in rows}
    changed = {d: got for d, got in seen.items() if (got.status, got.substate) != before[d]}
    if not changed:
        return 0
    repo.add_events(
        s,
        [
            repo.event_row(
                r.id,
                "device_status",
                device_id,
                now,
                status=got.status,
                before=before[device_id][0],
                substate=got.substate,
            )
            for device_id, got in sorted(changed.items())
            if got.status != before[device_id][0]
        ],
    )
    repo.update_devices(
        s,
        r.id,
        [
            {
                "device_id": device_id,
                "status": got.status,
                "substate": got.substate,
                "finished": now if got.status in FINAL else None,
            }
            for device_id, got in sorted(changed.items())
        ],
    )
    return len(changed)


def superseded_by(s: Session, r: Rollout, entry: dict[str, Any] | None, other: Any) -> str:
    """Why a device's entry no longer is the rollout's: what replaced it."""
    if not isinstance(entry, dict) or not isinstance(other, str):
        return "superseded: the flow's entry was removed from the device's document"
    owner = repo.rollout_of_attempt(s, r.application_id, other)
    if owner is not None and owner[0] != r.id:
        return f"superseded by deployment {owner[1]!r} ({owner[0]})"
    if entry.get("version") == "":
        return f"superseded by the flow's removal (deployment attempt {other})"
    return f"superseded by a release of version {entry.get('version')!r} (attempt {other})"


# ------------------------------------------------------------------ starting
def start_devices(
    ctx: ServerContext,
    app: Application,
    rollout_id: str,
    device_ids: list[str],
    phase: int | None,
) -> None:
    """Write the entries of ``device_ids`` (pending, not started) and, if ``phase`` is
    given, mark that phase started; raises :class:`Stale` if someone else did."""
    now = utcnow()
    with ctx.db.transaction() as s:
        rollout = repo.get(s, app.id, rollout_id)
        if rollout is None:
            raise Stale("the rollout is gone")
        plan, choices = _plan_start(ctx, s, app, rollout, device_ids)

    def record(s: Session, attempts: Attempts) -> None:
        rollout = repo.get(s, app.id, rollout_id, lock=True)
        if rollout is None or rollout.status == "finished":
            raise Stale("the rollout finished meanwhile")
        if phase is not None:
            started = next((p for p in repo.phases(s, rollout_id) if p.number == phase), None)
            if started is None or started.started is not None:
                raise Stale(f"phase {phase} started meanwhile")
            started.started = now
            repo.add_event(s, rollout_id, "phase_started", time=now, phase=phase)
        have = repo.progress_of(s, rollout_id, device_ids)
        events: list[dict[str, Any]] = []
        changes: list[dict[str, Any]] = []
        for device_id in device_ids:
            if have.get(device_id) != ("pending", None):
                raise Stale(f"device {device_id} started meanwhile")
            choice = choices[device_id]
            attempt = attempts.get((device_id, choice.flow_id or ""))
            row: dict[str, Any] = {
                "device_id": device_id,
                "device_type": choice.device_type,
                "started": now,
                "artifact_id": None,
                "flow_id": None,
                "attempt_id": None,
                "status": "pending",
                "substate": None,
                "finished": None,
            }
            if choice.artifact_id is None or attempt is None:
                # (No artifact for its type; or decommissioned or deleted meanwhile.)
                status, why = (
                    ("noartifact", choice.reason)
                    if choice.artifact_id is None
                    else ("decommissioned", "the device was decommissioned")
                )
                row.update(status=status, substate=why, finished=now)
                events.append(
                    repo.event_row(
                        rollout_id, "device_status", device_id, now, status=status, before="pending"
                    )
                )
            else:
                row.update(artifact_id=choice.artifact_id, flow_id=choice.flow_id)
                row["attempt_id"] = attempt.id
                events.append(
                    repo.event_row(
                        rollout_id,
                        "device_started",
                        device_id,
                        now,
                        artifact=choice.artifact_id,
                        flow=choice.flow_id,
                        attempt=attempt.id,
                    )
                )
            changes.append(row)
        repo.update_devices(s, rollout_id, changes)
        repo.add_events(s, events)

    ctx.writer.change(app, plan, KIND, on_recorded=record)


def _plan_start(
    ctx: ServerContext, s: Session, app: Application, rollout: Rollout, device_ids: list[str]
) -> tuple[Plan, dict[str, Choice]]:
    """Each device's artifact (the first of the rollout's name that serves its type)
    and the entries to write."""
    plan: Plan = {}
    choices: dict[str, Choice] = {}
    arts = artifacts_repo.by_name(s, app.id, rollout.artifact_name)
    types = repo.device_types_of(s, app.id, device_ids)
    makers: dict[tuple[str, str], EntryFor | None] = {}
    for device_id in device_ids:
        dtype = types.get(device_id)
        art = next((a for a in arts if artifacts_repo.matches(a, dtype)), None)
        if art is None:
            why = f"no artifact named {rollout.artifact_name!r} for device type {dtype!r}"
            choices[device_id] = Choice(None, None, dtype, why)
            continue
        key = (art.flow_id, art.version)
        if key not in makers:
            fv = versions_repo.get(s, app.id, art.flow_id, art.version)
            makers[key] = (
                entry_options(
                    rollout, version_entry(app, ctx.cfg.base_url, fv, ctx.cfg.mqtt_artifact_limit)
                )
                if fv is not None
                else None
            )
        make = makers[key]
        if make is None:
            why = f"the flow version {art.flow_id} {art.version} of artifact {art.id} is gone"
            choices[device_id] = Choice(None, None, dtype, why)
            continue
        choices[device_id] = Choice(art.id, art.flow_id, dtype)
        plan[device_id] = {art.flow_id: (art.version, make)}
    return plan, choices


# ------------------------------------------------------------------ halting
def abort_entry(entry: dict[str, Any], attempt_id: str, revert: bool) -> EntryFor:
    """The entry that aborts attempt ``attempt_id`` (protocol.md § Abort); with
    ``revert``, a version that activated is replaced by the previous one."""
    body = {k: v for k, v in entry.items() if k not in ("abort", "revert")}
    body.update({"abort": True, "revert": revert, "deploymentId": attempt_id})
    return lambda _new_id: dict(body)


def halt_durable(s: Session, r: Rollout, reason: str | None, now: datetime) -> list[str]:
    """Step 1 of a halt (an abort when ``reason`` is None, else a stop), in the
    caller's transaction, which holds ``r`` locked and has observed the reports:
    every device not final becomes ``aborted``; the rollout is finished and, if
    devices were in progress, ``halting``. Returns the devices in progress."""
    why = "aborted by the user" if reason is None else f"stopped: {reason}"
    left = repo.not_final(s, r.id, sorted(FINAL))
    reverting = sorted(device_id for device_id, _status, attempt in left if attempt is not None)
    repo.add_events(
        s,
        [
            repo.event_row(r.id, "device_status", device_id, now, status="aborted", before=status)
            for device_id, status, _attempt in left
        ],
    )
    repo.finish_devices(s, r.id, sorted(FINAL), "aborted", why, now)
    r.status, r.finished, r.halting = "finished", now, bool(reverting)
    if reason is None:
        r.aborted = True
        repo.add_event(s, r.id, "aborted", time=now, reverting=reverting)
    else:
        r.stopped = reason
        repo.add_event(s, r.id, "stopped", time=now, reason=reason, reverting=reverting)
    repo.add_event(s, r.id, "finished", time=now)
    return reverting


def write_aborts(ctx: ServerContext, app: Application, rollout_id: str) -> None:
    """Step 2 of a halt: the abort entries of a ``halting`` rollout's devices that
    were in progress (see the module's docstring); nothing if it is not halting.
    Raises :class:`Stale` if another process finished the job meanwhile."""
    now = utcnow()
    with ctx.db.transaction() as s:
        r = repo.get(s, app.id, rollout_id)
        if r is None or not r.halting:
            return
        revert = bool((r.options or {}).get("revert", True))
        targets = {t.device_id: t for t in repo.abort_targets(s, r.id)}
        desired = repo.desired_of(s, app.id, sorted(targets))
    plan: Plan = {}
    for device_id, t in targets.items():
        flows = (desired.get(device_id) or {}).get("flows")
        entry = flows.get(t.flow_id) if isinstance(flows, dict) else None
        if isinstance(entry, dict) and _abortable(entry, t.attempt_id):
            plan[device_id] = {
                t.flow_id: (entry.get("version"), abort_entry(entry, t.attempt_id, revert))
            }
    #: Devices whose report showed the attempt final under the lock: their status.
    finals: dict[str, Observed] = {}

    def keep(dev: Device, flow_id: str) -> bool:
        t = targets[dev.id]
        flows = (dev.desired or {}).get("flows")
        entry = flows.get(flow_id) if isinstance(flows, dict) else None
        if not isinstance(entry, dict) or not _abortable(entry, t.attempt_id):
            return False  # (replaced by a newer release, or aborted already)
        reported = (dev.state or {}).get("flows")
        flow = reported.get(flow_id) if isinstance(reported, dict) else None
        got = device_status(flow if isinstance(flow, dict) else None, t.attempt_id)
        if got is not None and got.status in FINAL:
            if got.status != "aborted":  # (one the device aborted itself stays so)
                finals[dev.id] = got  # finished here before the abort: never reverted
            return False
        return True

    def record(s: Session, attempts: Attempts) -> None:
        r = repo.get(s, app.id, rollout_id, lock=True)
        if r is None or not r.halting:
            raise Stale("another process wrote the abort entries")
        for attempt in attempts.values():  # (the abort entries' own records)
            attempt.status, attempt.finished = "aborted", now
            attempt.error = "abort of the rollout's deployment"
        repo.add_events(
            s,
            [
                repo.event_row(
                    r.id,
                    "device_status",
                    device_id,
                    now,
                    status=got.status,
                    before="aborted",
                    substate=got.substate,
                )
                for device_id, got in sorted(finals.items())
            ],
        )
        repo.update_devices(
            s,
            r.id,
            [
                {"device_id": device_id, "status": got.status, "substate": got.substate}
                for device_id, got in sorted(finals.items())
            ],
        )
        r.halting = False
        repo.add_event(
            s,
            r.id,
            "aborts_written",
            time=now,
            devices=sorted(d for d, _f in attempts),
            finished_before=sorted(finals),
        )

    ctx.writer.change(app, plan, KIND, on_recorded=record, keep=keep)


def _abortable(entry: dict[str, Any], attempt_id: str) -> bool:
    return entry.get("deploymentId") == attempt_id and not entry.get("abort")


def finish_halt(ctx: ServerContext, app: Application, rollout_id: str, *, kick: bool) -> bool:
    """:func:`write_aborts`, an error logged (the engine tries again: at once if
    ``kick``, else at its next look); returns whether it went through."""
    try:
        write_aborts(ctx, app, rollout_id)
    except Stale:
        return True
    except Exception:
        log.exception("abort entries not written yet; the engine tries again", rollout=rollout_id)
        if kick:
            ctx.engine.kick(urgent=True)
        return False
    return True
