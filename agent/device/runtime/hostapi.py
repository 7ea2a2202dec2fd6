"""The ``edge`` host API for ``kind: "wasm"`` flows (flow ABI v1; see docs/flow-abi.md).

Every host function:

- validates each pointer/length against the guest's linear memory;
- never raises into wasmtime (a raising host function can surface as another
  thread's trap): any unexpected exception becomes ``EDGE_ERR_INTERNAL``;
- runs on a wasm worker thread, so what it touches is thread-safe.

Imports (module ``edge``), all returning i32 status (0 = ok, < 0 = error) except
``time_ms``::

    publish(topic_ptr, topic_len, payload_ptr, payload_len, qos) -> i32
    log(level, msg_ptr, msg_len) -> i32                    level 0 debug .. 3 error
    kv_get(key_ptr, key_len, out_ptr, out_cap, out_len_ptr) -> i32   out_len as u32
    kv_set(key_ptr, key_len, val_ptr, val_len) -> i32
    kv_delete(key_ptr, key_len) -> i32
    time_ms() -> i64                                        ms since the Unix epoch
    config_get(out_ptr, out_cap, out_len_ptr) -> i32        the flow's config JSON
    respond(body_ptr, body_len) -> i32      while handling a command: its result (UTF-8,
                                            JSON or text, <= 64 KiB; the last call wins)
    defer_update(seconds) -> i32            the flow is busy: hold installs of a new
                                            version back for up to ``seconds`` (0..3600;
                                            0 withdraws the request; the last call wins)

Exports a flow provides to receive trigger events::

    edge_alloc(size) -> ptr          (required when the flow has triggers)
    edge_on_event(kind, name_ptr, name_len, payload_ptr, payload_len) -> i32
    edge_free(ptr, size)             (optional; called after edge_on_event)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import wasmtime

from agent.device.runtime.kvstore import MAX_KEY, KVStore, QuotaExceeded
from agent.wire.manifest import TopicPolicy

log = structlog.get_logger("agent.device.runtime.hostapi")

EDGE_OK = 0
EDGE_ERR_BOUNDS = -1
EDGE_ERR_TOO_LARGE = -2
EDGE_ERR_DENIED = -3
EDGE_ERR_NOT_FOUND = -4
EDGE_ERR_QUOTA = -5
EDGE_ERR_BUFFER = -6
EDGE_ERR_RATE = -7
EDGE_ERR_INVALID = -8
EDGE_ERR_INTERNAL = -9

ERROR_NAMES = {
    EDGE_ERR_BOUNDS: "bounds",
    EDGE_ERR_TOO_LARGE: "too large",
    EDGE_ERR_DENIED: "denied",
    EDGE_ERR_NOT_FOUND: "not found",
    EDGE_ERR_QUOTA: "quota",
    EDGE_ERR_BUFFER: "buffer too small",
    EDGE_ERR_RATE: "rate limited",
    EDGE_ERR_INVALID: "invalid",
    EDGE_ERR_INTERNAL: "internal",
}

MAX_PAYLOAD = 256 * 1024
MAX_RESPONSE = 64 * 1024
MAX_LOG_LINE = 4096
LOG_LEVELS = ("debug", "info", "warning", "error")

#: Event kinds passed to ``edge_on_event``.
EVENT_STARTUP = 1
EVENT_INTERVAL = 2
EVENT_COMMAND = 3
EVENT_MQTT = 4

#: The functions of the ``edge`` import module (flow ABI v1).
EDGE_FUNCTIONS = frozenset(
    {
        "publish",
        "log",
        "kv_get",
        "kv_set",
        "kv_delete",
        "time_ms",
        "config_get",
        "respond",
        "defer_update",
    }
)
#: The longest one ``defer_update`` call may ask for (the agent bounds the total).
MAX_DEFER_CALL_S = 3600

I32 = wasmtime.ValType.i32()
I64 = wasmtime.ValType.i64()


class TokenBucket:
    """A thread-safe token bucket: ``rate`` per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


