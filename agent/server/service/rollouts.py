"""Mender's deployments as objects (called rollouts here): create, abort, decommission
a device, and the reads (:mod:`agent.server.service.rollout_views` shapes them).

A creation is checked whole before anything is stored: the artifact name must name at
least one artifact (else 422), every listed device must exist (else 400, naming
them), the filter must parse and the phases add up (else 400). A device is in at
most one unfinished rollout of a flow: listed devices that another unfinished
rollout of one of the same flows holds (not final there) are a 409 naming them; a
filter leaves them out (a dynamic rollout enrols them once they are let go). The
devices' phases are decided here, once (:func:`agent.server.service.phases.assign`);
the engine starts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from agent.server.context import ServerContext
from agent.server.db import applications as apps_repo
from agent.server.db import artifacts as artifacts_repo
from agent.server.db import rollouts as repo
from agent.server.db.models import (
    Application,
    Device,
    Rollout,
    RolloutPhase,
    utcnow,
)
from agent.server.errors import Conflict, NotFound, Unprocessable, Validation
from agent.server.service import inventory_filter
from agent.server.service.phases import FINAL, PhaseError, PhaseSpec, assign, phase_sizes
from agent.server.service.rollout_actions import finish_halt, halt_durable, observe
from agent.server.service.rollout_engine import held_by_others

#: Devices one rollout may have.
MAX_DEVICES = 10_000
#: An abort writes the abort entries itself for up to this many devices in progress
#: (more: it answers once the abort is stored, and the engine writes them).
SYNC_ABORTS = 500


@dataclass(frozen=True)
class NewRollout:
    """A validated ``NewDeployment`` (shapes and bounds checked by the API's model)."""

    name: str
    artifact_name: str
    devices: list[str] | None
    all_devices: bool
    filter: dict[str, Any] | None
    dynamic: bool
    max_devices: int | None
    retries: int
    phases: list[PhaseSpec]
    #: This project's extension (``failure_threshold``, ``revert``, ``health_window``,
    #: ``device_timeout``).
    options: dict[str, Any]


def create(ctx: ServerContext, app: Application, new: NewRollout) -> str:
    """Store a rollout; returns its id (the engine is kicked to start it)."""
    targets = sum(x for x in (new.devices is not None, new.all_devices, new.filter is not None))
    if targets != 1:
        raise Validation("give exactly one of devices, filter and all_devices")
    if new.dynamic and new.filter is None:
        raise Validation("dynamic: only with a filter")
    if new.max_devices is not None and not new.dynamic:
        raise Validation("max_devices: only with dynamic")
    terms = None
    if new.filter is not None:
        try:
            terms = inventory_filter.parse(new.filter)
        except inventory_filter.FilterError as exc:
            raise Validation(str(exc)) from None
    now = utcnow()
    with ctx.db.transaction() as s:
        # (Creations and enrolments of one application one at a time: two at once
        # could both find a device free and both take it.)
        apps_repo.lock(s, app.id)
        if not artifacts_repo.by_name(s, app.id, new.artifact_name):
            raise Unprocessable(f"No artifact named {new.artifact_name!r}")
        ids = _targets(s, app.id, new, terms)
        if len(ids) > MAX_DEVICES:
            raise Validation(f"{len(ids)} devices: at most {MAX_DEVICES} in one deployment")
        if not ids and not new.dynamic:
            raise Validation("No devices for the deployment")
        try:
            sizes = phase_sizes(len(ids), new.phases)
        except PhaseError as exc:
            raise Validation(str(exc)) from None
        first = new.phases[0].start_ts if new.phases else None
        rollout = Rollout(
            application_id=app.id,
            name=new.name,
            artifact_name=new.artifact_name,
            status="scheduled" if first is not None and first > now else "pending",
            dynamic=new.dynamic,
            filter=_stored_filter(new.filter),
            max_devices=new.max_devices,
            initial_device_count=len(ids) if new.dynamic else None,
            retries=new.retries,
            options=new.options,
            created=now,
        )
        s.add(rollout)
        s.flush()
        specs = new.phases or [PhaseSpec(None, None)]
        s.add_all(
            RolloutPhase(
                rollout_id=rollout.id, number=i, batch_size=p.batch_size, start_ts=p.start_ts
            )
            for i, p in enumerate(specs)
        )
        types = repo.device_types_of(s, app.id, ids)
        repo.insert_devices(
            s,
            [
                {
                    "rollout_id": rollout.id,
                    "device_id": device_id,
                    "application_id": app.id,
                    "phase": phase,
                    "status": "pending",
                    "substate": None,
                    "device_type": types.get(device_id),
                    "created": now,
                }
                for device_id, phase in assign(ids, sizes).items()
            ],
        )
        repo.add_event(s, rollout.id, "created", time=now, devices=len(ids), phases=sizes)
        rollout_id = rollout.id
    ctx.engine.kick(urgent=True)
    return rollout_id


def _targets(
    s: Any, app_id: str, new: NewRollout, terms: list[inventory_filter.Term] | None
) -> list[str]:
    """The devices of a new rollout: those listed (409 if another unfinished rollout
    of one of the same flows holds some), or those matching, less the held ones."""
    if new.devices is not None:
        ids = _listed(s, app_id, new.devices)
        held = held_by_others(s, app_id, new.artifact_name, ids)
        if held:
            shown = ", ".join(f"{d} (deployment {held[d]})" for d in sorted(held)[:10])
            more = ", …" if len(held) > 10 else ""
            raise Conflict(
                f"devices: {len(held)} in another unfinished deployment of the same "
                f"flow: {shown}{more}"
            )
        return ids
    ids = _matching(s, app_id, terms)
    held = held_by_others(s, app_id, new.artifact_name, None) if ids else {}
    if held and not new.dynamic and all(d in held for d in ids):
        raise Conflict(
            f"every matching device ({len(ids)}) is in another unfinished "
            "deployment of the same flow"
        )
    ids = [d for d in ids if d not in held]
    if new.dynamic and new.max_devices is not None:
        ids = ids[: new.max_devices]
    return ids


def _listed(s: Any, app_id: str, devices: list[str]) -> list[str]:
    ids = list(dict.fromkeys(devices))
    if len(ids) > MAX_DEVICES:
        raise Validation(f"devices: at most {MAX_DEVICES}")
    known = repo.device_types_of(s, app_id, ids)
    unknown = [d for d in ids if d not in known]
    if unknown:
        shown = ", ".join(unknown[:10]) + (", …" if len(unknown) > 10 else "")
        raise Validation(f"devices: {len(unknown)} unknown or decommissioned: {shown}")
    return ids


def _matching(s: Any, app_id: str, terms: list[inventory_filter.Term] | None) -> list[str]:
    if terms is None:
        return list(
            s.scalars(
                select(Device.id)
                .where(Device.application_id == app_id, Device.decommissioned.is_(False))
                .order_by(Device.id)
            )
        )
    rows = s.execute(
        select(
            Device.id,
            Device.name,
            Device.device_type,
            Device.agent_version,
            Device.online,
            Device.tags,
        )
        .where(Device.application_id == app_id, Device.decommissioned.is_(False))
        .order_by(Device.id)
    )
    return [d.id for d in rows if inventory_filter.matches(terms, inventory_filter.attributes(d))]


def _stored_filter(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The filter as the Deployment shows it (Mender's ``Filter``: ``id``, ``name``,
    ``terms``); an inline filter has no saved id, so its id is empty."""
    if data is None:
        return None
    return {
        "id": str(data.get("id") or ""),
        "name": str(data.get("name") or ""),
        "terms": data["terms"],
    }


def abort(ctx: ServerContext, app: Application, rollout_id: str) -> None:
    """``PUT …/status {"status": "aborted"}``: 404 unknown, 422 finished.

    The abort is durable once the first transaction commits (with the rollout's row
    locked: the reports read, devices not final ``aborted``, the rollout finished and
    ``halting``); the abort entries are written next: here for up to ``SYNC_ABORTS``
    devices in progress, else (or if this did not get through) by the engine
    (:mod:`agent.server.service.rollout_actions`)."""
    now = utcnow()
    with ctx.db.transaction() as s:
        rollout = repo.get(s, app.id, rollout_id, lock=True)
        if rollout is None:
            raise NotFound("Deployment was not found")
        if rollout.status == "finished":
            raise Unprocessable("The deployment has finished already")
        observe(s, rollout, now, None)
        s.flush()
        reverting = halt_durable(s, rollout, None, now)
    if len(reverting) <= SYNC_ABORTS:
        finish_halt(ctx, app, rollout_id, kick=True)
    else:  # (the engine writes them, at once: the answer does not wait)
        ctx.engine.kick(urgent=True)


def decommission(
    ctx: ServerContext,
    app: Application,
    device_id: str,
    why: str = "removed from deployments",
) -> int:
    """The device's unfinished places in unfinished rollouts become ``decommissioned``
    (substate ``why``; its flows stay as they are); returns how many. Its report is
    read first: an attempt it reported final keeps that status."""
    now = utcnow()
    with ctx.db.transaction() as s:
        rows = repo.unfinished_of_device(s, app.id, device_id, sorted(FINAL))
        # Each rollout's row locked (in id order) before its device rows change: the
        # engine changes them only under that lock.
        for rollout_id in sorted({d.rollout_id for d in rows}):
            rollout = repo.get(s, app.id, rollout_id, lock=True)
            if rollout is not None:
                observe(s, rollout, now, None, only=[device_id])
        s.flush()
        done = 0
        for d in rows:
            s.refresh(d)
            if d.status in FINAL:
                continue
            repo.add_event(
                s, d.rollout_id, "device_decommissioned", device_id, time=now, before=d.status
            )
            d.status, d.substate, d.finished = "decommissioned", why, now
            done += 1
    ctx.engine.kick(urgent=True)
    return done


def get(s: Any, app_id: str, rollout_id: str) -> Rollout:
    rollout = repo.get(s, app_id, rollout_id)
    if rollout is None:
        raise NotFound("Deployment was not found")
    return rollout


def created_bound(seconds: int) -> datetime:
    """A ``created_after``/``created_before`` bound (Unix seconds, UTC)."""
    return datetime.fromtimestamp(seconds, UTC)
