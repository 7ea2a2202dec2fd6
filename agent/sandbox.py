"""The wasmtime sandbox: one shared Engine, a fresh Store per flow instance.

- The Engine has epoch interruption on; :class:`Runtime` runs an asyncio ticker
  that increments the epoch every ``epoch_tick_ms``, and every call into a guest
  sets a deadline of ``call_deadline_ms`` first (the default deadline of 0 would
  trap at once).
- Stores get ``set_limits(memory_size=..., memories=1, ...)``; ``memory_size`` is per
  memory, so ``memories=1`` makes the cap the total.
- WASI preview 1 with no preopened directories, no inherited environment, argv
  ``[flow_id]``; stdout/stderr lines go to the structured log, tagged with the flow id.
- wasm runs on a small thread pool, never on the event loop. A Store is used by one
  thread at a time (each instance serialises its calls with a lock).
- Host functions defined here never raise into wasmtime (a raising host function
  can surface in another thread's trap): they return error codes.
- ``Module(engine, data)`` accepts WAT *text* too, so bytes are checked for the
  ``\\0asm`` magic and validated before compiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version as _pkg_version
from typing import Any, TypeVar

import structlog
import wasmtime

from .errors import FlowTrap, InstantiationError, InvalidModule, SandboxError

log = structlog.get_logger("agent.sandbox")

WASM_MAGIC = b"\0asm"
ALLOWED_IMPORT_MODULES = frozenset({"wasi_snapshot_preview1"})
MAX_LINE = 4096
_SELF = "__flow"  # linker name under which a flow's own exports are defined
WASMTIME_VERSION = _pkg_version("wasmtime")

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    memory_limit: int = 64 * 1024 * 1024
    call_deadline_ms: int = 5000
    epoch_tick_ms: int = 10
    table_elements: int = 100_000
    instances: int = 16
    tables: int = 16

    @property
    def deadline_ticks(self) -> int:
        return max(1, -(-self.call_deadline_ms // self.epoch_tick_ms))


def _trap_code(exc: wasmtime.Trap) -> str:
    code = exc.trap_code
    if code is None:
        return "trap"
    name = str(getattr(code, "name", code)).lower()
    return {"interrupt": "deadline"}.get(name, name)


def _trap_message(exc: BaseException) -> str:
    """One readable line: wasmtime's cause ("wasm trap: ...") and where it happened."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    cause = lines[-1]
    if "Caused by:" in text:
        cause = re.sub(r"^\d+:\s*", "", lines[-1]).removeprefix("wasm trap: ")
    where = ""
    frames = getattr(exc, "frames", None) or []
    if frames:
        top = frames[0]
        name = top.func_name or f"wasm function {top.func_index}"
        where = f" in {name}"
    elif "Caused by:" not in text:
        return lines[0]
    return f"{cause}{where}"


