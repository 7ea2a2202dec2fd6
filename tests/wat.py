"""WASI test modules written in WAT (compiled with ``wasmtime.wat2wasm``)."""

from __future__ import annotations

import hashlib

import wasmtime

_FD_WRITE = (
    '(import "wasi_snapshot_preview1" "fd_write" '
    "(func $fd_write (param i32 i32 i32 i32) (result i32)))"
)


def _escape(text: str) -> str:
    return "".join(c if c.isalnum() or c in " .:-_" else f"\\{ord(c):02x}" for c in text)


def reactor(tag: str, *, pad: int = 0, body: str = "") -> bytes:
    """A reactor module whose ``_initialize`` prints ``hello <tag>`` and runs ``body``.

    ``pad`` adds a data segment of that many bytes (to make larger artifacts).
    """
    msg = f"hello {tag}\n"
    padding = f'(data (i32.const 4096) "{"x" * pad}")' if pad else ""
    pages = 1 + (4096 + pad) // 65536
    return wasmtime.wat2wasm(f"""
(module
  {_FD_WRITE}
  (memory (export "memory") {pages})
  (data (i32.const 64) "{_escape(msg)}")
  {padding}
  (func (export "_initialize")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len(msg.encode())}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    {body})
)""")


def command(exit_code: int = 0) -> bytes:
    """A command module whose ``_start`` calls ``proc_exit(exit_code)``."""
    return wasmtime.wat2wasm(f"""
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const {exit_code}))))""")


def spin_on_start() -> bytes:
    return reactor("spinner", body="(loop $l (br $l))")


def trap_on_start() -> bytes:
    return reactor("trapper", body="unreachable")


def memory_bomb() -> bytes:
    """Grows memory one page at a time until growth fails, then traps."""
    return reactor(
        "bomb",
        body="(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))"
        " unreachable",
    )


def big_memory(pages: int) -> bytes:
    return wasmtime.wat2wasm(f'(module (memory (export "memory") {pages}))')


