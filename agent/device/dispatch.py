"""Routing what arrives on the MQTT session to the part that owns it.

Desired documents go to the reconciler; commands to the command router, each in
its own task (it may wait for flows), a bounded number at a time, every command
answered exactly once; in the Losant profile, bundles and fresh commands to the
profile; everything else to the flows subscribed to it. A message that fails is
logged and the next one is taken: one bad message never stops the agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from agent.device.commands import CommandRouter
from agent.device.deploy.reconciler import Reconciler
from agent.device.losant import LosantProfile
from agent.device.mqtt import Message
from agent.device.runtime.flows import FlowHost
from agent.errors import AgentError
from agent.wire.topics import Topics

log = structlog.get_logger("agent.device.dispatch")


class Dispatcher:
    def __init__(
        self,
        messages: asyncio.Queue[Message],
        topics: Topics,
        *,
        reconciler: Reconciler,
        commands: CommandRouter,
        host: FlowHost,
        losant: LosantProfile | None,
        command_slots: int,
        on_own_status: Callable[[bytes], None] | None = None,
    ) -> None:
        self.messages = messages
        self.topics = topics
        self.reconciler = reconciler
        self.commands = commands
        self.host = host
        self.losant = losant
        #: The device's own retained status as the broker has it (the reporter checks
        #: that it does not say offline while the device is connected).
        self.on_own_status = on_own_status
        self._slots = asyncio.Semaphore(command_slots)
        self._tasks: set[asyncio.Task[None]] = set()

    def set_command_slots(self, slots: int) -> None:
        """A new bound for commands handled at once (those running keep their slot)."""
        self._slots = asyncio.Semaphore(slots)

    def cancel_commands(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def run(self) -> None:
        while True:
            msg = await self.messages.get()
            try:
                await self._route(msg)
            except AgentError as exc:
                log.error("message handling failed", topic=msg.topic, error=str(exc))
            except Exception:  # a bug on one message must not stop the agent
                log.exception("internal error handling a message", topic=msg.topic)

    async def _route(self, msg: Message) -> None:
        losant = self.losant
        if losant is not None:
            if msg.topic == losant.flows_topic:
                await losant.on_bundle(msg.payload)
                return
            if msg.topic == losant.command_topic and not losant.fresh_command(msg.payload):
                return  # stale: dropped (logged)
        elif msg.topic == self.topics.desired:
            await self.reconciler.offer_desired(msg.payload)
            return
        elif msg.topic == self.topics.command:
            self._spawn_command(msg)
            return
        elif msg.topic == self.topics.status:
            if self.on_own_status is not None:
                self.on_own_status(msg.payload)
            return
        if not self.host.route(msg.topic, msg.payload):
            log.debug("message on unhandled topic", topic=msg.topic)

    def _spawn_command(self, msg: Message) -> None:
        slots = self._slots

        async def run() -> None:
            async with slots:
                await self.commands.handle(msg)

        task = asyncio.get_running_loop().create_task(run(), name="command")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