class Runtime:
    """The process-wide wasmtime Engine, its epoch ticker and wasm worker threads.

    Shared by every flow (and by every simulated agent in one process).
    """

    def __init__(self, limits: Limits, workers: int = 4) -> None:
        self.limits = limits
        cfg = wasmtime.Config()
        cfg.epoch_interruption = True
        cfg.cranelift_opt_level = "speed"
        self.engine = wasmtime.Engine(cfg)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wasm")
        self._ticker: asyncio.Task[None] | None = None
        self._modules: dict[str, wasmtime.Module] = {}
        self._modules_lock = threading.Lock()
        self._users = 0

    @property
    def description(self) -> str:
        return f"wasmtime {WASMTIME_VERSION}"

    async def __aenter__(self) -> Runtime:
        self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    def acquire(self) -> None:
        """Start the ticker on first use (several agents may share one runtime)."""
        self._users += 1
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(
                self._tick(), name="wasm-epoch-ticker"
            )

    async def release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _tick(self) -> None:
        interval = self.limits.epoch_tick_ms / 1000
        while True:
            await asyncio.sleep(interval)
            self.engine.increment_epoch()

    async def run(self, fn: Callable[[], T], timeout: float | None = None, what: str = "call") -> T:
        """Run ``fn`` on a wasm worker thread, bounded by ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, fn)
        if timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise FlowTrap(
                f"{what} did not return within {timeout:.1f} s (blocked in a host call)",
                code="deadline",
            ) from None

    # ----------------------------------------------------------- compilation
    def validate(self, data: bytes) -> None:
        if not data.startswith(WASM_MAGIC):
            raise InvalidModule("not a WebAssembly module (missing \\0asm header)")
        try:
            wasmtime.Module.validate(self.engine, data)
        except wasmtime.WasmtimeError as exc:
            raise InvalidModule(f"invalid WebAssembly module: {_trap_message(exc)}") from None

    def compile(self, data: bytes, sha256: str | None = None) -> wasmtime.Module:
        """Validate and compile (blocking: call through :meth:`run`). Cached by digest."""
        key = sha256 or hashlib.sha256(data).hexdigest()
        with self._modules_lock:
            cached = self._modules.get(key)
        if cached is not None:
            return cached
        self.validate(data)
        try:
            module = wasmtime.Module(self.engine, data)
        except wasmtime.WasmtimeError as exc:
            raise InvalidModule(f"cannot compile module: {_trap_message(exc)}") from None
        with self._modules_lock:
            self._modules[key] = module
        return module

    def forget(self, sha256: str) -> None:
        with self._modules_lock:
            self._modules.pop(sha256, None)


class _LineSink:
    """Turns a guest's stdout/stderr byte stream into log lines (bounded)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._buf = bytearray()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            while True:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    break
                self._emit(self._buf[:nl].decode(errors="replace")[:MAX_LINE])
                del self._buf[: nl + 1]
            if len(self._buf) > MAX_LINE:
                self._emit(self._buf[:MAX_LINE].decode(errors="replace") + "…")
                self._buf.clear()

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                self._emit(self._buf.decode(errors="replace")[:MAX_LINE])
                self._buf.clear()


