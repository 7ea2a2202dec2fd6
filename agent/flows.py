"""The flow host: which flow instance is running for each flow id.

Blue/green: :meth:`FlowHost.prepare` builds and starts a new instance next to the
running one; only :meth:`FlowHost.activate` swaps it in and stops the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from .errors import SandboxError
from .sandbox import FlowInstance, Limits, Runtime

log = structlog.get_logger("agent.flows")


class FlowHost:
    """Running flow instances of one agent."""

    def __init__(self, runtime: Runtime, limits: Limits, device_id: str) -> None:
        self.runtime = runtime
        self.limits = limits
        self.device_id = device_id
        self.running: dict[str, FlowInstance] = {}

    @property
    def start_timeout(self) -> float:
        # The epoch deadline stops wasm code; this outer bound catches a guest stuck
        # in a blocking host call (e.g. WASI sleep), which epochs cannot interrupt.
        return self.limits.call_deadline_ms / 1000 * 2 + 1.0

    async def prepare(
        self,
        flow_id: str,
        version: str,
        data: bytes,
        sha256: str,
        config: dict[str, Any] | None = None,
    ) -> FlowInstance:
        """Compile, instantiate and start a new instance; the running one is untouched."""
        module = await self.runtime.run(lambda: self.runtime.compile(data, sha256))
        inst = FlowInstance(
            self.runtime,
            module,
            flow_id=flow_id,
            version=version,
            device_id=self.device_id,
            limits=self.limits,
            config=config,
        )
        fut = asyncio.ensure_future(
            self.runtime.run(inst.start, timeout=self.start_timeout, what="start-up")
        )
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # Superseded while starting: the thread finishes on its own; drop the instance.
            fut.add_done_callback(lambda _f: inst.close())
            raise
        except SandboxError:
            inst.close()
            raise
        return inst

    def activate(self, flow_id: str, inst: FlowInstance) -> FlowInstance | None:
        """Make ``inst`` the running instance of ``flow_id``; returns the old one (stopped)."""
        old = self.running.get(flow_id)
        self.running[flow_id] = inst
        if old is not None:
            old.close()
        return old

    def remove(self, flow_id: str) -> bool:
        inst = self.running.pop(flow_id, None)
        if inst is None:
            return False
        inst.close()
        return True

    def close_all(self) -> None:
        for flow_id in list(self.running):
            with contextlib.suppress(Exception):
                self.remove(flow_id)
