"""The narrow views of an agent that its commands and its Losant profile get.

:class:`CommandPort` is a :class:`~agent.device.commands.CommandDevice` and
:class:`LosantPort` a :class:`~agent.device.losant.LosantDevice`: each exposes the
few things that part needs, so neither reaches through the whole agent, and each
is replaced by a fake in unit tests.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from agent.device.artifacts import ArtifactStore
from agent.device.config import LosantConfig
from agent.device.deploy.local import LocalStore
from agent.device.deploy.reconciler import Reconciler
from agent.device.outbox import Outbox
from agent.device.reporter import Reporter
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner

if TYPE_CHECKING:
    from agent.device.daemon import Agent


class CommandPort:
    """What :class:`CommandRouter` may use of an agent (its ``CommandDevice``)."""

    def __init__(
        self,
        device_id: str,
        response_topic: str,
        *,
        host: FlowHost,
        reconciler: Reconciler,
        local: LocalStore,
        outbox: Outbox,
        reporter: Reporter,
    ) -> None:
        self.device_id = device_id
        self.response_topic = response_topic
        self.flows = host
        self.records = reconciler.records
        self._reconciler = reconciler
        self._local = local
        self._outbox = outbox
        self._reporter = reporter

    def send(self, topic: str, payload: bytes, *, correlation: bytes | None) -> None:
        self._outbox.put(topic, payload, correlation=correlation)

    def publish_state_now(self) -> None:
        self._reporter.publish_state_now()

    def reconcile(self) -> None:
        self._reconciler.trigger()

    async def artifact_range(self, sha256: str, offset: int, length: int) -> tuple[int, bytes]:
        store = self._reconciler.artifacts
        return await asyncio.to_thread(store.read_range, sha256, offset, length)

    async def restart_flow(self, flow_id: str) -> FlowRunner:
        """Start the installed version afresh (clears ``broken``); for agent.restart-flow."""
        runner = await self._local.restart(flow_id)
        await self._reconciler.persist()
        self._reporter.mark_dirty()
        return runner


class LosantPort:
    """What :class:`LosantProfile` may use of an agent (its ``LosantDevice``)."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.device_id = agent.cfg.device_id

    @property
    def losant(self) -> LosantConfig:
        return self._agent.cfg.losant

    @property
    def command_max_age_s(self) -> float:
        return self._agent.settings.command_max_age_s

    @property
    def artifacts(self) -> ArtifactStore:
        return self._agent.parts.reconciler.artifacts

    @property
    def applied_generation(self) -> int | None:
        return self._agent.parts.reconciler.state.generation

    def installed_version(self, flow_id: str) -> str | None:
        rec = self._agent.parts.reconciler.records.get(flow_id)
        return rec.installed.version if rec is not None and rec.installed else None

    def running(self, flow_id: str) -> FlowRunner | None:
        return self._agent.parts.host.running.get(flow_id)

    async def validate_module(self, data: bytes) -> None:
        runtime = self._agent.runtime
        await runtime.run(lambda: runtime.validate(data))

    async def offer_desired(self, payload: bytes) -> bool:
        return await self._agent.parts.reconciler.offer_desired(payload)

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self._agent.parts.publisher.now(topic, payload, qos=qos)
