"""The artifact repository (Mender's view of the flow versions): one row per artifact,
each naming the flow version item whose payload it carries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.server.db.models import Artifact, FlowVersion, Rollout, utcnow


def create(session: Session, **fields: Any) -> Artifact:
    row = Artifact(**fields)
    session.add(row)
    session.flush()
    return row


def get(session: Session, app_id: str, artifact_id: str) -> Artifact | None:
    row = session.get(Artifact, artifact_id)
    return row if row is not None and row.application_id == app_id else None


def by_name(session: Session, app_id: str, name: str) -> list[Artifact]:
    return list(
        session.scalars(
            select(Artifact)
            .where(Artifact.application_id == app_id, Artifact.name == name)
            .order_by(Artifact.created, Artifact.id)
        )
    )


def all_of(session: Session, app_id: str) -> list[Artifact]:
    return list(
        session.scalars(
            select(Artifact)
            .where(Artifact.application_id == app_id)
            .order_by(Artifact.name, Artifact.created, Artifact.id)
        )
    )


def of_flow_version(session: Session, app_id: str, flow_id: str, version: str) -> list[Artifact]:
    return list(
        session.scalars(
            select(Artifact).where(
                Artifact.application_id == app_id,
                Artifact.flow_id == flow_id,
                Artifact.version == version,
            )
        )
    )


def usage(session: Session, app_id: str) -> int:
    """Bytes the application's artifacts take (each counted once per row)."""
    return int(
        session.scalar(
            select(func.coalesce(func.sum(Artifact.size), 0)).where(
                Artifact.application_id == app_id
            )
        )
        or 0
    )


def matches(artifact: Artifact, device_type: str | None) -> bool:
    """Whether an artifact serves a device of ``device_type`` (an artifact with no
    device types, from a flow version uploaded without them, serves every type)."""
    types: Sequence[str] = artifact.device_types or ()
    return not types or (device_type is not None and device_type in types)


def add_for_flow_version(session: Session, fv: FlowVersion) -> list[Artifact]:
    """Rows for a flow version uploaded through Losant's API: one per artifact item,
    named ``{flowId}-{version}`` (so it can be deployed by name through Mender's API)."""
    now = utcnow()
    rows = []
    for item in fv.artifacts:
        rows.append(
            create(
                session,
                application_id=fv.application_id,
                name=f"{fv.flow_id}-{fv.version}"[:256],
                description=(fv.notes or "")[:4096],
                device_types=list(item.get("deviceTypes") or []),
                signed=False,
                size=item["size"],
                info={"format": "edge-agent", "version": 1},
                updates=[
                    {
                        "type_info": {"type": f"edge-{fv.kind}"},
                        "files": [
                            {
                                "name": f"{fv.flow_id}.{fv.kind}",
                                "checksum": item["sha256"],
                                "size": item["size"],
                                "date": now.isoformat().replace("+00:00", "Z"),
                            }
                        ],
                        "meta_data": {},
                    }
                ],
                provides={f"edge.{fv.flow_id}.version": fv.version},
                flow_id=fv.flow_id,
                version=fv.version,
                payload_sha256=item["sha256"],
                mender_sha256=None,
                source="flow-version",
                created=now,
                modified=now,
            )
        )
    return rows


def delete(session: Session, row: Artifact) -> None:
    session.delete(row)
    session.flush()


def set_description(session: Session, row: Artifact, description: str) -> None:
    row.description = description
    row.modified = utcnow()
    session.flush()


def sharing_a_type(
    session: Session, app_id: str, name: str, device_types: Sequence[str]
) -> Artifact | None:
    """An artifact named ``name`` that serves one of ``device_types`` (Mender's rule:
    two artifacts of one name may not share a device type; one without device types
    serves every type)."""
    wanted = set(device_types)
    for row in by_name(session, app_id, name):
        types = set(row.device_types or ())
        if not types or not wanted or types & wanted:
            return row
    return None


def rollouts_naming(session: Session, app_id: str, name: str, *, active_only: bool) -> int:
    """How many rollouts (all, or those not finished) deploy the artifact name ``name``."""
    query = (
        select(func.count())
        .select_from(Rollout)
        .where(Rollout.application_id == app_id, Rollout.artifact_name == name)
    )
    if active_only:
        query = query.where(Rollout.status != "finished")
    return int(session.scalar(query) or 0)