class FlowInstance:
    """One instantiated flow: its Store, Instance and output sinks.

    Blocking methods (:meth:`start`, :meth:`call`) run on a wasm worker thread.
    """

    def __init__(
        self,
        runtime: Runtime,
        module: wasmtime.Module,
        *,
        flow_id: str,
        version: str,
        device_id: str,
        limits: Limits,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config or {}
        self.module = module
        self.flow_id = flow_id
        self.version = version
        self.limits = limits
        self._lock = threading.Lock()
        self._closed = False
        self._close_pending = False
        flog = log.bind(flow_id=flow_id, flow_version=version, device_id=device_id)
        self._stdout = _LineSink(lambda line: flog.info("flow output", stream="stdout", line=line))
        self._stderr = _LineSink(
            lambda line: flog.warning("flow output", stream="stderr", line=line)
        )
        self.store: wasmtime.Store | None = None
        self.instance: wasmtime.Instance | None = None
        self._linker: wasmtime.Linker | None = None
        self._exports: dict[str, wasmtime.Func | None] = {}
        self._device_id = device_id

    def check_imports(self) -> None:
        for imp in self.module.imports:
            if imp.module not in ALLOWED_IMPORT_MODULES:
                raise InstantiationError(
                    f"module imports {imp.module}.{imp.name}, which this host does not provide "
                    f"(allowed: {', '.join(sorted(ALLOWED_IMPORT_MODULES))})"
                )

    def start(self) -> None:
        """Instantiate in a fresh Store and run the start-up export (blocking)."""
        with self._lock:
            try:
                self._start_locked()
            finally:
                if self._close_pending:
                    self._release_locked()

    def _start_locked(self) -> None:
        self.check_imports()
        store = wasmtime.Store(self.runtime.engine)
        lim = self.limits
        store.set_limits(
            memory_size=lim.memory_limit,
            table_elements=lim.table_elements,
            instances=lim.instances,
            tables=lim.tables,
            memories=1,
        )
        wasi = wasmtime.WasiConfig()
        wasi.argv = [self.flow_id]
        wasi.env = [
            ("EDGE_FLOW_ID", self.flow_id),
            ("EDGE_FLOW_VERSION", self.version),
            ("EDGE_DEVICE_ID", self._device_id),
            ("EDGE_FLOW_CONFIG", json.dumps(self.config, separators=(",", ":"))),
        ]
        wasi.stdout_custom = self._stdout.write
        wasi.stderr_custom = self._stderr.write
        store.set_wasi(wasi)
        linker = wasmtime.Linker(self.runtime.engine)
        linker.define_wasi()
        store.set_epoch_deadline(self.limits.deadline_ticks)
        self.store = store
        try:
            self.instance = linker.instantiate(store, self.module)
        except wasmtime.Trap as exc:
            raise FlowTrap(
                f"trap during instantiation: {_trap_message(exc)}", _trap_code(exc)
            ) from None
        except wasmtime.WasmtimeError as exc:
            raise InstantiationError(f"cannot instantiate: {_trap_message(exc)}") from None
        # Exports are looked up by name through the linker: wasmtime-py's
        # instance.exports() wraps every export in Python (33 ms for 1,100 exports).
        linker.define_instance(store, _SELF, self.instance)
        self._linker = linker
        startup = next((n for n in ("_initialize", "_start") if self._export(n)), None)
        if startup is not None:
            self._call_locked(startup)
        self._stdout.flush()
        self._stderr.flush()

    def _export(self, name: str) -> wasmtime.Func | None:
        """The exported function ``name``, or None (cached; caller holds the lock)."""
        if name in self._exports:
            return self._exports[name]
        func: wasmtime.Func | None = None
        if self._linker is not None and self.store is not None:
            try:
                item = self._linker.get(self.store, _SELF, name)
            except wasmtime.WasmtimeError:
                item = None
            func = item if isinstance(item, wasmtime.Func) else None
        self._exports[name] = func
        return func

    def _call_locked(self, name: str, *args: Any) -> Any:
        assert self.store is not None
        func = self._export(name)
        if func is None:
            raise SandboxError(f"flow {self.flow_id} has no exported function {name!r}")
        self.store.set_epoch_deadline(self.limits.deadline_ticks)
        try:
            return func(self.store, *args)
        except wasmtime.ExitTrap as exc:
            if exc.code == 0:
                return None
            raise FlowTrap(f"{name} exited with code {exc.code}", code="exit") from None
        except wasmtime.Trap as exc:
            code = _trap_code(exc)
            what = (
                f"exceeded the {self.limits.call_deadline_ms} ms call deadline"
                if code == "deadline"
                else f"trapped: {_trap_message(exc)}"
            )
            raise FlowTrap(f"{name} {what}", code=code) from None
        except wasmtime.WasmtimeError as exc:
            raise FlowTrap(f"{name} failed: {_trap_message(exc)}") from None

    def call(self, name: str, *args: Any) -> Any:
        """Call an export under the per-call deadline (blocking)."""
        with self._lock:
            try:
                if self._closed:
                    raise SandboxError(f"flow {self.flow_id} is stopped")
                return self._call_locked(name, *args)
            finally:
                if self._close_pending:
                    self._release_locked()

    def close(self) -> None:
        """Stop the instance without ever blocking the caller (the event loop).

        If a worker thread is inside a call (e.g. stuck in a blocking WASI call that
        epochs cannot interrupt), the Store is released when that call returns.
        """
        self._closed = True
        if not self._lock.acquire(blocking=False):
            self._close_pending = True
            return
        try:
            self._release_locked()
        finally:
            self._lock.release()

    def _release_locked(self) -> None:
        self._close_pending = False
        self._stdout.flush()
        self._stderr.flush()
        self._exports.clear()
        self._linker = None
        self.instance = None
        self.store = None
