"""What the device no longer needs: artifacts and compiled modules, after every run.

Kept: the installed and previous version of every flow (a revert needs the previous
one, with no network), and every artifact the desired document names (for every
device type: a reload may change the type). Everything else in the artifact store
and the compiled-module cache goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog

from agent.device.artifacts import ArtifactStore
from agent.device.deploy.state import FlowRecord
from agent.device.runtime.flows import FlowHost
from agent.wire.protocol import DesiredState

log = structlog.get_logger("agent.device.deploy.cleanup")


async def collect_garbage(
    records: Mapping[str, FlowRecord],
    desired: DesiredState | None,
    artifacts: ArtifactStore,
    host: FlowHost,
) -> None:
    keep: set[str] = set()
    for rec in records.values():
        for inst in (rec.installed, rec.previous):
            if inst is not None:
                keep.add(inst.sha256)
    if desired is not None:
        keep.update(a.sha256 for s in desired.flows.values() for a in s.all_artifacts())
    try:
        removed = await asyncio.to_thread(artifacts.gc, keep)
    except OSError as exc:  # a full or read-only disk must not end the run
        log.warning("artifact garbage collection failed", error=str(exc))
        return
    for sha in removed:
        host.runtime.forget(sha)
    await asyncio.to_thread(host.runtime.forget_cached, keep | host.module_digests())
    if removed:
        log.info("artifacts garbage-collected", count=len(removed))
