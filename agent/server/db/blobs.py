"""Stored bytes (``blobs``): a row per digest in the artifact store, which the
artifact sweep (:mod:`agent.server.service.artifact_sweep`) deletes once nothing
references the digest."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from agent.server.db.models import Blob, utcnow


def ensure_blob(session: Session, sha256: str, size: int) -> None:
    """The blob row of bytes stored in the artifact store (once per digest), made or
    renewed. An existing row is updated, not only read: the update waits for a sweep
    that holds the row locked to delete it (PostgreSQL; a plain read would not), and
    a renewed ``created`` restarts the sweep's grace for bytes named again."""
    renewed = session.execute(update(Blob).where(Blob.sha256 == sha256).values(created=utcnow()))
    if not getattr(renewed, "rowcount", 0):
        session.add(Blob(sha256=sha256, size=size))
