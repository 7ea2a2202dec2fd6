"""Rollouts in Mender's shapes: ``Deployment``, ``Device``, ``DeploymentStatistics``, a
deployment log as text, and this project's events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from agent.server.db import artifacts as artifacts_repo
from agent.server.db import rollouts as repo
from agent.server.db.models import Rollout, RolloutDevice, RolloutEvent, RolloutPhase
from agent.server.errors import NotFound
from agent.server.service.phases import STATUSES

#: The key of this project's own fields in a Deployment (Mender's clients ignore it).
EXTENSION = "edge"


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def deployment(
    s: Session,
    r: Rollout,
    phases: list[RolloutPhase],
    counts: dict[str, int],
) -> dict[str, Any]:
    """The seed's ``Deployment`` (``phases`` only for a phased one)."""
    out: dict[str, Any] = {
        "id": r.id,
        "name": r.name,
        "artifact_name": r.artifact_name,
        "created": iso(r.created),
        "finished": iso(r.finished),
        "status": r.status,
        "device_count": sum(counts.values()),
        "retries": r.retries,
        "dynamic": r.dynamic,
        "artifacts": _artifacts(s, r),
    }
    if r.filter is not None:
        out["filter"] = r.filter
    if r.max_devices is not None:
        out["max_devices"] = r.max_devices
    if r.initial_device_count is not None:
        out["initial_device_count"] = r.initial_device_count
    phased = len(phases) > 1 or any(p.batch_size or p.start_ts for p in phases)
    per_phase = _phase_counts(s, r.id) if phased else {}
    if phased:
        out["phases"] = [
            {
                "id": p.id,
                "batch_size": p.batch_size,
                "start_ts": iso(p.start_ts),
                "device_count": per_phase.get(p.number, (0, 0))[1],
            }
            for p in phases
        ]
    opts = r.options or {}
    out[EXTENSION] = {
        "failure_threshold": opts.get("failure_threshold"),
        "revert": opts.get("revert", True),
        "health_window": opts.get("health_window"),
        "device_timeout": opts.get("device_timeout"),
        "aborted": r.aborted,
        "stopped": r.stopped,
        "phases": [
            {
                "number": p.number,
                "devices": per_phase.get(p.number, (0, 0))[0] if phased else sum(counts.values()),
                "started": iso(p.started),
            }
            for p in phases
        ],
    }
    return out


def _artifacts(s: Session, r: Rollout) -> list[str]:
    """The artifacts the rollout uses: those chosen for its started devices, and while
    it runs, those of its name that serve one of its devices' types (``SELECT
    DISTINCT``: a few rows for any number of devices)."""
    used = set(repo.artifact_ids(s, r.id))
    if r.status != "finished":
        types = repo.device_types(s, r.id)
        for art in artifacts_repo.by_name(s, r.application_id, r.artifact_name):
            if any(artifacts_repo.matches(art, t) for t in types):
                used.add(art.id)
    return sorted(used)


def _phase_counts(s: Session, rollout_id: str) -> dict[int, tuple[int, int]]:
    """Phase → (devices in it, devices that got their update: Mender's "devices
    which already requested an update", here the devices whose entry was written)."""
    return repo.phase_counts(s, rollout_id)


def statistics(counts: dict[str, int]) -> dict[str, int]:
    """The seed's ``DeploymentStatistics`` (plus ``decommissioned``)."""
    return {status: counts.get(status, 0) for status in STATUSES}


def devices(s: Session, app_id: str, rows: list[RolloutDevice]) -> list[dict[str, Any]]:
    """The seed's ``Device`` for each row (``state``: what the agent reports for the
    rollout's attempt now, its own status word)."""
    reports = repo.states_of(s, app_id, [d.device_id for d in rows if d.attempt_id])
    logs = repo.logs_present(
        s, app_id, [(d.device_id, d.attempt_id) for d in rows if d.attempt_id is not None]
    )
    out = []
    for d in rows:
        flows = (reports.get(d.device_id) or {}).get("flows")
        flow = flows.get(d.flow_id) if isinstance(flows, dict) and d.flow_id else None
        state = None
        if isinstance(flow, dict) and d.attempt_id and flow.get("deploymentId") == d.attempt_id:
            state = flow.get("status") if isinstance(flow.get("status"), str) else None
        item: dict[str, Any] = {
            "id": d.device_id,
            "status": d.status,
            "created": iso(d.created),
            "finished": iso(d.finished),
            "device_type": d.device_type,
            "log": d.device_id in logs,
            "state": state,
            "substate": d.substate,
        }
        out.append(item)
    return out


def log_text(s: Session, app_id: str, rollout_id: str, device_id: str) -> str:
    """The device's deployment log for the rollout's attempt, one ``time level
    message`` line per message; 404 when there is none."""
    d = repo.device(s, rollout_id, device_id)
    if d is None or d.attempt_id is None:
        raise NotFound("Deployment log was not found")
    row = repo.get_log(s, app_id, device_id, d.attempt_id)
    if row is None:
        raise NotFound("Deployment log was not found")
    lines = []
    for m in row.messages:
        if isinstance(m, dict):
            lines.append(f"{m.get('time', '')} {m.get('level', '')} {m.get('message', '')}")
    return "\n".join(lines) + ("\n" if lines else "")


def events(rows: list[RolloutEvent]) -> list[dict[str, Any]]:
    return [
        {
            "id": e.id,
            "time": iso(e.time),
            "kind": e.kind,
            "device_id": e.device_id,
            "detail": e.detail,
        }
        for e in rows
    ]
