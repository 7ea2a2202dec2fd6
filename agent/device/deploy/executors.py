"""One executor per step kind of the planner (:mod:`agent.device.deploy.planner`).

:meth:`Executors.execute` dispatches on the step's type with an exhaustive
``match``: a step kind added to :data:`~agent.device.deploy.planner.Step` without an
executor is a type error (mypy: ``assert_never``), not a surprise at run time.
Every record change goes through :class:`~agent.device.deploy.records.FlowRecords`, and
the state is persisted before the work that could be interrupted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, assert_never

import structlog

from agent.device._logging import capture
from agent.device.artifacts import ArtifactStore, Fetcher
from agent.device.deploy.health import HealthWatch
from agent.device.deploy.planner import (
    Activate,
    Defer,
    Download,
    Forget,
    Install,
    Remove,
    Revert,
    SetStatus,
    Step,
    Target,
    Verify,
    Wait,
)
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.revert import Reverter
from agent.device.deploy.state import Installed
from agent.device.deploy.windows import DEFER_REASON
from agent.device.reporter import Reporter
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner, RunSpec
from agent.errors import IntegrityError, StateError
from agent.wire.bundle import read_bundle
from agent.wire.manifest import Manifest
from agent.wire.protocol import ArtifactKind, Status
from agent.wire.redact import redact_url

log = structlog.get_logger("agent.device.deploy.executors")


@dataclass
class Chain:
    """What one flow's steps pass along within a run."""

    path: Path | None = None
    data: bytes | None = None
    runner: FlowRunner | None = None
    steps: list[str] = field(default_factory=list)


def run_spec(t: Target) -> RunSpec:
    manifest = Manifest.from_json(t.manifest_json)
    return RunSpec(
        flow_id=t.flow_id,
        version=t.version,
        sha256=t.artifact.sha256,
        kind=t.artifact.kind.value,
        config=t.config,
        triggers=manifest.triggers,
        permissions=manifest.permissions,
    )


