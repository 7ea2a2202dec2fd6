"""Fetching ``file://`` artifacts: a local file copied into the store.

Only local paths work (no host, or ``localhost``). The copy goes through the job's
partial file in chunks, off the event loop, under the same cap, free-space and
digest checks as a download.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from agent.device.artifacts._errors import describe
from agent.device.artifacts._partial import discard, open_partial
from agent.errors import ArtifactError, ArtifactTooLarge, IntegrityError

if TYPE_CHECKING:
    from agent.device.artifacts._job import Job

_COPY_CHUNK = 1024 * 1024  # read size


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ArtifactError(f"file URL {url[:400]} names a remote host; only local paths work")
    if not parts.path:
        raise ArtifactError(f"file URL {url[:400]} has no path")
    return Path(unquote(parts.path))


async def fetch_file(job: Job) -> Path:
    """Copy the local file into the partial off the event loop, check it and commit it."""
    source = _file_url_path(job.url)
    try:
        st = await asyncio.to_thread(os.stat, source)
    except FileNotFoundError:
        raise ArtifactError(f"artifact file not found: {source}") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact file {source}: {describe(exc)}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"artifact file {source} is not a regular file")
    if st.st_size > job.cap:
        raise job.too_large(st.st_size, declared=True)
    job.check_disk(st.st_size)
    job.total = job.progress.total = st.st_size
    try:
        await _copy_file(job, source)
    except (ArtifactTooLarge, IntegrityError):
        discard(job.part)
        raise
    return await job.commit()


async def _copy_file(job: Job, source: Path) -> None:
    hasher = hashlib.sha256()
    try:
        src = await asyncio.to_thread(source.open, "rb")
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact file {source}: {describe(exc)}") from exc
    try:
        fd = await asyncio.to_thread(open_partial, job.part, 0)
    except OSError as exc:
        src.close()
        raise ArtifactError(f"cannot create partial file {job.part}: {exc}") from exc
    try:
        while True:
            try:
                chunk = await asyncio.to_thread(src.read, _COPY_CHUNK)
            except OSError as exc:
                raise ArtifactError(f"cannot read artifact file {source}: {describe(exc)}") from exc
            if not chunk:
                break
            if job.done + len(chunk) > job.cap:
                raise job.too_large(job.done + len(chunk), declared=False)
            await job.write(fd, chunk, hasher)
            job.done += len(chunk)
            job.progress.update(job.done)
    finally:
        os.close(fd)
        src.close()
    job.check_result(hasher)