class GuestMemory:
    """Bounds-checked access to one instance's linear memory (set after instantiation)."""

    def __init__(self) -> None:
        self.memory: wasmtime.Memory | None = None

    def read(self, ctx: Any, ptr: int, length: int) -> bytes | None:
        ptr &= 0xFFFFFFFF
        if self.memory is None or length < 0 or ptr + length > self.memory.data_len(ctx):
            return None
        return bytes(self.memory.read(ctx, ptr, ptr + length))

    def write(self, ctx: Any, ptr: int, data: bytes) -> bool:
        ptr &= 0xFFFFFFFF
        if self.memory is None or ptr + len(data) > self.memory.data_len(ctx):
            return False
        self.memory.write(ctx, data, ptr)
        return True

    def write_uint(self, ctx: Any, ptr: int, value: int, size: int) -> bool:
        return self.write(ctx, ptr, value.to_bytes(size, "little"))


@dataclass
class FlowCounters:
    published: int = 0
    publish_dropped: int = 0
    publish_denied: int = 0
    logs_dropped: int = 0
    bad_pointers: int = 0


@dataclass
class FlowContext:
    """What the host functions of one flow instance may touch."""

    flow_id: str
    device_id: str
    policy: TopicPolicy
    #: Thread-safe: hands (topic, payload, qos) to the event loop's MQTT session.
    publish: Callable[[str, bytes, int], None]
    kv: KVStore | None
    config_json: bytes
    publish_rate: float = 50.0
    log_rate: float = 100.0
    memory: GuestMemory = field(default_factory=GuestMemory)
    counters: FlowCounters = field(default_factory=FlowCounters)
    #: Set by the runner around a command's ``edge_on_event`` (one event at a time).
    in_command: bool = False
    #: What the flow passed to ``respond`` while handling the current command.
    response: bytes | None = None
    #: ``defer_update``: hold installs of a new version back until then (epoch s).
    defer_until: float | None = None

    def __post_init__(self) -> None:
        self._publish_bucket = TokenBucket(self.publish_rate, self.publish_rate * 2)
        self._log_bucket = TokenBucket(self.log_rate, self.log_rate * 2)
        self.log = log.bind(flow_id=self.flow_id, device_id=self.device_id)
        self._last_warning = 0.0

    def allow_log(self) -> bool:
        if self._log_bucket.take():
            return True
        self.counters.logs_dropped += 1
        return False

    def warn_throttled(self, message: str, **kw: Any) -> None:
        """A warning at most once per second per flow (hostile guests must not flood)."""
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            self.log.warning(message, **kw, counters=vars(self.counters))


def _guard(ctx: FlowContext, fn: Callable[..., int]) -> Callable[..., int]:
    """Host functions never raise into wasmtime."""

    def wrapper(caller: Any, *args: int) -> int:
        try:
            return fn(caller, *args)
        except Exception:  # the guest gets a code; we get the traceback
            ctx.log.exception("host function failed", function=fn.__name__)
            return EDGE_ERR_INTERNAL

    wrapper.__name__ = fn.__name__
    return wrapper


