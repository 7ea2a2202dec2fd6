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
import atexit
import contextlib
import hashlib
import json
import os
import re
import selectors
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
import wasmtime

from agent.device._fsutil import atomic_write
from agent.device.runtime._wasmcall import fast_call
from agent.errors import FlowTrap, InstantiationError, InvalidModule, SandboxError

log = structlog.get_logger("agent.device.runtime.sandbox")

WASM_MAGIC = b"\0asm"
MAX_LINE = 4096
_SELF = "__flow"  # linker name under which a flow's own exports are defined
WASMTIME_VERSION = _pkg_version("wasmtime")

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    memory_limit: int = 64 * 1024 * 1024
    call_deadline_ms: int = 5000
    epoch_tick_ms: int = 10
    #: Deterministic CPU budget of one call (wasmtime fuel units, ~1 per instruction).
    fuel_per_call: int = 10_000_000_000
    #: Longest single WASI sleep (poll_oneoff on a clock); 0 means call_deadline_ms.
    max_sleep_ms: int = 0
    table_elements: int = 100_000
    instances: int = 16
    tables: int = 16

    @property
    def sleep_cap_ms(self) -> int:
        return self.max_sleep_ms or self.call_deadline_ms

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


def engine_config() -> wasmtime.Config:
    """The settings of the shared Engine (those that change compiled code are in
    :attr:`Runtime.SETTINGS`, the compiled-module cache key)."""
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = True
    cfg.cranelift_opt_level = "speed"
    # Parallel compilation (wasmtime's pool of one thread per core, started by the
    # first compile and kept) halves the compile of a large module on 2 cores: the
    # convergence benchmark's 96 KB module deploys in ~405 ms with it, ~766 ms
    # without. Its threads cost ~1 MiB of RSS with malloc arenas capped (_process).
    # (Does not change the compiled code: not in SETTINGS.)
    cfg.parallel_compilation = True
    return cfg


