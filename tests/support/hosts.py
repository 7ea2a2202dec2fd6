"""A FlowHost for tests, recording what its flows publish, subscribe and report."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import wat

from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import BundleRunner, FlowRunner, Health, RunSpec, Supervision
from agent.device.runtime.sandbox import Limits, Runtime
from agent.wire.manifest import Manifest, Permissions

LIMITS = Limits(memory_limit=8 * 1024 * 1024, call_deadline_ms=300, epoch_tick_ms=10)
BASE = "edge/dev1"
FAST_SUPERVISION = Supervision(
    max_failures=3, failure_window=60, backoff_initial=0.05, backoff_max=0.2
)


class Host:
    """A FlowHost plus what it published, subscribed and reported."""

    def __init__(self) -> None:
        self.host: FlowHost
        self.published: list[tuple[str, bytes, int]] = []
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []
        self.health: list[tuple[str, Health]] = []

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.published if t == topic]

    async def deploy(
        self, data: bytes, flow_id: str = "f1", version: str = "v1", **manifest: Any
    ) -> FlowRunner:
        config = manifest.pop("config", {})
        m = Manifest.model_validate(manifest)
        spec = RunSpec(
            flow_id=flow_id,
            version=version,
            sha256=wat.sha256(data),
            kind="wasm",
            config=config,
            triggers=m.triggers,
            permissions=m.permissions,
        )
        runner = await self.host.prepare(spec, data)
        await self.host.activate(flow_id, runner)
        return runner


@contextlib.asynccontextmanager
async def recording_host(
    tmp_path: Path,
    supervision: Supervision = FAST_SUPERVISION,
    limits: Limits = LIMITS,
    **host_kw: Any,
) -> AsyncIterator[Host]:
    async with Runtime(limits, workers=4) as runtime:
        rec = Host()
        rec.host = FlowHost(
            runtime,
            limits,
            "dev1",
            flows_dir=tmp_path / "flows",
            device_base=BASE,
            supervision=supervision,
            publish=lambda t, p, q: rec.published.append((t, p, q)),
            subscribe=lambda t, q: rec.subscribed.append(t),
            unsubscribe=lambda t: rec.unsubscribed.append(t),
            on_health=lambda r: rec.health.append((r.flow_id, r.state.health)),
            **host_kw,
        )
        try:
            yield rec
        finally:
            await rec.host.close_all()


async def deploy_bundle(h: Host, data: bytes) -> BundleRunner:
    spec = RunSpec(
        flow_id="gh",
        version="1",
        sha256=hashlib.sha256(data).hexdigest(),
        kind="bundle",
        config={},
        triggers=(),
        permissions=Permissions(),
    )
    runner = await h.host.prepare(spec, data)
    await h.host.activate("gh", runner)
    assert isinstance(runner, BundleRunner)
    return runner
