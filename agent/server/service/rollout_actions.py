"""The two transitions of a rollout that write desired documents: starting devices (a
phase, or devices enrolled into a started one) and halting it (an abort through the
API, or the failure threshold).

Each is one change of the desired writer: the documents, the deployment attempts and
the rollout's rows commit together or not at all. The rows are re-checked inside
that transaction, with the rollout's row locked (after the devices' rows, the
writer's order): if another server process got there first (it started the same
devices, or finished the rollout), the change is rolled back and nothing is
published. The lock order is the same everywhere (devices, then a rollout), so
these transactions never wait on each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.orm import Session

from agent.server.db import artifacts as artifacts_repo
from agent.server.db import devices as devices_repo
from agent.server.db import flow_versions as versions_repo
from agent.server.db import rollouts as repo
from agent.server.db.models import Application, DeploymentAttempt, Rollout, utcnow
from agent.server.errors import NotFound, ServerError, Unprocessable
from agent.server.service.desired import EntryFor, version_entry
from agent.server.service.phases import FINAL

if TYPE_CHECKING:
    from agent.server.context import ServerContext

log = structlog.get_logger("agent.server.rollouts")

#: The Losant resource a rollout's records are listed under.
KIND = "edge"
#: Tries of a halt whose devices changed under it.
HALT_TRIES = 5
Plan = dict[str, dict[str, tuple[str | None, EntryFor]]]
Attempts = dict[tuple[str, str], DeploymentAttempt]


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
    """An entry maker with the rollout's ``retries`` and health window."""
    opts = rollout.options or {}

    def made(deployment_id: str) -> dict[str, Any]:
        entry = make(deployment_id)
        entry["retries"] = rollout.retries
        health = dict(entry.get("health") or {})
        if opts.get("health_window") is not None:
            health["window"] = opts["health_window"]
        if opts.get("revert") is not None:
            health["revert"] = opts["revert"]
        if health:
            entry["health"] = health
        return entry

    return made


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
            row = next((p for p in repo.phases(s, rollout_id) if p.number == phase), None)
            if row is None or row.started is not None:
                raise Stale(f"phase {phase} started meanwhile")
            row.started = now
            repo.add_event(s, rollout_id, "phase_started", time=now, phase=phase)
        for device_id in device_ids:
            d = repo.device(s, rollout_id, device_id)
            if d is None or d.attempt_id is not None or d.status != "pending":
                raise Stale(f"device {device_id} started meanwhile")
            choice = choices[device_id]
            d.device_type = choice.device_type
            d.started = now
            attempt = attempts.get((device_id, choice.flow_id or ""))
            if choice.artifact_id is None:
                _final(s, d, "noartifact", choice.reason, now)
            elif attempt is None:  # decommissioned or deleted meanwhile
                _final(s, d, "decommissioned", "the device was decommissioned", now)
            else:
                d.artifact_id, d.flow_id, d.attempt_id = (
                    choice.artifact_id,
                    choice.flow_id,
                    attempt.id,
                )
                repo.add_event(
                    s,
                    rollout_id,
                    "device_started",
                    device_id,
                    time=now,
                    artifact=choice.artifact_id,
                    flow=choice.flow_id,
                    attempt=attempt.id,
                )

    ctx.writer.change(app, plan, KIND, on_recorded=record)


def _plan_start(
    ctx: ServerContext, s: Session, app: Application, rollout: Rollout, device_ids: list[str]
) -> tuple[Plan, dict[str, Choice]]:
    """Each device's artifact (the first of the rollout's name that serves its type)
    and the entries to write."""
    plan: Plan = {}
    choices: dict[str, Choice] = {}
    arts = artifacts_repo.by_name(s, app.id, rollout.artifact_name)
    rows = devices_repo.get_many(s, app.id, device_ids)
    makers: dict[tuple[str, str], EntryFor | None] = {}
    for device_id in device_ids:
        dev = rows.get(device_id)
        dtype = dev.device_type if dev is not None else None
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


def _final(s: Session, d: Any, status: str, substate: str | None, now: datetime) -> None:
    repo.add_event(
        s, d.rollout_id, "device_status", d.device_id, time=now, status=status, before=d.status
    )
    d.status, d.substate, d.finished = status, substate, now


def abort_entry(entry: dict[str, Any], attempt_id: str) -> EntryFor:
    """The entry that aborts attempt ``attempt_id`` (protocol.md § Abort) and puts the
    previous version back where it had activated."""
    body = {k: v for k, v in entry.items() if k not in ("abort", "revert")}
    body.update({"abort": True, "revert": True, "deploymentId": attempt_id})
    return lambda _new_id: dict(body)


def halt(ctx: ServerContext, app: Application, rollout_id: str, *, reason: str | None) -> None:
    """Finish a rollout before its end: an abort (``reason`` None) or a stop. Devices
    not started never start (``aborted``); devices in progress get an abort entry that
    reverts them (``aborted``); finished devices keep their status. 404 for an
    unknown rollout, 422 for a finished one."""
    for _ in range(HALT_TRIES):
        try:
            _halt_once(ctx, app, rollout_id, reason)
        except Stale:
            continue
        else:
            return
    raise ServerError(f"rollout {rollout_id} kept changing; not halted")


def _in_flight(devices: Iterable[Any]) -> dict[str, str]:
    return {d.device_id: d.attempt_id for d in devices if d.attempt_id and d.status not in FINAL}


def _halt_once(ctx: ServerContext, app: Application, rollout_id: str, reason: str | None) -> None:
    now = utcnow()
    with ctx.db.transaction() as s:
        rollout = repo.get(s, app.id, rollout_id)
        if rollout is None:
            raise NotFound("Deployment was not found")
        if rollout.status == "finished":
            raise Unprocessable("The deployment has finished already")
        devs = repo.devices(s, rollout_id)
        flows = {d.device_id: d.flow_id for d in devs}
        expected = _in_flight(devs)
        rows = devices_repo.get_many(s, app.id, list(expected))
        plan: Plan = {}
        for device_id, attempt_id in expected.items():
            dev = rows.get(device_id)
            flow_id = flows[device_id] or ""
            entry = ((dev.desired or {}).get("flows") or {}).get(flow_id) if dev else None
            # (An entry another release replaced since has nothing of this rollout left.)
            if isinstance(entry, dict) and entry.get("deploymentId") == attempt_id:
                plan[device_id] = {flow_id: (entry.get("version"), abort_entry(entry, attempt_id))}

    def record(s: Session, attempts: Attempts) -> None:
        rollout = repo.get(s, app.id, rollout_id, lock=True)
        if rollout is None:
            raise NotFound("Deployment was not found")
        if rollout.status == "finished":
            raise Unprocessable("The deployment has finished already")
        devs = repo.devices(s, rollout_id)
        if _in_flight(devs) != expected:
            raise Stale("devices changed meanwhile")
        for attempt in attempts.values():  # (the abort entries' own records)
            attempt.status, attempt.finished = "aborted", now
            attempt.error = "abort of the rollout's deployment"
        why = "aborted by the user" if reason is None else f"stopped: {reason}"
        for d in devs:
            if d.status not in FINAL:
                _final(s, d, "aborted", why, now)
        rollout.status, rollout.finished = "finished", now
        if reason is None:
            rollout.aborted = True
            repo.add_event(s, rollout_id, "aborted", time=now, reverted=sorted(plan))
        else:
            rollout.stopped = reason
            repo.add_event(s, rollout_id, "stopped", time=now, reason=reason, reverted=sorted(plan))
        repo.add_event(s, rollout_id, "finished", time=now)

    ctx.writer.change(app, plan, KIND, on_recorded=record)