class Executors:
    """Carries out steps for the reconciler."""

    def __init__(
        self,
        records: FlowRecords,
        host: FlowHost,
        artifacts: ArtifactStore,
        fetcher: Fetcher,
        reporter: Reporter,
        persist: Callable[[], Awaitable[None]],
        on_activated: Callable[[str], None],
        *,
        reverter: Reverter,
        health: HealthWatch,
    ) -> None:
        self.records = records
        self.host = host
        self.artifacts = artifacts
        self.fetcher = fetcher
        self.reporter = reporter
        self.persist = persist
        #: Told when a flow's attempt completed (a newer document cannot abort it).
        self.on_activated = on_activated
        self.reverter = reverter
        self.health = health
        self._unfinished: set[asyncio.Future[None]] = set()

    async def execute(self, step: Step, chain: Chain) -> None:
        match step:
            case SetStatus():
                await self._set_status(step)
            case Remove():
                await self._remove(step)
            case Forget():
                self.records.forget(step.flow_id)
                await self.persist()
            case Download():
                await self._download(step, chain)
            case Verify():
                await self._verify(step, chain)
            case Install():
                await self._install(step, chain)
            case Activate():
                # Shielded: once the new instance is up, the swap and its record
                # complete even if a newer desired document cancels this run.
                await self._shielded(self._activate(step.target, chain))
            case Revert():
                await self._shielded(self._revert(step))
            case Defer():
                await self._defer(step)
            case Wait():
                pass  # the loop waits for it; never handed to an executor
            case _:
                assert_never(step)

    async def _shielded(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` to its end even if the run is cancelled (:meth:`settle` waits
        for it): a swap or a revert, once begun, completes and is recorded."""
        task = asyncio.ensure_future(work)
        self._unfinished.add(task)
        task.add_done_callback(self._unfinished.discard)
        await asyncio.shield(task)

    async def settle(self) -> None:
        """Wait for the swaps and reverts a cancelled run left going."""
        while self._unfinished:
            await asyncio.gather(*self._unfinished, return_exceptions=True)

    async def fail(
        self,
        flow_id: str,
        target: Target,
        reason: str,
        *,
        backoff: tuple[float, float],
        device_id: str,
        log_lines: int,
    ) -> None:
        """An attempt failed: ``failure``, with a retry after ``backoff`` (initial,
        max; doubling per attempt) while retries are left; its deployment log."""
        rec = self.records[flow_id]
        initial, cap = backoff
        delay = min(cap, initial * 2 ** max(0, rec.attempts - 1))
        left = target.retries - rec.attempts + 1
        if left > 0:
            log.warning(
                "deployment attempt failed; will retry",
                error=reason,
                attempt=rec.attempts,
                retry_in_s=round(delay, 1),
                retries_left=left,
            )
        else:
            log.error("deployment failed; retries spent", error=reason, attempt=rec.attempts)
        rec = self.records.transition(
            flow_id,
            Status.FAILURE,
            error=reason,
            inflight=None,
            next_retry_at=time.time() + delay if left > 0 else None,
        )
        try:
            await self.persist()
        except StateError as exc:  # e.g. disk full: report it, don't take the agent down
            log.error("cannot persist the failure", error=str(exc))
        self.reporter.deployment_log(flow_id, rec, capture.take(device_id, flow_id))
        capture.start(device_id, flow_id, log_lines)

    async def _set_status(self, step: SetStatus) -> None:
        if step.status == Status.REMOVED:  # never installed: still drop what it left
            await self.host.remove(step.flow_id, purge=True)
        changes: dict[str, object] = {} if step.status == Status.FAILURE else {"attempts": 0}
        self.records.transition(
            step.flow_id,
            step.status,
            error=step.error,
            target=step.target,
            generation=step.generation,
            desired_version=step.desired_version,
            deployment_id=step.deployment_id,
            inflight=None,
            next_retry_at=None,
            reverted=False,
            no_retry=False,
            **changes,  # type: ignore[arg-type]
        )
        await self.persist()

    async def _remove(self, step: Remove) -> None:
        await self.host.remove(step.flow_id, purge=True)
        rec = self.records.removed(step.flow_id, step.generation, step.deployment_id)
        log.info("flow removed", version=rec.previous.version if rec.previous else None)
        await self.persist()

    async def _revert(self, step: Revert) -> None:
        rec = self.records.get(step.flow_id)
        installed = rec.installed if rec is not None else None
        done = installed is not None and await self.reverter.revert(
            step.flow_id,
            installed.sha256,
            step.status,
            step.reason,
            target=step.target,
            generation=step.generation,
            deployment_id=step.deployment_id,
        )
        if not done:  # (nothing to go back to any more): record the verdict anyway
            self.records.transition(
                step.flow_id, step.status, error=step.reason, target=step.target
            )
            await self.persist()

    async def _defer(self, step: Defer) -> None:
        t = step.target
        rec = self.records.get(t.flow_id)
        # The defer budget counts from the first defer hold of this target; waiting
        # for the maintenance window neither starts nor resets it.
        same = rec is not None and rec.target == t.key
        since = rec.deferred_since if same and rec is not None else None
        if since is None and step.reason == DEFER_REASON:
            since = time.time()
        self.records.transition(
            t.flow_id,
            Status.PENDING,
            target=t.key,
            generation=t.generation,
            desired_version=t.version,
            deployment_id=t.deployment_id,
            error=step.reason,
            inflight=None,
            next_retry_at=None,
            deferred_since=since,
            deferred_until=step.until,
        )
        log.info("install held back", version=t.version, reason=step.reason)
        await self.persist()

    async def _download(self, step: Download, chain: Chain) -> None:
        t = step.target
        rec = self.records.get(t.flow_id)
        # An attempt interrupted in this process (a newer document cancelled the run)
        # resumes without costing an attempt; after a crash, recover() has already
        # turned an interrupted install into a counted failure.
        resuming = rec is not None and rec.target == t.key and rec.inflight is not None
        if rec is None or rec.target != t.key:
            attempts = 1
        else:
            attempts = rec.attempts if resuming else rec.attempts + 1
        rec = self.records.transition(
            t.flow_id,
            Status.DOWNLOADING,
            target=t.key,
            generation=t.generation,
            desired_version=t.version,
            deployment_id=t.deployment_id,
            attempts=attempts,
            error=None,
            inflight="download",
            next_retry_at=None,
            deferred_until=None,
        )
        # An intact stored artifact (a version this device had before) needs no
        # download: nothing can be interrupted until the ``installing`` save.
        if await asyncio.to_thread(self.artifacts.verify, t.artifact.sha256):
            chain.path = self.artifacts.path(t.artifact.sha256)
            log.info("artifact in the store", version=t.version, attempt=attempts)
            return
        await self.persist()  # saved before the work that can be interrupted
        log.info(
            "downloading",
            version=t.version,
            url=redact_url(t.artifact.url),
            attempt=attempts,
            resumed=resuming,
        )
        chain.path = await self.fetcher.fetch(
            t.artifact.url,
            t.artifact.sha256,
            t.artifact.size,
            progress=lambda done, total: self.reporter.progress(t.flow_id, rec, done, total),
        )

    async def _verify(self, step: Verify, chain: Chain) -> None:
        t = step.target
        sha = t.artifact.sha256
        if chain.path is None and not await asyncio.to_thread(self.artifacts.verify, sha):
            raise IntegrityError(f"stored artifact {sha[:12]}… is missing or corrupt")
        chain.data = data = await asyncio.to_thread(self.artifacts.read, sha)
        runtime = self.host.runtime
        if t.artifact.kind == ArtifactKind.BUNDLE:
            bundle = await asyncio.to_thread(read_bundle, data)  # layout, limits, hashes
            for blob in bundle.modules.values():
                await runtime.run(lambda b=blob: runtime.validate(b))  # type: ignore[misc]
            log.info(
                "bundle verified",
                sha256=sha,
                bytes=len(data),
                bundle=bundle.manifest.name,
                modules=len(bundle.modules),
            )
            return
        await runtime.run(lambda: runtime.validate(data))
        log.info("artifact verified", sha256=sha, bytes=len(data))

    async def _install(self, step: Install, chain: Chain) -> None:
        t = step.target
        self.records.transition(t.flow_id, Status.INSTALLING, inflight="install")
        await self.persist()
        assert chain.data is not None
        started = time.perf_counter()
        chain.runner = await self.host.prepare(run_spec(t), chain.data)
        log.info(
            "new version started",
            version=t.version,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def _activate(self, t: Target, chain: Chain) -> None:
        assert chain.runner is not None
        old = await self.host.activate(t.flow_id, chain.runner)
        window, revert = self.health.window(t.health_window, t.health_revert)
        self.records.activated(
            t.flow_id,
            Installed(
                version=t.version,
                sha256=t.artifact.sha256,
                kind=t.artifact.kind.value,
                config=t.config,
                manifest=t.manifest_json,
                deployment_id=t.deployment_id,
            ),
            probation_until=time.time() + window if window > 0 else None,
            revert_on_failure=revert,
        )
        self.on_activated(t.flow_id)
        self.health.watch(t.flow_id)
        await self.persist()
        log.info(
            "flow running", version=t.version, replaced=old.version if old is not None else None
        )