def define_edge_api(  # noqa: PLR0915 - one small closure per host function
    linker: wasmtime.Linker, ctx: FlowContext
) -> None:
    """Define the ``edge`` import module on ``linker`` for one flow instance."""
    mem = ctx.memory

    def _bad(_what: str) -> int:
        ctx.counters.bad_pointers += 1
        ctx.warn_throttled("flow passed an out-of-bounds pointer", call=_what)
        return EDGE_ERR_BOUNDS

    def publish(caller: Any, tptr: int, tlen: int, pptr: int, plen: int, qos: int) -> int:
        if qos not in (0, 1):
            return EDGE_ERR_INVALID
        if tlen > 512 or plen > MAX_PAYLOAD:
            return EDGE_ERR_TOO_LARGE
        raw_topic = mem.read(caller, tptr, tlen)
        payload = mem.read(caller, pptr, plen)
        if raw_topic is None or payload is None:
            return _bad("publish")
        try:
            topic = ctx.policy.resolve(raw_topic.decode())
        except UnicodeDecodeError:
            return EDGE_ERR_INVALID
        if topic is None:
            ctx.counters.publish_denied += 1
            ctx.warn_throttled("publish refused: topic not permitted", topic=raw_topic[:200])
            return EDGE_ERR_DENIED
        if not ctx._publish_bucket.take():
            ctx.counters.publish_dropped += 1
            ctx.warn_throttled("publish rate limit reached; messages dropped")
            return EDGE_ERR_RATE
        ctx.publish(topic, payload, qos)
        ctx.counters.published += 1
        return EDGE_OK

    def log_(caller: Any, level: int, ptr: int, length: int) -> int:
        data = mem.read(caller, ptr, min(max(length, 0), MAX_LOG_LINE))
        if data is None or length < 0:
            return _bad("log")
        if not ctx.allow_log():
            ctx.warn_throttled("flow log rate limit reached; lines dropped")
            return EDGE_ERR_RATE
        name = LOG_LEVELS[level] if 0 <= level < len(LOG_LEVELS) else "info"
        getattr(ctx.log, name)("flow log", line=data.decode(errors="replace"))
        return EDGE_OK

    def _key(caller: Any, kptr: int, klen: int) -> str | int:
        if klen <= 0 or klen > MAX_KEY:
            return EDGE_ERR_INVALID
        raw = mem.read(caller, kptr, klen)
        if raw is None:
            return _bad("kv")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return EDGE_ERR_INVALID

    def kv_get(caller: Any, kptr: int, klen: int, optr: int, ocap: int, olenptr: int) -> int:
        if ctx.kv is None:
            return EDGE_ERR_DENIED
        key = _key(caller, kptr, klen)
        if isinstance(key, int):
            return key
        value = ctx.kv.get(key)
        if value is None:
            return EDGE_ERR_NOT_FOUND
        if not mem.write_uint(caller, olenptr, len(value), 4):
            return _bad("kv_get")
        if len(value) > ocap:
            return EDGE_ERR_BUFFER
        return EDGE_OK if mem.write(caller, optr, value) else _bad("kv_get")

    def kv_set(caller: Any, kptr: int, klen: int, vptr: int, vlen: int) -> int:
        if ctx.kv is None:
            return EDGE_ERR_DENIED
        key = _key(caller, kptr, klen)
        if isinstance(key, int):
            return key
        if vlen > ctx.kv.quota:
            return EDGE_ERR_QUOTA
        value = mem.read(caller, vptr, vlen)
        if value is None:
            return _bad("kv_set")
        try:
            ctx.kv.set(key, value)
        except QuotaExceeded:
            return EDGE_ERR_QUOTA
        return EDGE_OK

    def kv_delete(caller: Any, kptr: int, klen: int) -> int:
        if ctx.kv is None:
            return EDGE_ERR_DENIED
        key = _key(caller, kptr, klen)
        if isinstance(key, int):
            return key
        return EDGE_OK if ctx.kv.delete(key) else EDGE_ERR_NOT_FOUND

    def time_ms(_caller: Any) -> int:
        return time.time_ns() // 1_000_000

    def config_get(caller: Any, optr: int, ocap: int, olenptr: int) -> int:
        data = ctx.config_json
        if not mem.write_uint(caller, olenptr, len(data), 4):
            return _bad("config_get")
        if len(data) > ocap:
            return EDGE_ERR_BUFFER
        return EDGE_OK if mem.write(caller, optr, data) else _bad("config_get")

    def respond(caller: Any, ptr: int, length: int) -> int:
        if not ctx.in_command:
            return EDGE_ERR_INVALID  # only a command has someone to answer
        if length > MAX_RESPONSE:
            return EDGE_ERR_TOO_LARGE
        data = mem.read(caller, ptr, length)
        if data is None:
            return _bad("respond")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return EDGE_ERR_INVALID
        ctx.response = data
        return EDGE_OK

    def defer_update(_caller: Any, seconds: int) -> int:
        if not 0 <= seconds <= MAX_DEFER_CALL_S:
            return EDGE_ERR_INVALID
        ctx.defer_until = time.time() + seconds if seconds else None
        return EDGE_OK

    log_.__name__ = "log"
    table: list[tuple[str, Callable[..., int], list[wasmtime.ValType], list[wasmtime.ValType]]] = [
        ("publish", publish, [I32] * 5, [I32]),
        ("log", log_, [I32] * 3, [I32]),
        ("kv_get", kv_get, [I32] * 5, [I32]),
        ("kv_set", kv_set, [I32] * 4, [I32]),
        ("kv_delete", kv_delete, [I32] * 2, [I32]),
        ("time_ms", time_ms, [], [I64]),
        ("config_get", config_get, [I32] * 3, [I32]),
        ("respond", respond, [I32] * 2, [I32]),
        ("defer_update", defer_update, [I32], [I32]),
    ]
    for name, fn, params, results in table:
        linker.define_func(
            "edge", name, wasmtime.FuncType(params, results), _guard(ctx, fn), access_caller=True
        )
