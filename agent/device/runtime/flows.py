"""The flow host: the running flows of one agent, and what they share.

Blue/green: :meth:`FlowHost.prepare` compiles and starts a new runner next to the
running one (start-up and the ``startup`` trigger included); only
:meth:`FlowHost.activate` swaps it in, stops the old one and starts its triggers.

It also owns what outlives one version of a flow: its key/value storage and data
directory (under ``<state_dir>/flows/<flowId>/``), and, through
:class:`~agent.device.runtime.subscriptions.TriggerSubscriptions`, the MQTT
subscriptions made on behalf of ``mqtt`` triggers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import wasmtime

from agent.device._fsutil import child_path
from agent.device.runtime._handoff import Handoff, post_or_drop
from agent.device.runtime.eea import EEABindings, EEAContext, EEARunner, is_eea_module
from agent.device.runtime.eea_identity import check_interface, static_identity
from agent.device.runtime.eea_settings import EEADefaults, default_settings
from agent.device.runtime.eea_settings import resolve as resolve_eea
from agent.device.runtime.hostapi import EDGE_FUNCTIONS, FlowContext, define_edge_api
from agent.device.runtime.kvstore import KVStore
from agent.device.runtime.runner import BundleRunner, FlowRunner, Outcome, RunSpec, Supervision
from agent.device.runtime.sandbox import FlowInstance, HostBindings, Limits, Runtime
from agent.device.runtime.subscriptions import TriggerSubscriptions
from agent.errors import InstantiationError
from agent.wire.bundle import read_bundle
from agent.wire.manifest import TopicPolicy

log = structlog.get_logger("agent.device.runtime.flows")

Publish = Callable[[str, bytes, int], None]


class EdgeBindings:
    """``kind: "wasm"``: WASI plus the ``edge`` host API."""

    allowed_modules = frozenset({"wasi_snapshot_preview1", "edge"})

    def __init__(self, ctx: FlowContext) -> None:
        self.ctx = ctx

    def check(self, module: wasmtime.Module) -> None:
        for imp in module.imports:
            if imp.module == "edge" and imp.name not in EDGE_FUNCTIONS:
                raise InstantiationError(
                    f"module imports edge.{imp.name}, which is not in the edge host API "
                    f"(provided: {', '.join(sorted(EDGE_FUNCTIONS))})"
                )

    def define(self, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
        define_edge_api(linker, self.ctx)

    def bound(self, instance: FlowInstance) -> None:
        memory = instance.export_item("memory")
        self.ctx.memory.memory = memory if isinstance(memory, wasmtime.Memory) else None

    def allow_output(self) -> bool:
        return self.ctx.allow_log()


class FlowHost:
    """Running flows of one agent."""

    def __init__(
        self,
        runtime: Runtime,
        limits: Limits,
        device_id: str,
        *,
        flows_dir: Path,
        device_base: str = "",
        supervision: Supervision | None = None,
        publish: Publish | None = None,
        subscribe: Callable[[str, int], None] | None = None,
        unsubscribe: Callable[[str], None] | None = None,
        on_health: Callable[[FlowRunner], None] | None = None,
        protected: frozenset[str] = frozenset(),
        eea_defaults: EEADefaults | None = None,
        losant_device_id: str | None = None,
    ) -> None:
        self.runtime = runtime
        #: ``[eea]``: what every EEA bundle gets unless its ``config.eea`` says otherwise.
        self.eea_defaults = eea_defaults or default_settings()
        #: ``[losant] device_id``: the Losant device id EEA bundles get.
        self.losant_device_id = losant_device_id
        self.limits = limits
        self.device_id = device_id
        self.flows_dir = flows_dir
        self.device_base = device_base or f"edge/{device_id}"
        self.supervision = supervision or Supervision()
        self._publish = publish
        self.on_health = on_health or (lambda _r: None)
        self.triggers = TriggerSubscriptions(
            self.device_base, subscribe=subscribe, unsubscribe=unsubscribe, protected=protected
        )
        self.running: dict[str, FlowRunner] = {}
        self._kv: dict[str, KVStore] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handoff: Handoff | None = None
        #: The agent's broker connection, as EEA bundles are told.
        self.connected = False

    # ------------------------------------------------------------ building runners
    def _flow_dir(self, flow_id: str) -> Path:
        """The flow's own directory (storage, ``/data``); raises :class:`UnsafePath`
        for an id that is not one plain path component."""
        return child_path(self.flows_dir, flow_id)

    def _kv_for(self, spec: RunSpec) -> KVStore:
        kv = self._kv.get(spec.flow_id)
        if kv is None:
            path = self._flow_dir(spec.flow_id) / "kv.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            kv = self._kv[spec.flow_id] = KVStore(path, spec.permissions.storage_quota)
        kv.quota = spec.permissions.storage_quota
        return kv

    def _threadsafe_publish(self, topic: str, payload: bytes, qos: int) -> None:
        if self._publish is not None:
            post_or_drop(self._handoff, self._publish, topic, payload, qos)

    def _context(self, spec: RunSpec, kv: KVStore) -> FlowContext:
        return FlowContext(
            flow_id=spec.flow_id,
            device_id=self.device_id,
            policy=TopicPolicy(self.device_base, spec.flow_id, spec.permissions),
            publish=self._threadsafe_publish,
            kv=kv,
            config_json=json.dumps(spec.config, separators=(",", ":")).encode(),
            publish_rate=spec.permissions.publish_rate,
        )

    def _bindings_factory(
        self, spec: RunSpec, ctx: FlowContext
    ) -> Callable[[FlowRunner], HostBindings]:
        # A fresh set of bindings per instance (a restart gets a new Store and memory).
        def make(_runner: FlowRunner) -> HostBindings:
            ctx.memory.memory = None
            return EdgeBindings(ctx)

        return make

    async def prepare(self, spec: RunSpec, data: bytes) -> FlowRunner:
        """Compile and start a runner; the running version is untouched."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._handoff = loop, Handoff(loop)
        self.triggers.check(spec.triggers)
        if spec.kind == "bundle":
            runner: FlowRunner = await self._bundle_runner(spec, data)
        else:
            module = await self.runtime.run(lambda: self.runtime.compile(data, spec.sha256))
            runner = self._module_runner(spec, module, data)
        await runner.start()
        return runner

    def _module_runner(self, spec: RunSpec, module: Any, data: bytes) -> FlowRunner:
        if spec.kind == "eea" or is_eea_module(module):
            return self._eea_runner(spec, module, data)
        return self._edge_runner(spec, module)

    async def _bundle_runner(self, spec: RunSpec, data: bytes) -> BundleRunner:
        bundle = await asyncio.to_thread(read_bundle, data)
        parts: list[FlowRunner] = []
        for entry in bundle.manifest.modules:
            blob = bundle.modules[entry.name]
            assert entry.sha256 is not None
            self.triggers.check(entry.triggers)
            part_spec = RunSpec(
                flow_id=spec.flow_id,
                version=spec.version,
                sha256=entry.sha256,
                kind=entry.kind,
                config=bundle.module_config(entry),
                triggers=entry.triggers,
                permissions=bundle.manifest.permissions,
                module=entry.name,
            )
            module = await self.runtime.run(
                lambda b=blob, h=entry.sha256: self.runtime.compile(b, h)  # type: ignore[misc]
            )
            parts.append(self._module_runner(part_spec, module, blob))
        return BundleRunner(spec, parts, self.on_health)

    def _eea_runner(self, spec: RunSpec, module: Any, data: bytes) -> EEARunner:
        identity = static_identity(data)
        check_interface(identity)
        settings, losant_id = resolve_eea(
            spec.config,
            self.eea_defaults,
            memory_limit=self.limits.memory_limit,
            device_id=self.device_id,
            losant_device_id=self.losant_device_id,
        )
        flow_dir = self._flow_dir(spec.flow_id)
        flow_dir.mkdir(parents=True, exist_ok=True)
        extra = tuple(f"{self.device_base}/{f}" for f in spec.permissions.publish)
        ctx = EEAContext(
            flow_id=spec.flow_id,
            device_id=losant_id,
            storage_path=child_path(
                flow_dir, f"eea-storage.{spec.module}.json" if spec.module else "eea-storage.json"
            ),
            publish=self._threadsafe_publish,
            allowed_topics=(
                f"losant/{losant_id}/#",
                f"{self.device_base}/flows/{spec.flow_id}/#",
                *extra,
            ),
            config=settings,
            publish_rate=spec.permissions.publish_rate,
            identity=identity,
        )

        def make(_runner: FlowRunner) -> HostBindings:
            ctx.memory.memory = None
            return EEABindings(ctx)

        runner = EEARunner(
            self.runtime,
            module,
            spec,
            device_id=self.device_id,
            limits=self.limits,
            make_bindings=make,
            context=None,
            kv=None,
            data_dir=None,
            supervision=self.supervision,
            on_health=self.on_health,
            eea=ctx,
            extra_topics=(f"{self.device_base}/command",),
        )
        runner.connected = self.connected  # a bundle started while online is told so
        return runner

    def _edge_runner(self, spec: RunSpec, module: Any) -> FlowRunner:
        kv = self._kv_for(spec)
        ctx = self._context(spec, kv)
        data_dir = None
        if spec.permissions.data_dir:
            data_dir = self._flow_dir(spec.flow_id) / "data"
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return FlowRunner(
            self.runtime,
            module,
            spec,
            device_id=self.device_id,
            limits=self.limits,
            make_bindings=self._bindings_factory(spec, ctx),
            context=ctx,
            kv=kv,
            data_dir=data_dir,
            supervision=self.supervision,
            on_health=self.on_health,
        )

    # ------------------------------------------------------------ running set
    async def activate(self, flow_id: str, runner: FlowRunner) -> FlowRunner | None:
        """Make ``runner`` the running one of ``flow_id``; returns the old one (stopped)."""
        old = self.running.get(flow_id)
        self.running[flow_id] = runner
        for trig in runner.mqtt_filters():  # before the old version lets go of them
            self.triggers.ref(trig.topic, trig.qos)
        if old is not None:
            await self._stop(old)
        runner.activate()
        return old

    async def _stop(self, runner: FlowRunner) -> None:
        for trig in runner.mqtt_filters():
            self.triggers.unref(trig.topic)
        await runner.shutdown(self.limits.call_deadline_ms / 1000)

    async def remove(self, flow_id: str, *, purge: bool = False) -> bool:
        """Stop a flow; ``purge`` also deletes its storage and data directory."""
        runner = self.running.pop(flow_id, None)
        if runner is not None:
            await self._stop(runner)
        if purge:
            self._kv.pop(flow_id, None)
            shutil.rmtree(self._flow_dir(flow_id), ignore_errors=True)
        return runner is not None

    async def close_all(self) -> None:
        """Stop every flow (EEA bundles get ``eea_shutdown`` first), concurrently."""

        async def one(flow_id: str) -> None:
            try:
                await self.remove(flow_id)
            except Exception:  # shutdown goes on whatever one flow does
                log.exception("error stopping flow", flow_id=flow_id)

        await asyncio.gather(*(one(f) for f in list(self.running)))

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        for runner in self.running.values():
            runner.connection(connected)

    def is_eea(self, flow_id: str) -> bool:
        return isinstance(self.running.get(flow_id), EEARunner)

    def direct_trigger(self, flow_id: str, trigger_id: str, payload: bytes) -> bool:
        runner = self.running.get(flow_id)
        return isinstance(runner, EEARunner) and runner.direct_trigger(trigger_id, payload)

    # ------------------------------------------------------------ routing
    def command(
        self, name: str, payload: bytes, replies: dict[str, asyncio.Future[Outcome]] | None = None
    ) -> list[str]:
        """Deliver a command to every flow with a matching command trigger. With
        ``replies``, each delivered flow's outcome future is put there."""
        delivered = []
        for flow_id, runner in sorted(self.running.items()):
            fut: asyncio.Future[Outcome] | None = None
            if replies is not None:
                fut = asyncio.get_running_loop().create_future()
            if runner.command(name, payload, fut):
                delivered.append(flow_id)
                if replies is not None and fut is not None:
                    replies[flow_id] = fut
        return delivered

    def route(self, topic: str, payload: bytes) -> list[str]:
        """Deliver an MQTT message to every flow whose mqtt trigger filter matches."""
        delivered = []
        for flow_id, runner in sorted(self.running.items()):
            if runner.accepts(topic):
                runner.message(topic, payload)
                delivered.append(flow_id)
        return delivered

    @property
    def subscriptions(self) -> dict[str, int]:
        """Each trigger filter subscribed for flows, with how many flows use it."""
        return self.triggers.counts()

    def module_digests(self) -> set[str]:
        """sha256 of every module running (a bundle's modules included)."""
        out: set[str] = set()
        for runner in self.running.values():
            parts = runner.parts if isinstance(runner, BundleRunner) else [runner]
            out.update(p.spec.sha256 for p in parts)
        return out

    def defer_until(self, flow_id: str) -> float | None:
        """Until when the running version of ``flow_id`` asked to defer updates."""
        runner = self.running.get(flow_id)
        ctx = runner.context if runner is not None else None
        return ctx.defer_until if ctx is not None else None

    def info(self, flow_id: str) -> dict[str, Any] | None:
        runner = self.running.get(flow_id)
        return runner.health_info() if runner is not None else None