def forbidden_import() -> bytes:
    return wasmtime.wat2wasm(
        '(module (import "env" "socket_connect" (func (param i32) (result i32))))'
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_POLL = ('(import "wasi_snapshot_preview1" "poll_oneoff" '
         "(func $poll (param i32 i32 i32 i32) (result i32)))")
_CLOCK = ('(import "wasi_snapshot_preview1" "clock_time_get" '
          "(func $clock (param i32 i64 i32) (result i32)))")


def sleep_on_start(ms: int) -> bytes:
    """``_initialize`` blocks in WASI ``poll_oneoff`` (a sleep) for ``ms``: a blocking
    host call that epoch interruption cannot stop."""
    return wasmtime.wat2wasm(f"""
(module
  {_POLL}
  (memory (export "memory") 1)
  (func (export "_initialize")
    ;; subscription at 0: userdata(8) tag=clock(1 byte @8) clock id @16, timeout @24
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const {ms * 1_000_000}))
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (i32.const 0))
    (drop (call $poll (i32.const 0) (i32.const 128) (i32.const 1) (i32.const 256)))))""")


def busy_on_start(ms: int, tag: str = "busy") -> bytes:
    """``_initialize`` computes (spins on the WASI monotonic clock) for ``ms``."""
    return wasmtime.wat2wasm(f"""
(module
  {_CLOCK}
  (memory (export "memory") 1)
  (data (i32.const 512) "{_escape(tag)}")
  (func (export "_initialize") (local $end i64)
    (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
    (local.set $end (i64.add (i64.load (i32.const 0)) (i64.const {ms * 1_000_000})))
    (loop $l
      (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
      (br_if $l (i64.lt_u (i64.load (i32.const 0)) (local.get $end))))))""")


def print_environ() -> bytes:
    """``_initialize`` writes its whole WASI environment (NUL-separated) to stdout."""
    return wasmtime.wat2wasm(f"""
(module
  {_FD_WRITE}
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $env (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_initialize")
    (drop (call $sizes (i32.const 0) (i32.const 4)))
    (drop (call $env (i32.const 1024) (i32.const 4096)))
    (i32.store (i32.const 16) (i32.const 4096))
    (i32.store (i32.const 20) (i32.load (i32.const 4)))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))""")


_EDGE_IMPORTS = """
  (import "edge" "publish" (func $publish (param i32 i32 i32 i32 i32) (result i32)))
  (import "edge" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "edge" "kv_get" (func $kv_get (param i32 i32 i32 i32 i32) (result i32)))
  (import "edge" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
  (import "edge" "kv_delete" (func $kv_delete (param i32 i32) (result i32)))
  (import "edge" "time_ms" (func $time_ms (result i64)))
  (import "edge" "config_get" (func $config_get (param i32 i32 i32) (result i32)))
"""


def edge_flow(on_event: str, strings: dict[int, str] | None = None, *, init: str = "",
              extra: str = "") -> bytes:
    """An edge-API flow. ``on_event`` is the body of
    ``edge_on_event(kind, np, nl, pp, pl) -> i32`` (locals $a $b $i available);
    ``strings`` puts data at fixed addresses. ``edge_alloc`` hands out one fixed
    event buffer at 65536 (events are delivered one at a time)."""
    data = "\n".join(f'  (data (i32.const {addr}) "{_escape(text)}")'
                     for addr, text in (strings or {}).items())
    return wasmtime.wat2wasm(f"""
(module
  {_EDGE_IMPORTS}
  (memory (export "memory") 4)
{data}
  (func (export "_initialize") {init})
  (func (export "edge_alloc") (param $n i32) (result i32)
    (if (result i32) (i32.gt_u (local.get $n) (i32.const 196608))
      (then (i32.const 0)) (else (i32.const 65536))))
  (func (export "edge_on_event") (param $kind i32) (param $np i32) (param $nl i32)
        (param $pp i32) (param $pl i32) (result i32) (local $a i32) (local $b i32) (local $i i32)
    {on_event}
    (i32.const 0))
  {extra}
)""")


# Topics (relative to the flow's own area "~/") at fixed addresses, with their lengths.
ECHO_STRINGS = {1024: "~/startup", 1040: "~/interval", 1056: "~/command", 1072: "~/mqtt",
                1088: "count", 1104: "~/count", 1120: "~/rc"}


def echo_flow() -> bytes:
    """Publishes every event's name+payload to ~/<kind>; on interval events also
    increments a persisted counter (kv "count") and publishes it (u32 LE) to ~/count."""
    return edge_flow("""
    (local.set $a (i32.const 1024)) (local.set $b (i32.const 9))
    (if (i32.eq (local.get $kind) (i32.const 2)) (then (local.set $a (i32.const 1040))
                                                    (local.set $b (i32.const 10))))
    (if (i32.eq (local.get $kind) (i32.const 3)) (then (local.set $a (i32.const 1056))
                                                    (local.set $b (i32.const 9))))
    (if (i32.eq (local.get $kind) (i32.const 4)) (then (local.set $a (i32.const 1072))
                                                    (local.set $b (i32.const 6))))
    (drop (call $publish (local.get $a) (local.get $b) (local.get $np)
                         (i32.add (local.get $nl) (local.get $pl)) (i32.const 1)))
    (if (i32.eq (local.get $kind) (i32.const 2)) (then
      (i32.store (i32.const 512) (i32.const 0))
      (drop (call $kv_get (i32.const 1088) (i32.const 5) (i32.const 512) (i32.const 4)
                          (i32.const 520)))
      (i32.store (i32.const 512) (i32.add (i32.load (i32.const 512)) (i32.const 1)))
      (drop (call $kv_set (i32.const 1088) (i32.const 5) (i32.const 512) (i32.const 4)))
      (drop (call $publish (i32.const 1104) (i32.const 7) (i32.const 512) (i32.const 4)
                           (i32.const 1)))))
    """, ECHO_STRINGS)


def rc_flow(call: str) -> bytes:
    """On any event, runs ``call`` (an expression returning i32) and publishes its
    result as i32 LE to ~/rc: to observe host API error codes from the guest side."""
    return edge_flow(f"""
    (i32.store (i32.const 600) {call})
    (drop (call $publish (i32.const 1120) (i32.const 4) (i32.const 600) (i32.const 4)
                         (i32.const 1)))
    """, ECHO_STRINGS)
