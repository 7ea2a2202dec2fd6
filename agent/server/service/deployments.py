"""Losant's deployment operations (edge and embedded alike): release, remove, replace,
and the views of the records.

Each operation is validated whole before anything is written (unknown devices or
versions are a 404 and nothing changes), then handed to the desired writer as one
plan, so a release to a thousand devices is one transaction and one batch of
publishes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from agent.server.context import ServerContext
from agent.server.db import deployments as repo
from agent.server.db import devices as devices_repo
from agent.server.db import flow_versions as versions_repo
from agent.server.db.models import Application, Deployment, DeploymentAttempt
from agent.server.errors import NotFound, Validation
from agent.server.service.desired import EntryFor, removal_entry, version_entry

#: Devices one release may name.
MAX_RELEASE_DEVICES = 10_000


def _blank(version: str | None) -> bool:
    return version is None or version == ""


def _entry(
    ctx: ServerContext, s: Session, app: Application, flow_id: str, version: str | None
) -> tuple[str | None, EntryFor]:
    if _blank(version):
        return None, removal_entry
    assert version is not None
    fv = versions_repo.get(s, app.id, flow_id, version)
    if fv is None:
        raise NotFound(f"Version {version} of flow {flow_id} was not found")
    return version, version_entry(app, ctx.cfg.base_url, fv, ctx.cfg.mqtt_artifact_limit)


def release(
    ctx: ServerContext,
    app: Application,
    kind: str,
    flow_id: str,
    version: str | None,
    device_ids: list[str],
) -> list[str]:
    if not device_ids:
        raise Validation("deviceIds: at least one device")
    if len(device_ids) > MAX_RELEASE_DEVICES:
        raise Validation(f"deviceIds: at most {MAX_RELEASE_DEVICES} devices")
    with ctx.db.transaction() as s:
        made = _entry(ctx, s, app, flow_id, version)
        found = devices_repo.get_many(s, app.id, device_ids)
        for device_id in dict.fromkeys(device_ids):
            dev = found.get(device_id)
            if dev is None or dev.decommissioned:
                raise NotFound(f"Device {device_id} was not found")
    plan = {d: {flow_id: made} for d in dict.fromkeys(device_ids)}
    return ctx.writer.change(app, plan, kind)


def remove(
    ctx: ServerContext,
    app: Application,
    kind: str,
    flow_id: str | None,
    device_id: str | None,
) -> list[str]:
    """Losant's three forms: a flow from a device, a flow from every device, every
    flow from a device."""
    if flow_id is None and device_id is None:
        raise Validation("give flowId, deviceId or both")
    with ctx.db.transaction() as s:
        if device_id is not None:
            dev = devices_repo.get(s, app.id, device_id)
            if dev is None or dev.decommissioned:
                raise NotFound(f"Device {device_id} was not found")
            rows = list(repo.for_device(s, app.id, device_id).values())
        else:
            assert flow_id is not None
            rows = repo.for_flow(s, app.id, flow_id, kind)
    plan: dict[str, dict[str, tuple[str | None, EntryFor]]] = {}
    for dep in rows:
        if dep.kind != kind or (flow_id is not None and dep.flow_id != flow_id):
            continue
        if dep.desired_version is None and dep.current_version is None:
            continue  # nothing to remove
        plan.setdefault(dep.device_id, {})[dep.flow_id] = (None, removal_entry)
    return ctx.writer.change(app, plan, kind)


def replace(
    ctx: ServerContext,
    app: Application,
    kind: str,
    flow_id: str,
    old_version: str | None,
    new_version: str | None,
) -> list[str]:
    """Every deployment of ``flow_id`` whose desired version is ``old_version`` gets
    ``new_version`` (blank: removed)."""
    old = None if _blank(old_version) else old_version
    with ctx.db.transaction() as s:
        made = _entry(ctx, s, app, flow_id, new_version)
        rows = [d for d in repo.for_flow(s, app.id, flow_id, kind) if d.desired_version == old]
    plan = {d.device_id: {flow_id: made} for d in rows}
    return ctx.writer.change(app, plan, kind)


def view(
    dep: Deployment, kind: str, attempts: list[DeploymentAttempt] | None = None
) -> dict[str, Any]:
    """A record in Losant's shape (plus this project's ``status``, ``error`` and, for
    a single record, the history of attempts)."""
    out: dict[str, Any] = {
        "id": dep.id,
        f"{kind}DeploymentId": dep.id,
        "applicationId": dep.application_id,
        "deviceId": dep.device_id,
        "flowId": dep.flow_id,
        "desiredVersion": dep.desired_version,
        "currentVersion": dep.current_version,
        "creationDate": _iso(dep.creation_date),
        "lastUpdated": _iso(dep.last_updated),
        "status": dep.status,
        "error": dep.error,
    }
    if attempts is not None:
        out["attempts"] = [
            {
                "id": a.id,
                "version": a.version,
                "generation": a.generation,
                "status": a.status,
                "error": a.error,
                "creationDate": _iso(a.created),
                "finished": _iso(a.finished) if a.finished else None,
            }
            for a in attempts
        ]
    return out


def _iso(value: Any) -> str:
    return str(value.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