def release_free_memory() -> None:
    """Return memory that malloc holds free to the system (glibc ``malloc_trim``; a
    no-op elsewhere). For after a burst of native allocations, such as a compile."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl, macOS)
        return None


_malloc_trim = _find_malloc_trim()


class Runtime:
    """The process-wide wasmtime Engine, its epoch ticker and wasm worker threads.

    Shared by every flow (and by every simulated agent in one process).
    """

    #: Engine settings; part of the compiled-module cache key.
    SETTINGS = "epoch,fuel,speed"

    def __init__(self, limits: Limits, workers: int = 4, cache_dir: Path | None = None) -> None:
        self.limits = limits
        self._engine: wasmtime.Engine | None = None
        self._engine_lock = threading.Lock()
        self.cache_dir = cache_dir
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(cache_dir, 0o700)  # serialized modules are trusted: daemon-owned only
        self.cache_hits = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wasm")
        self._ticker: asyncio.Task[None] | None = None
        # Calls on worker threads that have not returned yet (a call whose run() timed
        # out still counts until its thread is done: the epoch must keep ticking to
        # interrupt it). The ticker sleeps while this is 0, so an idle agent does not
        # wake 100 times a second.
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._work: asyncio.Event | None = None
        self._modules: dict[str, wasmtime.Module] = {}
        self._modules_lock = threading.Lock()
        self._background: set[Future[None]] = set()
        self._background_lock = threading.Lock()
        self._users = 0

    @property
    def engine(self) -> wasmtime.Engine:
        """The Engine, made on first use: an agent with no flows never needs one (making
        it maps ~3.5 MiB of wasmtime's library into memory)."""
        engine = self._engine
        if engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = wasmtime.Engine(engine_config())
                engine = self._engine
        return engine

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
            self._work = asyncio.Event()
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
        await asyncio.to_thread(self.settle, 5.0)  # a cache file being written lands
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _tick(self) -> None:
        interval = self.limits.epoch_tick_ms / 1000
        assert self._work is not None
        while True:
            if self._busy == 0:
                self._work.clear()
                await self._work.wait()
            await asyncio.sleep(interval)
            if self._engine is not None:
                self._engine.increment_epoch()

    @property
    def busy(self) -> int:
        """Calls running on worker threads (including ones whose caller gave up)."""
        return self._busy

    def _done(self) -> None:
        with self._busy_lock:
            self._busy -= 1

    def _submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Submit ``fn`` to a worker, counted in :attr:`busy` until its thread is done
        (or it is cancelled before it started)."""
        with self._busy_lock:
            self._busy += 1
        if self._work is not None:
            self._work.set()  # on the loop thread, like the ticker that clears it

        def job() -> T:
            try:
                return fn()
            finally:
                self._done()

        try:
            cfut = self._pool.submit(job)
        except BaseException:  # shut down
            self._done()
            raise
        cfut.add_done_callback(lambda f: self._done() if f.cancelled() else None)
        return asyncio.wrap_future(cfut)

    async def run(self, fn: Callable[[], T], timeout: float | None = None, what: str = "call") -> T:
        """Run ``fn`` on a wasm worker thread, bounded by ``timeout`` seconds."""
        fut = self._submit(fn)
        if timeout is None:
            return await fut
        try:
            # (asyncio.timeout, not wait_for: no extra task per call. On expiry the
            # awaited future is cancelled; a thread that is running finishes alone.)
            async with asyncio.timeout(timeout):
                return await fut
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
        module = self._load_cached(key)
        if module is None:
            self.validate(data)
            try:
                module = wasmtime.Module(self.engine, data)
            except wasmtime.WasmtimeError as exc:
                raise InvalidModule(f"cannot compile module: {_trap_message(exc)}") from None
            except BaseException:
                release_free_memory()
                raise
            # The cache file and the trim are not needed to start this module: they
            # run after, off the deployment's path (a cache write is two fsyncs).
            self._in_background(lambda: self._after_compile(key, module))
        with self._modules_lock:
            self._modules[key] = module
        return module

    def _after_compile(self, key: str, module: wasmtime.Module) -> None:
        self._store_cached(key, module)
        # Cranelift frees megabytes of scratch memory when a compile ends, but glibc
        # keeps it in the process (6 MiB for the EEA samples); give it back.
        release_free_memory()

    def _in_background(self, job: Callable[[], None]) -> None:
        """Run ``job`` on a worker thread after the current work (not a wasm call: the
        epoch ticker does not wait for it); :meth:`settle` waits for such jobs."""
        try:
            fut = self._pool.submit(job)
        except RuntimeError:  # shut down: do it here
            job()
            return
        with self._background_lock:
            self._background.add(fut)
        fut.add_done_callback(self._background_done)

    def _background_done(self, fut: Future[None]) -> None:
        with self._background_lock:
            self._background.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("background work after a compile failed", error=str(fut.exception()))

    def settle(self, timeout: float | None = None) -> None:
        """Wait (blocking) for the work queued after compiles: the cache files."""
        with self._background_lock:
            pending = list(self._background)
        futures_wait(pending, timeout)

    def _cache_path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        tag = hashlib.sha256(f"{WASMTIME_VERSION}|{self.SETTINGS}".encode()).hexdigest()[:12]
        return self.cache_dir / f"{key}.{tag}.cwasm"

    def _load_cached(self, key: str) -> wasmtime.Module | None:
        """A module compiled earlier by this daemon (same wasmtime, same settings).

        Only files this process wrote into its own 0700 directory are deserialized:
        deserializing untrusted bytes is unsafe."""
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            module = wasmtime.Module.deserialize_file(self.engine, str(path))
        except wasmtime.WasmtimeError:
            path.unlink(missing_ok=True)  # stale or damaged: compile again
            return None
        self.cache_hits += 1
        return module

    def _store_cached(self, key: str, module: wasmtime.Module) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        try:
            atomic_write(path, bytes(module.serialize()))
        except OSError as exc:  # a full disk costs a compile next time, nothing more
            log.warning("cannot write the compiled-module cache", error=str(exc))

    def forget_cached(self, keep: set[str]) -> int:
        """Delete cached compiled modules whose digest is not in ``keep``."""
        if self.cache_dir is None:
            return 0
        removed = 0
        for path in self.cache_dir.glob("*.cwasm"):
            if path.name.split(".")[0] not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def forget(self, sha256: str) -> None:
        with self._modules_lock:
            self._modules.pop(sha256, None)


_SUB_SIZE = 48
_EVENT_SIZE = 32
_CLOCK, _FD_READ, _FD_WRITE = 0, 1, 2
_ERRNO_INVAL, _ERRNO_FAULT = 28, 21


def define_bounded_poll(linker: wasmtime.Linker, cap_ms: int) -> None:
    """Shadow WASI ``poll_oneoff`` so a guest's sleep is bounded.

    Epoch interruption cannot stop a thread asleep in a host call, so a guest that
    sleeps for an hour would hold a wasm worker thread for an hour. Here a clock
    subscription sleeps at most ``cap_ms``; fd subscriptions (flows have no sockets
    and no stdin) report ready at once. Never raises into wasmtime: errors are errno.
    """
    i32 = wasmtime.ValType.i32()

    def poll(caller: Any, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
        try:
            memory = caller.get("memory")
            if not isinstance(memory, wasmtime.Memory) or not 0 < nsubs <= 64:
                return _ERRNO_INVAL
            in_ptr &= 0xFFFFFFFF
            out_ptr &= 0xFFFFFFFF
            size = memory.data_len(caller)
            if in_ptr + nsubs * _SUB_SIZE > size or out_ptr + nsubs * _EVENT_SIZE > size:
                return _ERRNO_FAULT
            raw = bytes(memory.read(caller, in_ptr, in_ptr + nsubs * _SUB_SIZE))
            subs = [raw[i * _SUB_SIZE : (i + 1) * _SUB_SIZE] for i in range(nsubs)]
            fds = [s for s in subs if s[8] in (_FD_READ, _FD_WRITE)]
            fired = fds
            if not fds:
                waits = []
                for sub in subs:
                    clock = int.from_bytes(sub[16:20], "little")
                    timeout = int.from_bytes(sub[24:32], "little")
                    if int.from_bytes(sub[40:42], "little") & 1:  # absolute time
                        now = time.time_ns() if clock == 0 else time.monotonic_ns()
                        timeout = max(0, timeout - now)
                    waits.append((timeout, sub))
                shortest = min(t for t, _ in waits)
                time.sleep(min(shortest / 1e9, cap_ms / 1000))
                fired = [sub for t, sub in waits if t <= shortest]
            out = bytearray()
            for sub in fired:
                event = bytearray(_EVENT_SIZE)
                event[0:8] = sub[0:8]  # userdata
                event[10] = sub[8]  # type
                out += event
            memory.write(caller, bytes(out), out_ptr)
            memory.write(caller, len(fired).to_bytes(4, "little"), nevents_ptr & 0xFFFFFFFF)
        except Exception:  # never raise into wasmtime
            log.exception("poll_oneoff failed")
            return _ERRNO_FAULT
        return 0

    linker.define_func(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        wasmtime.FuncType([i32] * 4, [i32]),
        poll,
        access_caller=True,
    )


class _Pipe:
    """One guest output stream: a pipe whose write end wasmtime opens as a file."""

    def __init__(self, sink: _LineSink) -> None:
        self.sink = sink
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        # wasmtime opens this path itself; our copy of the write end is not needed.
        self.path = f"/proc/self/fd/{write_fd}"
        self._write_fd: int | None = write_fd
        self.lock = threading.Lock()
        self.closed = False

    def opened(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def drain(self) -> bool:
        """Read what is there into the sink; False at end of stream (caller holds lock)."""
        while not self.closed:
            try:
                data = os.read(self.read_fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                self.sink.flush()
                return False
            self.sink.write(data)
        return False

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.opened()
                os.close(self.read_fd)


class OutputPump:
    """Reads every flow instance's stdout/stderr pipes on one thread.

    Guest output does not use WasiConfig.stdout_custom: wasmtime drops that Python
    callback asynchronously on its own (tokio) thread, which during interpreter
    shutdown aborts the process. Plain pipes keep Python callbacks out of wasmtime
    threads. The calling thread also drains a pipe after every guest call (under the
    pipe's lock, so order is kept), so output is logged when the call returns; the
    pump drains during long calls, so a chatty guest never blocks on a full pipe.
    """

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None

    def open(self, sink: _LineSink) -> _Pipe:
        pipe = _Pipe(sink)
        with self._lock:
            self._sel.register(pipe.read_fd, selectors.EVENT_READ, pipe)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wasm-output", daemon=True)
                self._thread.start()
        os.write(self._wake_w, b"x")
        return pipe

    def _run(self) -> None:
        while True:
            with self._lock:
                sel = self._sel
            for key, _ in sel.select(timeout=1.0):
                pipe = key.data
                if pipe is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                with pipe.lock:
                    alive = not pipe.closed and pipe.drain()
                if not alive:
                    with self._lock, contextlib.suppress(KeyError, ValueError):
                        self._sel.unregister(key.fd)
                    pipe.close()


_pump = OutputPump()


class _LineSink:
    """Turns a guest's stdout/stderr byte stream into log lines (bounded, rate-limited)."""

    def __init__(self, emit: Callable[[str], None], allow: Callable[[], bool]) -> None:
        self._emit = emit
        self._allow = allow
        self._buf = bytearray()
        self._lock = threading.Lock()

    def _line(self, data: bytes | bytearray) -> None:
        if self._allow():
            self._emit(bytes(data).decode(errors="replace")[:MAX_LINE])

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            while True:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    break
                self._line(self._buf[:nl])
                del self._buf[: nl + 1]
            if len(self._buf) > MAX_LINE:
                self._line(self._buf[:MAX_LINE] + "…".encode())
                self._buf.clear()

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                self._line(self._buf)
                self._buf.clear()


class HostBindings(Protocol):
    """What a kind of flow gets from the host besides WASI."""

    #: Import modules a module of this kind may import from.
    allowed_modules: frozenset[str]

    def check(self, module: wasmtime.Module) -> None:
        """Refuse imports the host does not provide (raise InstantiationError)."""

    def define(self, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
        """Define host functions (and an imported memory, if any) on the linker."""

    def bound(self, instance: FlowInstance) -> None:
        """Called once the instance exists (e.g. to find its exported memory)."""

    def allow_output(self) -> bool:
        """Rate limit for stdout/stderr lines."""


class WasiOnly:
    """Bindings of a plain WASI module: no host API."""

    allowed_modules = frozenset({"wasi_snapshot_preview1"})

    def check(self, module: wasmtime.Module) -> None:
        return None

    def define(self, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
        return None

    def bound(self, instance: FlowInstance) -> None:
        return None

    def allow_output(self) -> bool:
        return True


#: Event buffers up to this size are kept between events (bytes).
KEPT_EVENT_BUFFER = 64 * 1024
#: The smallest event buffer asked of ``edge_alloc`` (room for typical events).
MIN_EVENT_BUFFER = 1024


#: (module, name) of each import of a compiled module, read once per module: the
#: Runtime shares one Module among every instance of it (a simulated fleet starts
#: the same module on every device), and ``Module.imports`` wraps each import anew.
_imports: weakref.WeakKeyDictionary[wasmtime.Module, tuple[tuple[str, str], ...]] = (
    weakref.WeakKeyDictionary()
)
_imports_lock = threading.Lock()


def _import_names(module: wasmtime.Module) -> tuple[tuple[str, str], ...]:
    with _imports_lock:
        names = _imports.get(module)
    if names is None:
        names = tuple((imp.module, imp.name or "") for imp in module.imports)
        with _imports_lock:
            _imports[module] = names
    return names


class FlowInstance:
    """One instantiated flow: its Store, Instance and output sinks.

    Blocking methods (:meth:`start`, :meth:`call`, :meth:`dispatch`) run on a wasm
    worker thread; a lock makes each Store used by one thread at a time.
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
        bindings: HostBindings | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.runtime = runtime
        self.module = module
        self.flow_id = flow_id
        self.version = version
        self.limits = limits
        self.config = config or {}
        self.bindings: HostBindings = bindings or WasiOnly()
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._closed = False
        self._close_pending = False
        flog = log.bind(flow_id=flow_id, flow_version=version, device_id=device_id)
        allow = self.bindings.allow_output
        self._stdout = _LineSink(
            lambda line: flog.info("flow output", stream="stdout", line=line), allow
        )
        self._stderr = _LineSink(
            lambda line: flog.warning("flow output", stream="stderr", line=line), allow
        )
        self.store: wasmtime.Store | None = None
        self.instance: wasmtime.Instance | None = None
        self._linker: wasmtime.Linker | None = None
        self._exports: dict[str, wasmtime.Func | None] = {}
        self._calls: dict[str, Any] = {}
        self._pipes: list[_Pipe] = []
        self._memory: Any = None
        #: The event buffer kept from ``edge_alloc`` between events: (ptr, capacity).
        self._event_buf = (0, 0)
        self._device_id = device_id
        _live.add(self)

    def check_imports(self) -> None:
        allowed = self.bindings.allowed_modules
        for module, name in _import_names(self.module):
            if module not in allowed:
                raise InstantiationError(
                    f"module imports {module}.{name}, which this host does not provide "
                    f"(allowed: {', '.join(sorted(allowed))})"
                )
        self.bindings.check(self.module)

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
        self._pipes = [_pump.open(self._stdout), _pump.open(self._stderr)]
        wasi.stdout_file = self._pipes[0].path
        wasi.stderr_file = self._pipes[1].path
        for pipe in self._pipes:
            pipe.opened()
        if self.data_dir is not None:
            wasi.preopen_dir(str(self.data_dir), "/data")
        store.set_wasi(wasi)
        linker = wasmtime.Linker(self.runtime.engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        define_bounded_poll(linker, self.limits.sleep_cap_ms)
        linker.allow_shadowing = False
        self.bindings.define(linker, store)
        self.store = store
        self._arm()
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
        self.bindings.bound(self)
        startup = next((n for n in ("_initialize", "_start") if self._export(n)), None)
        if startup is not None:
            self._call_locked(startup)
        self._drain_output()

    def export_item(self, name: str) -> Any:
        """Any export (memory, global, function) by name, or None. Caller holds the lock."""
        if self._linker is None or self.store is None:
            return None
        try:
            return self._linker.get(self.store, _SELF, name)
        except wasmtime.WasmtimeError:
            return None

    def _export(self, name: str) -> wasmtime.Func | None:
        """The exported function ``name``, or None (cached; caller holds the lock)."""
        if name not in self._exports:
            item = self.export_item(name)
            self._exports[name] = item if isinstance(item, wasmtime.Func) else None
        return self._exports[name]

    def has_export(self, name: str) -> bool:
        with self._lock:
            return self._export(name) is not None

    def _arm(self) -> None:
        """Set this call's wall-clock deadline and fuel budget."""
        assert self.store is not None
        self.store.set_epoch_deadline(self.limits.deadline_ticks)
        if self.limits.fuel_per_call:
            self.store.set_fuel(self.limits.fuel_per_call)
        else:
            self.store.set_fuel(2**63 - 1)

    def _callable(self, name: str) -> Any:
        """The export ``name`` as a callable ``(store, *args)``: a :class:`FastCall`
        where its signature allows one, else the ``Func``; None if there is none."""
        call = self._calls.get(name)
        if call is None:
            func = self._export(name)
            if func is None:
                return None
            assert self.store is not None
            call = self._calls[name] = fast_call(func, self.store) or func
        return call

    def _call_locked(self, name: str, *args: Any, arm: bool = True) -> Any:
        assert self.store is not None
        func = self._callable(name)
        if func is None:
            raise SandboxError(f"flow {self.flow_id} has no exported function {name!r}")
        if arm:
            self._arm()
        try:
            return func(self.store, *args)
        except wasmtime.ExitTrap as exc:
            if exc.code == 0:
                return None
            raise FlowTrap(f"{name} exited with code {exc.code}", code="exit") from None
        except wasmtime.Trap as exc:
            code = _trap_code(exc)
            if code == "deadline":
                what = f"exceeded the {self.limits.call_deadline_ms} ms call deadline"
            elif code == "out_of_fuel":
                what = f"ran out of fuel ({self.limits.fuel_per_call} units per call)"
            else:
                what = f"trapped: {_trap_message(exc)}"
            raise FlowTrap(f"{name} {what}", code=code) from None
        except wasmtime.WasmtimeError as exc:
            raise FlowTrap(f"{name} failed: {_trap_message(exc)}") from None

    def call(self, name: str, *args: Any) -> Any:
        """Call an export under the per-call deadline and fuel budget (blocking)."""
        with self._lock:
            try:
                if self._closed:
                    raise SandboxError(f"flow {self.flow_id} is stopped")
                return self._call_locked(name, *args)
            finally:
                self._drain_output()
                if self._close_pending:
                    self._release_locked()

    def dispatch(self, kind: int, name: bytes, payload: bytes) -> int:
        """Deliver one trigger event through ``edge_on_event`` (blocking).

        The event is copied into a buffer from ``edge_alloc``, kept for the next
        events while it is big enough (see :meth:`_event_buffer`). Allocation, copy
        and handler share one deadline and fuel budget. Returns the handler's code.
        """
        with self._lock:
            try:
                if self._closed:
                    raise SandboxError(f"flow {self.flow_id} is stopped")
                return self._dispatch_locked(kind, name, payload)
            finally:
                self._drain_output()
                if self._close_pending:
                    self._release_locked()

    def _dispatch_locked(self, kind: int, name: bytes, payload: bytes) -> int:
        assert self.store is not None
        if self._export("edge_on_event") is None:
            raise SandboxError(f"flow {self.flow_id} has triggers but exports no edge_on_event")
        size = len(name) + len(payload)
        self._arm()
        ptr = self._event_buffer(size) if size else 0
        if size:
            self._memory.write(self.store, name + payload, ptr)
        rc = self._call_locked(
            "edge_on_event", kind, ptr, len(name), ptr + len(name), len(payload), arm=False
        )
        if size > KEPT_EVENT_BUFFER:  # a large buffer is not kept: give it back now
            self._free_event_buffer()
        return int(rc or 0)

    def _event_buffer(self, size: int) -> int:
        """A buffer of at least ``size`` bytes in the flow's memory (caller holds the lock).

        Buffers up to :data:`KEPT_EVENT_BUFFER` bytes are kept between events, so an
        event costs one export call (``edge_on_event``) rather than three; a bigger
        event replaces the kept buffer (``edge_free`` the old one, ``edge_alloc``).
        """
        ptr, capacity = self._event_buf
        if size <= capacity:
            return ptr
        if self._export("edge_alloc") is None:
            raise SandboxError(f"flow {self.flow_id} exports edge_on_event but no edge_alloc")
        self._free_event_buffer()
        want = size if size > KEPT_EVENT_BUFFER else max(size, MIN_EVENT_BUFFER)
        ptr = int(self._call_locked("edge_alloc", want, arm=False)) & 0xFFFFFFFF
        if self._memory is None:
            self._memory = self.export_item("memory")
        memory = self._memory
        if ptr == 0 or not isinstance(memory, wasmtime.Memory):
            raise FlowTrap("edge_alloc returned NULL (out of memory?)", code="alloc")
        assert self.store is not None
        if ptr + want > memory.data_len(self.store):  # (memory only grows: checked once)
            raise FlowTrap("edge_alloc returned a pointer outside memory", code="alloc")
        self._event_buf = (ptr, want)
        return ptr

    def _free_event_buffer(self) -> None:
        ptr, capacity = self._event_buf
        self._event_buf = (0, 0)
        if ptr and self._export("edge_free") is not None:
            self._call_locked("edge_free", ptr, capacity, arm=False)

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

    def _drain_output(self) -> None:
        """Log what the guest wrote during the last call (see OutputPump)."""
        for pipe in self._pipes:
            with pipe.lock:
                if not pipe.closed:
                    pipe.drain()
                    pipe.sink.flush()

    def _release_locked(self) -> None:
        self._close_pending = False
        self._drain_output()
        self._exports.clear()
        self._calls.clear()
        self._memory = None
        self._event_buf = (0, 0)
        self._linker = None
        self.instance = None
        store, self.store = self.store, None
        if store is not None:
            # Free it now, deterministically: a Store freed later by the garbage
            # collector during interpreter shutdown makes wasmtime's WASI thread call
            # back into a finalizing Python and abort the process.
            store.close()
        _live.discard(self)


#: Instances whose Store is not yet freed; closed by an atexit hook.
_live: weakref.WeakSet[FlowInstance] = weakref.WeakSet()


@atexit.register
def _close_live_instances() -> None:
    """Free every Store while Python is still whole (see _release_locked)."""
    for inst in list(_live):
        with contextlib.suppress(Exception):
            inst.close()
