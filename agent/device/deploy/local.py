"""Installed flows, started from the local store: at boot (no network needed) and when
``agent.restart-flow`` asks. A flow that cannot start (its artifact is gone or
corrupt) is recorded as lost, so the next reconcile run installs it again."""

from __future__ import annotations

import asyncio

import structlog

from agent.device.artifacts import ArtifactStore
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.state import FlowRecord
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner, RunSpec
from agent.errors import AgentError
from agent.wire.manifest import Manifest

log = structlog.get_logger("agent.device.deploy.local")


class LocalStore:
    def __init__(self, records: FlowRecords, host: FlowHost, artifacts: ArtifactStore) -> None:
        self.records = records
        self.host = host
        self.artifacts = artifacts

    async def start_all(self) -> None:
        """Start every installed flow, concurrently: one flow that blocks at start-up
        does not delay the others."""
        await asyncio.gather(
            *(
                self._start_one(flow_id, rec)
                for flow_id, rec in sorted(self.records.items())
                if rec.installed is not None
            )
        )

    async def restart(self, flow_id: str) -> FlowRunner:
        """Start the installed version afresh and clear ``broken``."""
        runner = await self.start(flow_id)
        log.info("flow restarted on command", flow_id=flow_id, version=runner.version)
        return runner

    async def start(self, flow_id: str) -> FlowRunner:
        """Start the installed version in place of what runs (blue/green: the running
        one stops only once the new one started), and clear ``broken``."""
        rec = self.records.get(flow_id)
        if rec is None or rec.installed is None:
            raise AgentError(f"flow {flow_id!r} not found or not installed")
        runner = await self._prepare(flow_id, rec)
        await self.host.activate(flow_id, runner)
        self.records.set_broken(flow_id, False)
        return runner

    async def _prepare(self, flow_id: str, rec: FlowRecord) -> FlowRunner:
        """A started runner for the installed version, from the local store."""
        inst = rec.installed
        if inst is None:
            raise AgentError(f"flow {flow_id!r} has no installed version")
        if not await asyncio.to_thread(self.artifacts.verify, inst.sha256):
            raise AgentError(f"installed artifact {inst.sha256[:12]}… missing or corrupt")
        data = await asyncio.to_thread(self.artifacts.read, inst.sha256)
        manifest = Manifest.from_json(inst.manifest)
        return await self.host.prepare(
            RunSpec(
                flow_id=flow_id,
                version=inst.version,
                sha256=inst.sha256,
                kind=inst.kind,
                config=inst.config,
                triggers=manifest.triggers,
                permissions=manifest.permissions,
            ),
            data,
        )

    async def _start_one(self, flow_id: str, rec: FlowRecord) -> None:
        inst = rec.installed
        if inst is None:
            return
        if rec.broken:
            log.warning(
                "flow is broken; not started (deploy again or restart it)",
                flow_id=flow_id,
                version=inst.version,
            )
            return
        try:
            runner = await self._prepare(flow_id, rec)
        except AgentError as exc:
            log.error(
                "installed flow could not start; it will be installed again",
                flow_id=flow_id,
                version=inst.version,
                error=str(exc),
            )
            self.records.lost(flow_id, f"could not start from local store: {exc}")
            return
        await self.host.activate(flow_id, runner)
        log.info("flow started from local store", flow_id=flow_id, version=inst.version)
