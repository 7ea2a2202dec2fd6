"""The orphan sweep: artifact bytes that nothing references any more are removed.

The store keeps bytes by content (``{dir}/{sha256[:2]}/{sha256}``, a ``blobs`` row
each). Deleting a Mender artifact or a flow version leaves them; this sweep removes
them once nothing names the digest. What names one (:func:`referenced`), anywhere in
the column, as a value or inside a URL:

- ``flow_versions.artifacts`` (the items a release turns into desired entries);
- ``artifacts.payload_sha256``, ``artifacts.mender_sha256`` (the ``.mender`` file its
  download link serves) and ``artifacts.updates`` (the payload's checksum);
- ``devices.desired``: a device sent a version keeps downloading it (a restart, a
  retry, an abort's copy of the entry) after the version or the item of its device
  type was deleted; entries carry ``sha256`` and a URL naming it (``/artifacts/…``
  or ``mqtt:…/artifacts/…``);
- ``deployments.current_sha256`` and ``devices.state`` (a device's last report: the
  ``sha256`` it runs and the ``previousSha256`` a revert starts again, which the
  embedded export, a job, zips from the store once reported as running).

Rollouts name artifacts (by name, by id), not bytes: while such a row exists its
digests are kept, and a device they released to keeps its desired entry. Export
files are copies (``{state_dir}/exports``) and need nothing from the store.

Races. An upload writes its file first and commits its rows after; a release reads
a flow version in one transaction and writes the desired documents in another. So a
digest goes only when all of these hold, each at least ``grace_s`` old: its blob row
(``created``), its file (mtime), and its mark (``.orphans/{sha256}``, made when a
sweep first saw it unreferenced, and dropped when a sweep sees it referenced again).
Then, in one transaction, the rows of the digests are locked (``FOR UPDATE``; SQLite
holds its write lock), every reference read again and the blob rows deleted; after
the commit each file is renamed aside and unlinked unless it turned out fresh (an
upload of the same bytes rewrote it: it goes back). Several processes may sweep at
once: a row is deleted by the one that locked it first (the others find it gone
and leave its file alone), a file removed by the one whose rename succeeded. Files
without a row (a crash between write and commit), temporary files of interrupted
uploads and files a crashed sweep left aside go after the grace too.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from agent.server.artifact_store import ArtifactStore, is_digest, unlink_quietly
from agent.server.db.engine import Database
from agent.server.db.models import Artifact, Blob, Deployment, Device, FlowVersion

log = structlog.get_logger("agent.server.artifact_sweep")

#: A digest anywhere in a referencing column's text (values, URLs).
_DIGEST = re.compile(r"[0-9a-f]{64}")
#: Rows read at once from a referencing table.
YIELD_PER = 500
#: Blob rows locked per statement.
LOCK_CHUNK = 500
#: A file a sweep moved aside is someone else's business for at least this long.
TRASH_MIN_S = 300.0


@dataclass
class SweepReport:
    """What a sweep removed (or, ``dry_run``, would remove)."""

    dry_run: bool = False
    #: Files of unreferenced digests, and their bytes.
    files: int = 0
    bytes: int = 0
    #: Blob rows deleted (a row whose file was gone counts here only).
    blobs: int = 0
    #: Temporary files of interrupted uploads (and files a crashed sweep left aside).
    temp_files: int = 0
    temp_bytes: int = 0
    #: Unreferenced digests still within the grace (marked, or younger).
    pending: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def referenced(s: Session) -> set[str]:
    """Every digest something still references (see the module)."""
    refs: set[str] = set()
    for column in (Artifact.payload_sha256, Artifact.mender_sha256, Deployment.current_sha256):
        refs.update(v.lower() for v in s.scalars(select(column).distinct()) if v)
    for doc in (FlowVersion.artifacts, Artifact.updates, Device.desired, Device.state):
        texts = s.scalars(select(cast(doc, Text)), execution_options={"yield_per": YIELD_PER})
        for text in texts:
            if text:
                refs.update(_DIGEST.findall(text.lower()))
    return refs


def sweep(
    db: Database, store: ArtifactStore, *, grace_s: float, dry_run: bool = False
) -> SweepReport:
    """Remove what nothing references and the grace allows (see the module);
    ``dry_run``: only say what would go (no file, row or mark is touched)."""
    report = SweepReport(dry_run=dry_run)
    start = time.time()
    cutoff = start - grace_s
    cutoff_dt = datetime.fromtimestamp(cutoff, UTC)
    files = dict(store.stored())
    with db.reading() as s:  # (the first look takes no lock: writers go on meanwhile)
        refs = referenced(s)
        rows: dict[str, datetime] = dict(s.execute(select(Blob.sha256, Blob.created)).all())
    candidates: set[str] = set()
    for sha in rows.keys() | files.keys():
        if sha in refs or not is_digest(sha):
            continue
        created = rows.get(sha)
        info = files.get(sha)
        if (created is not None and created > cutoff_dt) or (
            info is not None and info.st_mtime > cutoff
        ):
            report.pending += 1  # (an upload, or one just committed)
            continue
        candidates.add(sha)
    ready = _past_marks(store, candidates, grace_s, dry_run, report)
    if ready:
        if dry_run:
            for sha in ready:
                report.blobs += sha in rows
                if sha in files:
                    report.files += 1
                    report.bytes += files[sha].st_size
        else:
            for sha in _delete_rows(db, store, ready, set(rows), cutoff, cutoff_dt, report):
                size = store.discard(sha, cutoff)
                if size is not None:
                    report.files += 1
                    report.bytes += size
                store.unmark(sha)
    _temporaries(store, cutoff, grace_s, refs, set(rows), dry_run, report)
    if not dry_run:
        took = round(time.time() - start, 3)
        if report.files or report.blobs or report.temp_files:
            log.info("artifact sweep removed unreferenced bytes", seconds=took, **_fields(report))
        else:
            log.debug("artifact sweep found nothing to remove", seconds=took, **_fields(report))
    return report


def _fields(report: SweepReport) -> dict[str, Any]:
    return {k: v for k, v in report.as_dict().items() if k != "dry_run"}


def _past_marks(
    store: ArtifactStore, candidates: set[str], grace_s: float, dry_run: bool, report: SweepReport
) -> list[str]:
    """The candidates first seen unreferenced at least ``grace_s`` ago (marked now if
    they were not); the marks of digests that are no candidates any more dropped."""
    if not dry_run:
        for sha in store.marks():
            if sha not in candidates:
                store.unmark(sha)
    ready = []
    for sha in sorted(candidates):
        since = store.marked_since(sha)
        if since is None:
            since = time.time() if dry_run else store.mark(sha)
        if grace_s <= 0 or time.time() - since >= grace_s:
            ready.append(sha)
        else:
            report.pending += 1
    return ready


def _delete_rows(
    db: Database,
    store: ArtifactStore,
    ready: list[str],
    had_rows: set[str],
    cutoff: float,
    cutoff_dt: datetime,
    report: SweepReport,
) -> list[str]:
    """Delete the blob rows of ``ready`` that are still unreferenced, in one
    transaction with the rows locked; the digests whose files are to go."""
    gone: list[str] = []
    with db.transaction() as s:
        locked: dict[str, Blob] = {}
        with_rows = sorted(sha for sha in ready if sha in had_rows)
        for i in range(0, len(with_rows), LOCK_CHUNK):
            stmt = (
                select(Blob)
                .where(Blob.sha256.in_(with_rows[i : i + LOCK_CHUNK]))
                .order_by(Blob.sha256)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
            locked.update((row.sha256, row) for row in s.scalars(stmt))
        refs = referenced(s)  # again, under the locks
        for sha in ready:
            if sha in refs:
                continue
            row = locked.get(sha)
            if sha in had_rows and row is None:
                continue  # another sweep deleted it (and takes the file)
            if row is None and s.get(Blob, sha) is not None:
                continue  # a row committed since the listing: an upload's
            if row is not None and row.created > cutoff_dt:
                continue
            info = store.file_stat(sha)
            if info is not None and info.st_mtime > cutoff:
                continue  # rewritten by an upload of the same bytes
            if row is not None:
                s.delete(row)
                report.blobs += 1
            gone.append(sha)
    return gone


def _temporaries(
    store: ArtifactStore,
    cutoff: float,
    grace_s: float,
    refs: set[str],
    rows: set[str],
    dry_run: bool,
    report: SweepReport,
) -> None:
    """Temporary files of uploads older than the grace; files a sweep moved aside
    and never finished with (a crash): put back if their digest is referenced or
    has a row and its file is missing, else removed."""
    for path, info in store.temp_files():
        if info.st_mtime <= cutoff and (dry_run or unlink_quietly(path)):
            report.temp_files += 1
            report.temp_bytes += info.st_size
    trash_cutoff = time.time() - max(grace_s, TRASH_MIN_S)
    for path, when, sha in list(store.trash_files()):
        if when > trash_cutoff:
            continue
        if (sha in refs or sha in rows) and store.file_stat(sha) is None:
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):  # (another sweep did)
                    store.restore(path, sha)
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if dry_run or unlink_quietly(path):
            report.temp_files += 1
            report.temp_bytes += size
