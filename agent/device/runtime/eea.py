"""Host for Losant Embedded Edge Agent (EEA) bundles, interface version 1.0.0.

A bundle is recognised by its ``env.eea_*`` imports or ``eea_init``/``eea_loop``
exports (Losant's walkthrough bundles carry no ``interfaceVersion`` section; when
one is present it must say ``1.0.0``). The host side, as Losant documents it:

imports (module ``env``; all i32 results, 0 = success, 1 = error)
    ``eea_trace(ptr, len, level)``, ``eea_send_message(tptr, tlen, pptr, plen, qos)``,
    ``eea_storage_save(ptr, len)``, ``eea_storage_read(out, buf_len, out_len_u32)``,
    ``eea_get_time(out_u64_ms)``, ``eea_sleep(ms)``,
    ``eea_get_device_id(out, buf_len, out_len_u8)``,
    ``eea_set_message_buffers(tptr, tlen, pptr, plen)``, registered ``eea_fn_<name>``,
    and ``memory`` unless the bundle exports its own.
exports the host calls (each only if present)
    ``eea_config_set_*`` before ``eea_init()``; then ``eea_loop(i64 now_ms)`` under
    100 ms apart; ``eea_message_received(tlen, plen)`` after copying into the
    registered buffers; ``eea_direct_trigger(id_len, plen)``;
    ``eea_set_connection_status(i32)``; ``eea_shutdown()`` before unloading.

Registered functions come from plugins (entry-point group
``edge_agent.registered_functions``): a callable ``fn(call, *args) -> int`` where
``call`` is an :class:`EEACall`. An imported ``eea_fn_<name>`` with no plugin
still instantiates: a stub returns 1 and a warning names it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import structlog
import wasmtime
from paho.mqtt.client import topic_matches_sub

from agent.device._fsutil import atomic_write
from agent.device.runtime.eea_identity import (
    INTERFACE_VERSION,
    BundleIdentity,
    check_interface,
    live_identity,
)
from agent.device.runtime.eea_settings import EEADefaults, default_settings, is_losant_id
from agent.device.runtime.hostapi import I32, GuestMemory, TokenBucket
from agent.device.runtime.runner import Event, FlowRunner
from agent.device.runtime.sandbox import FlowInstance
from agent.errors import AgentError, InstantiationError
from agent.wire.manifest import MqttTrigger

log = structlog.get_logger("agent.device.runtime.eea")

ENTRY_POINT_GROUP = "edge_agent.registered_functions"
OK, ERROR = 0, 1

EEA_IMPORTS: dict[str, int] = {  # name -> number of i32 params
    "eea_trace": 3,
    "eea_send_message": 5,
    "eea_storage_save": 2,
    "eea_storage_read": 3,
    "eea_get_time": 1,
    "eea_sleep": 1,
    "eea_get_device_id": 3,
    "eea_set_message_buffers": 4,
}


def is_eea_module(module: wasmtime.Module) -> bool:
    """Whether a ``kind: "wasm"`` module is an EEA bundle (by its imports or exports).

    Remembered per compiled module: wasmtime-py wraps every import and export in
    Python to list them (~1.5 ms for the counter example), and twenty flows of one
    module, started together after a restart, share one compiled module."""
    known = _eea_modules.get(module)
    if known is None:
        imports = {(i.module, i.name) for i in module.imports}
        known = any(m == "env" and (n or "").startswith("eea_") for m, n in imports)
        if not known:
            known = {"eea_init", "eea_loop"} <= {e.name for e in module.exports}
        _eea_modules[module] = known
    return known


_eea_modules: weakref.WeakKeyDictionary[wasmtime.Module, bool] = weakref.WeakKeyDictionary()


@dataclass
class EEACall:
    """What a registered-function plugin gets: bounds-checked memory access."""

    caller: Any
    memory: GuestMemory
    flow_id: str
    device_id: str

    def read(self, ptr: int, length: int) -> bytes | None:
        return self.memory.read(self.caller, ptr, length)

    def write(self, ptr: int, data: bytes) -> bool:
        return self.memory.write(self.caller, ptr, data)

    def write_u32(self, ptr: int, value: int) -> bool:
        return self.memory.write_uint(self.caller, ptr, value, 4)

    def write_i32(self, ptr: int, value: int) -> bool:
        return self.memory.write(self.caller, ptr, (value & 0xFFFFFFFF).to_bytes(4, "little"))


RegisteredFunction = Callable[..., int]
_plugins: dict[str, RegisteredFunction] | None = None
_plugins_lock = threading.Lock()


def registered_functions() -> dict[str, RegisteredFunction]:
    """Plugins from the ``edge_agent.registered_functions`` entry points (cached)."""
    global _plugins  # noqa: PLW0603 - a process-wide, lazily built registry
    with _plugins_lock:
        if _plugins is None:
            found: dict[str, RegisteredFunction] = {}
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    found[ep.name] = ep.load()
                except Exception:  # a broken plugin must not stop the agent
                    log.exception("cannot load registered-function plugin", name=ep.name)
            _plugins = found
        return dict(_plugins)


@dataclass
class EEAContext:
    """What the ``env`` imports of one EEA flow touch (thread-safe where it must be)."""

    flow_id: str
    device_id: str
    storage_path: Path
    publish: Callable[[str, bytes, int], None]
    allowed_topics: tuple[str, ...]
    config: EEADefaults = field(default_factory=default_settings)
    publish_rate: float = 50.0
    max_sleep_ms: int = 1000
    #: What the bundle says it is (static reading; the live one after start-up).
    identity: BundleIdentity = field(default_factory=BundleIdentity)
    #: Registered functions the bundle imports: name -> whether a plugin provides it.
    registered: dict[str, bool] = field(default_factory=dict)
    #: The last error-level (1) trace line, for the reason of a failed eea_init.
    last_error_trace: str | None = None
    memory: GuestMemory = field(default_factory=GuestMemory)
    buffers: tuple[int, int, int, int] | None = None
    sent: int = 0
    dropped: int = 0
    traces_dropped: int = 0
    stubs_called: int = 0

    def __post_init__(self) -> None:
        self.log = log.bind(flow_id=self.flow_id, device_id=self.device_id)
        self._trace_bucket = TokenBucket(100, 200)
        self._publish_bucket = TokenBucket(self.publish_rate, self.publish_rate * 2)

    def allow_output(self) -> bool:
        if self._trace_bucket.take():
            return True
        self.traces_dropped += 1
        return False


class EEABindings:
    """``kind: "eea"``: the EEA API in module ``env`` (plus WASI, which bundles may use)."""

    allowed_modules = frozenset({"env", "wasi_snapshot_preview1"})

    def __init__(self, ctx: EEAContext) -> None:
        self.ctx = ctx
        self._imported_memory: wasmtime.Memory | None = None
        self._module: wasmtime.Module | None = None

    def check(self, module: wasmtime.Module) -> None:
        self._module = module
        for imp in module.imports:
            if imp.module != "env":
                continue
            if imp.name == "memory" or (imp.name or "").startswith("eea_fn_"):
                continue
            if imp.name not in EEA_IMPORTS:
                raise InstantiationError(
                    f"EEA bundle imports env.{imp.name}, which is not part of EEA API "
                    f"{INTERFACE_VERSION}"
                )

    def define(self, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
        assert self._module is not None
        ctx = self.ctx
        for imp in self._module.imports:
            if (
                imp.module == "env"
                and imp.name == "memory"
                and isinstance(imp.type, wasmtime.MemoryType)
            ):
                limits = imp.type.limits
                self._imported_memory = wasmtime.Memory(
                    store, wasmtime.MemoryType(wasmtime.Limits(limits.min, limits.max))
                )
                linker.define(store, "env", "memory", self._imported_memory)
        for name, nparams in EEA_IMPORTS.items():
            fn = getattr(self, "_" + name)
            linker.define_func(
                "env",
                name,
                wasmtime.FuncType([I32] * nparams, [I32]),
                _guard(ctx, fn),
                access_caller=True,
            )
        plugins = registered_functions()
        ctx.registered = {}
        for imp in self._module.imports:
            name = imp.name or ""
            if imp.module == "env" and name.startswith("eea_fn_"):
                plugin = plugins.get(name[len("eea_fn_") :])
                ctx.registered[name[len("eea_fn_") :]] = plugin is not None
                self._define_registered(linker, imp, plugin)

    def _define_registered(
        self, linker: wasmtime.Linker, imp: Any, plugin: RegisteredFunction | None
    ) -> None:
        ctx = self.ctx
        ty = imp.type
        name = imp.name
        if plugin is None:
            ctx.log.warning(
                "registered function not provided; calls return an error", function=name
            )

            def stub(_caller: Any, *_args: Any) -> Any:
                ctx.stubs_called += 1
                return ERROR if ty.results else None

            linker.define_func("env", name, ty, stub, access_caller=True)
            return

        def call(caller: Any, *args: Any) -> Any:
            try:
                result = plugin(EEACall(caller, ctx.memory, ctx.flow_id, ctx.device_id), *args)
            except Exception:  # never raise into wasmtime
                ctx.log.exception("registered function failed", function=name)
                return ERROR if ty.results else None
            return int(result) if ty.results else None

        linker.define_func("env", name, ty, call, access_caller=True)

    def bound(self, instance: FlowInstance) -> None:
        exported = instance.export_item("memory")
        ctx = self.ctx
        ctx.memory.memory = (
            exported if isinstance(exported, wasmtime.Memory) else self._imported_memory
        )
        store = instance.store
        assert store is not None

        def read_global(name: str) -> int | None:
            item = instance.export_item(name)
            if not isinstance(item, wasmtime.Global):
                return None
            value = item.value(store)
            return value & 0xFFFFFFFF if isinstance(value, int) else None

        ctx.identity = live_identity(
            read_global, lambda ptr, n: ctx.memory.read(store, ptr, n), ctx.identity
        )
        check_interface(ctx.identity)

    def allow_output(self) -> bool:
        return self.ctx.allow_output()

    # ---------------------------------------------------------- env imports
    def _eea_trace(self, caller: Any, ptr: int, length: int, level: int) -> int:
        ctx = self.ctx
        data = ctx.memory.read(caller, ptr, min(max(length, 0), 4096))
        if data is None:
            return ERROR
        line = data.decode(errors="replace")
        if level == 1:
            ctx.last_error_trace = line[:300]
        if ctx.allow_output():
            fn = ctx.log.error if level == 1 else ctx.log.info
            fn("eea trace", trace_level=level, line=line)
        return OK

    def _eea_send_message(
        self, caller: Any, tptr: int, tlen: int, pptr: int, plen: int, qos: int
    ) -> int:
        ctx = self.ctx
        topic_b = ctx.memory.read(caller, tptr, tlen) if 0 < tlen <= 512 else None
        payload = ctx.memory.read(caller, pptr, plen) if 0 <= plen <= 256 * 1024 else None
        if topic_b is None or payload is None:
            return ERROR
        topic = topic_b.decode(errors="replace")
        if (
            "+" in topic
            or "#" in topic
            or not any(topic_matches_sub(f, topic) for f in ctx.allowed_topics)
        ):
            ctx.dropped += 1
            ctx.log.warning("EEA message to a topic not permitted; dropped", topic=topic[:200])
            return ERROR
        if not ctx._publish_bucket.take():
            ctx.dropped += 1
            return ERROR
        ctx.publish(topic, payload, 1 if qos else 0)
        ctx.sent += 1
        return OK

    def _eea_storage_save(self, caller: Any, ptr: int, length: int) -> int:
        ctx = self.ctx
        if length < 0 or length > ctx.config.storage_size:
            ctx.log.warning("EEA storage over its size; not saved", bytes=length)
            return ERROR
        data = ctx.memory.read(caller, ptr, length)
        if data is None:
            return ERROR
        try:
            atomic_write(ctx.storage_path, data)
        except OSError as exc:
            ctx.log.error("cannot save EEA storage", error=str(exc))
            return ERROR
        return OK

    def _eea_storage_read(self, caller: Any, out: int, buf_len: int, out_len: int) -> int:
        ctx = self.ctx
        try:
            data = ctx.storage_path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError:
            return ERROR
        if len(data) > buf_len:  # never hand over truncated JSON
            ctx.log.warning(
                "EEA storage larger than the bundle's buffer; not read",
                bytes=len(data),
                buffer=buf_len,
            )
            return ERROR
        if data and not ctx.memory.write(caller, out, data):
            return ERROR
        return OK if ctx.memory.write_uint(caller, out_len, len(data), 4) else ERROR

    def _eea_get_time(self, caller: Any, out: int) -> int:
        now = time.time_ns() // 1_000_000
        return OK if self.ctx.memory.write_uint(caller, out, now, 8) else ERROR

    def _eea_sleep(self, _caller: Any, ms: int) -> int:
        # A blocking host call epochs cannot interrupt: bounded here.
        ms = ms & 0xFFFFFFFF
        time.sleep(min(ms, self.ctx.max_sleep_ms) / 1000)
        return OK if ms <= self.ctx.max_sleep_ms else ERROR

    def _eea_get_device_id(self, caller: Any, out: int, buf_len: int, out_len: int) -> int:
        data = self.ctx.device_id.encode()
        if len(data) > buf_len or len(data) > 255:
            return ERROR
        ok = self.ctx.memory.write(caller, out, data)
        return OK if ok and self.ctx.memory.write_uint(caller, out_len, len(data), 1) else ERROR

    def _eea_set_message_buffers(
        self, caller: Any, tptr: int, tlen: int, pptr: int, plen: int
    ) -> int:
        mem = self.ctx.memory
        if mem.read(caller, tptr, tlen) is None or mem.read(caller, pptr, plen) is None:
            return ERROR
        self.ctx.buffers = (tptr & 0xFFFFFFFF, tlen, pptr & 0xFFFFFFFF, plen)
        return OK


def init_failure(rc: int, ctx: EEAContext) -> str:
    """Why a bundle refused to initialise, naming the likely cause."""
    trace = f" (last error trace: {ctx.last_error_trace!r})" if ctx.last_error_trace else ""
    if not is_losant_id(ctx.device_id):
        return (
            f"eea_init returned {rc}: the bundle refused device id {ctx.device_id!r}; EEA "
            "bundles compiled by Losant need the Losant device id (24 hex digits): set "
            f"losant.device_id, or config.eea.deviceId for this flow{trace}"
        )
    missing = sorted(n for n, ok in ctx.registered.items() if not ok)
    hint = f"; registered functions not provided: {', '.join(missing)}" if missing else ""
    return f"eea_init returned {rc}{trace}{hint}"


def _guard(ctx: EEAContext, fn: Callable[..., int]) -> Callable[..., int]:
    def wrapper(caller: Any, *args: int) -> int:
        try:
            return fn(caller, *args)
        except Exception:  # never raise into wasmtime
            ctx.log.exception("EEA host function failed", function=fn.__name__)
            return ERROR

    return wrapper


# ---------------------------------------------------------------- the runner
EV_LOOP = 101
EV_MESSAGE = 102
EV_DIRECT = 103
EV_CONNECTION = 104


class EEARunner(FlowRunner):
    """Drives an EEA bundle: init sequence, ``eea_loop`` ticks, messages, shutdown."""

    def __init__(
        self, *args: Any, eea: EEAContext, extra_topics: tuple[str, ...] = (), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.eea = eea
        self.extra_topics = extra_topics
        self.connected = False

    async def _after_start(self, inst: FlowInstance) -> None:
        odd = [t.type for t in self.spec.triggers if not isinstance(t, MqttTrigger)]
        if odd:
            raise InstantiationError(
                f"an EEA bundle takes only mqtt triggers (it runs its own workflows' "
                f"triggers); got {', '.join(odd)}"
            )
        cfg = self.eea.config
        self.eea.buffers = None

        self.eea.last_error_trace = None

        def init() -> int:
            setters: list[tuple[str, tuple[int, ...]]] = [  # sizes in bytes (EEA API 1.0.0)
                ("eea_config_set_trace_level", (cfg.trace_level,)),
                ("eea_config_set_debug_enabled", (1 if cfg.debug_enabled else 0,)),
                ("eea_config_set_message_buffer_lengths", (cfg.topic_buffer, cfg.payload_buffer)),
                ("eea_config_set_queue_size", (cfg.queue_size,)),
                ("eea_config_set_storage_size", (cfg.storage_size,)),
                ("eea_config_set_storage_interval", (cfg.storage_interval_ms,)),
            ]
            for name, args in setters:
                if inst.has_export(name):
                    inst.call(name, *args)
            if inst.has_export("eea_set_connection_status"):
                inst.call("eea_set_connection_status", 1 if self.connected else 0)
            return int(inst.call("eea_init") or 0) if inst.has_export("eea_init") else 0

        rc = await self.runtime.run(init, timeout=self.call_timeout, what="eea_init")
        if rc != 0:
            raise InstantiationError(init_failure(rc, self.eea))

    def _extra_tasks(self) -> list[tuple[str, Any]]:
        return [("eea-loop", self._loop_ticker())]

    async def _loop_ticker(self) -> None:
        period = self.eea.config.loop_interval_ms / 1000
        while True:
            await asyncio.sleep(period)
            self.offer(Event(EV_LOOP, b"", b"", tick="__eea_loop__"))

    def health_info(self) -> dict[str, Any]:
        info = super().health_info()
        info["bundle"] = self.eea.identity.as_wire()
        registered = self.eea.registered
        info["registeredFunctions"] = {
            "imported": sorted(registered),
            "missing": sorted(n for n, ok in registered.items() if not ok),
        }
        return info

    def accepts(self, topic: str) -> bool:
        return topic in self.extra_topics or super().accepts(topic)

    def message(self, topic: str, payload: bytes) -> bool:
        return self.offer(Event(EV_MESSAGE, topic.encode(), payload))

    def command(self, name: str, payload: bytes, reply: Any = None) -> bool:
        return False  # EEA bundles get the raw command message through message()

    def direct_trigger(self, trigger_id: str, payload: bytes) -> bool:
        return self.offer(Event(EV_DIRECT, trigger_id.encode(), payload))

    def connection(self, connected: bool) -> None:
        self.connected = connected
        self.offer(Event(EV_CONNECTION, b"", b"\x01" if connected else b"\x00"))

    HANDLER = "EEA call"

    def _invoke(self, inst: FlowInstance, event: Event) -> tuple[int, bytes | None]:
        """One event (on a wasm worker thread): (0, None) delivered, (1, None) dropped."""
        if event.kind in (EV_MESSAGE, EV_DIRECT):
            buffers = self.eea.buffers
            if buffers is None:
                self.log.warning("EEA bundle registered no message buffers; message dropped")
                return 1, None
            _tptr, tcap, _pptr, pcap = buffers
            if len(event.name) > tcap or len(event.payload) > pcap:
                self.eea.dropped += 1
                self.log.warning(
                    "message larger than the EEA buffers; dropped",
                    topic=event.name[:200].decode(errors="replace"),
                    bytes=len(event.payload),
                    buffer=pcap,
                )
                return 1, None
        self._call(inst, event)
        return 0, None

    def _delivered(self, event: Event, rc: int) -> None:
        if rc == 0:  # (a dropped message was logged where it was dropped)
            self.state.events += 1

    def _call(self, inst: FlowInstance, event: Event) -> None:
        mem = self.eea.memory
        store = inst.store
        if event.kind == EV_LOOP:
            inst.call("eea_loop", time.time_ns() // 1_000_000)
        elif event.kind == EV_CONNECTION:
            if inst.has_export("eea_set_connection_status"):
                inst.call("eea_set_connection_status", event.payload[0])
        elif event.kind in (EV_MESSAGE, EV_DIRECT) and self.eea.buffers is not None:
            tptr, _, pptr, _ = self.eea.buffers
            export = "eea_message_received" if event.kind == EV_MESSAGE else "eea_direct_trigger"
            if not inst.has_export(export):
                return
            mem.write(store, tptr, event.name)
            mem.write(store, pptr, event.payload)
            inst.call(export, len(event.name), len(event.payload))

    async def shutdown(self, timeout: float) -> None:
        """``eea_shutdown`` (the bundle flushes its storage), then stop."""
        inst = self.instance
        for task in self._tasks:
            task.cancel()
        if inst is not None and inst.has_export("eea_shutdown"):
            try:
                await self.runtime.run(
                    lambda: inst.call("eea_shutdown"),
                    timeout=min(timeout, self.call_timeout),
                    what="eea_shutdown",
                )
            except AgentError as exc:
                self.log.warning("eea_shutdown failed", error=str(exc))
        self.stop()
