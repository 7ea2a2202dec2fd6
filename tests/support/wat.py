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


_POLL = (
    '(import "wasi_snapshot_preview1" "poll_oneoff" '
    "(func $poll (param i32 i32 i32 i32) (result i32)))"
)
_CLOCK = (
    '(import "wasi_snapshot_preview1" "clock_time_get" '
    "(func $clock (param i32 i64 i32) (result i32)))"
)


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
  (import "edge" "respond" (func $respond (param i32 i32) (result i32)))
"""


def edge_flow(
    on_event: str,
    strings: dict[int, str] | None = None,
    *,
    init: str = "",
    extra: str = "",
    imports: str = "",
) -> bytes:
    """An edge-API flow. ``on_event`` is the body of
    ``edge_on_event(kind, np, nl, pp, pl) -> i32`` (locals $a $b $i available);
    ``strings`` puts data at fixed addresses. ``edge_alloc`` hands out one fixed
    event buffer at 65536 (events are delivered one at a time)."""
    data = "\n".join(
        f'  (data (i32.const {addr}) "{_escape(text)}")' for addr, text in (strings or {}).items()
    )
    return wasmtime.wat2wasm(f"""
(module
  {imports}
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
ECHO_STRINGS = {
    1024: "~/startup",
    1040: "~/interval",
    1056: "~/command",
    1072: "~/mqtt",
    1088: "count",
    1104: "~/count",
    1120: "~/rc",
}


def echo_flow() -> bytes:
    """Publishes every event's name+payload to ~/<kind>; on interval events also
    increments a persisted counter (kv "count") and publishes it (u32 LE) to ~/count."""
    return edge_flow(
        """
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
    """,
        ECHO_STRINGS,
    )


def rc_flow(call: str) -> bytes:
    """On any event, runs ``call`` (an expression returning i32) and publishes its
    result as i32 LE to ~/rc: to observe host API error codes from the guest side."""
    return edge_flow(
        f"""
    (i32.store (i32.const 600) {call})
    (drop (call $publish (i32.const 1120) (i32.const 4) (i32.const 600) (i32.const 4)
                         (i32.const 1)))
    """,
        ECHO_STRINGS,
    )


_EEA_IMPORTS = """
  (import "env" "eea_trace" (func $trace (param i32 i32 i32) (result i32)))
  (import "env" "eea_send_message" (func $send (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "eea_storage_save" (func $save (param i32 i32) (result i32)))
  (import "env" "eea_storage_read" (func $read (param i32 i32 i32) (result i32)))
  (import "env" "eea_get_time" (func $time (param i32) (result i32)))
  (import "env" "eea_sleep" (func $sleep (param i32) (result i32)))
  (import "env" "eea_get_device_id" (func $devid (param i32 i32 i32) (result i32)))
  (import "env" "eea_set_message_buffers" (func $bufs (param i32 i32 i32 i32) (result i32)))
  (import "env" "eea_fn_not_provided" (func $missing (param i32) (result i32)))
  (import "env" "eea_fn_base64_encode" (func $b64 (param i32 i32 i32 i32 i32) (result i32)))
"""


def eea_bundle(
    *, memory_import: bool = True, loop_body: str = "", interface_version: str | None = None
) -> bytes:
    """An EEA-shaped bundle exercising the whole host interface.

    Layout: topic buffer 1024 (256 B), payload buffer 2048 (4096 B), device id 8192
    (u8 length at 8256), storage read buffer 8448 (u32 length at 8260), outgoing
    messages assembled at 12288 (topic) and 13312 (payload). It sends:
    ``losant/<id>/init`` at eea_init: "<storage> <missing-rc> <b64("hello")>";
    ``losant/<id>/echo`` per message: "<topic> <payload>";
    ``losant/<id>/direct`` per direct trigger: "<id> <payload>";
    ``losant/<id>/conn`` per connection change: "0" or "1";
    ``losant/<id>/config``: the trace level the host set, at eea_init.
    eea_shutdown saves the last message payload as its storage.
    """
    memory = (
        '(import "env" "memory" (memory 2))' if memory_import else '(memory (export "memory") 2)'
    )
    wasm = wasmtime.wat2wasm(f"""
(module
  {_EEA_IMPORTS}
  {memory}
  (global $trace_level (mut i32) (i32.const -1))
  (global $last_len (mut i32) (i32.const 0))
  (global $conn (mut i32) (i32.const -1))
  (data (i32.const 16384) "losant/")
  (data (i32.const 16400) "/init")
  (data (i32.const 16416) "/echo")
  (data (i32.const 16432) "/direct")
  (data (i32.const 16448) "/conn")
  (data (i32.const 16464) "/config")
  (data (i32.const 16480) "hello")
  (data (i32.const 16496) "eea_init ran")
  ;; topic = "losant/" + device id + suffix, at 12288; returns its length
  (func $topic (param $suffix i32) (param $slen i32) (result i32) (local $id i32)
    (memory.copy (i32.const 12288) (i32.const 16384) (i32.const 7))
    (local.set $id (i32.load8_u (i32.const 8256)))
    (memory.copy (i32.const 12295) (i32.const 8192) (local.get $id))
    (memory.copy (i32.add (i32.const 12295) (local.get $id)) (local.get $suffix) (local.get $slen))
    (i32.add (i32.add (i32.const 7) (local.get $id)) (local.get $slen)))
  ;; payload = a + " " + b at 13312; returns its length
  (func $join (param $a i32) (param $al i32) (param $b i32) (param $bl i32) (result i32)
    (memory.copy (i32.const 13312) (local.get $a) (local.get $al))
    (i32.store8 (i32.add (i32.const 13312) (local.get $al)) (i32.const 32))
    (memory.copy (i32.add (i32.const 13313) (local.get $al)) (local.get $b) (local.get $bl))
    (i32.add (i32.add (local.get $al) (local.get $bl)) (i32.const 1)))
  (func $send_to (param $suffix i32) (param $slen i32) (param $plen i32)
    (drop (call $send (i32.const 12288) (call $topic (local.get $suffix) (local.get $slen))
                      (i32.const 13312) (local.get $plen) (i32.const 1))))
  (func (export "eea_config_set_trace_level") (param i32) (result i32)
    (global.set $trace_level (local.get 0)) (i32.const 0))
  (func (export "eea_config_set_storage_interval") (param i32) (result i32) (i32.const 0))
  (func (export "eea_init") (result i32) (local $rc i32) (local $n i32)
    (drop (call $bufs (i32.const 1024) (i32.const 256) (i32.const 2048) (i32.const 4096)))
    (drop (call $devid (i32.const 8192) (i32.const 64) (i32.const 8256)))
    (i32.store (i32.const 8260) (i32.const 0))
    (drop (call $read (i32.const 8448) (i32.const 4096) (i32.const 8260)))
    (drop (call $trace (i32.const 16496) (i32.const 12) (i32.const 2)))
    ;; "<storage> <rc of the missing registered function> <base64 of hello>"
    (local.set $rc (i32.add (i32.const 48) (call $missing (i32.const 7))))
    (i32.store8 (i32.const 9000) (local.get $rc))
    (drop (call $b64 (i32.const 16480) (i32.const 5) (i32.const 9001) (i32.const 64)
                     (i32.const 9100)))
    (local.set $n (call $join (i32.const 9000) (i32.const 1) (i32.const 9001)
                              (i32.load (i32.const 9100))))
    (memory.copy (i32.const 10000) (i32.const 13312) (local.get $n))
    (call $send_to (i32.const 16400) (i32.const 5)
      (call $join (i32.const 8448) (i32.load (i32.const 8260)) (i32.const 10000) (local.get $n)))
    (i32.store8 (i32.const 13312) (i32.add (i32.const 48) (global.get $trace_level)))
    (call $send_to (i32.const 16464) (i32.const 7) (i32.const 1))
    (call $send_conn)
    (i32.const 0))
  (func (export "eea_loop") (param $now i64) (result i32)
    (drop (call $time (i32.const 64)))
    {loop_body}
    (i32.const 0))
  (func (export "eea_message_received") (param $tl i32) (param $pl i32) (result i32)
    (memory.copy (i32.const 20000) (i32.const 2048) (local.get $pl))
    (global.set $last_len (local.get $pl))
    (call $send_to (i32.const 16416) (i32.const 5)
      (call $join (i32.const 1024) (local.get $tl) (i32.const 2048) (local.get $pl)))
    (i32.const 0))
  (func (export "eea_direct_trigger") (param $il i32) (param $pl i32) (result i32)
    (call $send_to (i32.const 16432) (i32.const 7)
      (call $join (i32.const 1024) (local.get $il) (i32.const 2048) (local.get $pl)))
    (i32.const 0))
  ;; before eea_init the device id is unknown: remember, and report from eea_init
  (func (export "eea_set_connection_status") (param $c i32) (result i32)
    (global.set $conn (local.get $c))
    (if (i32.load8_u (i32.const 8256)) (then (call $send_conn)))
    (i32.const 0))
  (func $send_conn
    (i32.store8 (i32.const 13312) (i32.add (i32.const 48) (global.get $conn)))
    (call $send_to (i32.const 16448) (i32.const 5) (i32.const 1)))
  (func (export "eea_shutdown") (result i32)
    (drop (call $save (i32.const 20000) (global.get $last_len)))
    (i32.const 0))
)""")
    if interface_version is not None:
        wasm = bytes(wasm) + custom_section("interfaceVersion", interface_version.encode())
    return bytes(wasm)


def custom_section(name: str, payload: bytes) -> bytes:
    def leb(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    body = leb(len(name)) + name.encode() + payload
    return b"\x00" + leb(len(body)) + body


def write_file(path: str, text: str) -> bytes:
    """``_initialize`` opens ``path`` under the first preopened directory (fd 3),
    creating it, and writes ``text``; the path_open errno is stored at address 300."""
    return wasmtime.wat2wasm(f"""
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  {_FD_WRITE}
  (memory (export "memory") 1)
  (data (i32.const 100) "{_escape(path)}")
  (data (i32.const 200) "{_escape(text)}")
  (func (export "_initialize")
    (i32.store (i32.const 300)
      (call $open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const {len(path)})
                  (i32.const 1) (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0)
                  (i32.const 400)))
    (if (i32.eqz (i32.load (i32.const 300))) (then
      (i32.store (i32.const 500) (i32.const 200))
      (i32.store (i32.const 504) (i32.const {len(text)}))
      (drop (call $fd_write (i32.load (i32.const 400)) (i32.const 500) (i32.const 1)
                            (i32.const 508)))))))""")


def stdout_flood(lines: int) -> bytes:
    """An edge flow whose startup event writes ``lines`` lines to stdout."""
    return edge_flow(
        f"""
    (i32.store (i32.const 700) (i32.const 1024))
    (i32.store (i32.const 704) (i32.const 9))
    (loop $l
      (drop (call $fd_write (i32.const 1) (i32.const 700) (i32.const 1) (i32.const 708)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {lines}))))""",
        {1024: "flooding\n"},
        extra="",
        imports=_FD_WRITE,
    )


_DEFER = '(import "edge" "defer_update" (func $defer (param i32) (result i32)))'


def versioned_flow(
    tag: str,
    *,
    trap_from_tick: int = 0,
    defer_on_startup: int | None = None,
    defer_on_tick: int | None = None,
    spin_on_startup_ms: int = 0,
) -> bytes:
    """An edge flow that answers every command with ``tag`` (``edge.respond``, plain
    text), so a command tells which version runs.

    ``trap_from_tick``: interval ticks are counted in linear memory (address 800) and
    the handler executes ``unreachable`` from that tick on (0: never traps).
    ``defer_on_startup`` / ``defer_on_tick``: call ``edge.defer_update(seconds)`` on
    the startup event / on every interval tick. ``spin_on_startup_ms``: the startup
    event computes (spins on the WASI monotonic clock) that long.
    """
    startup = ""
    if defer_on_startup is not None:
        startup += f"(drop (call $defer (i32.const {defer_on_startup})))"
    if spin_on_startup_ms:
        startup += f"""
      (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 808)))
      (i64.store (i32.const 816)
        (i64.add (i64.load (i32.const 808)) (i64.const {spin_on_startup_ms * 1_000_000})))
      (loop $spin
        (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 808)))
        (br_if $spin (i64.lt_u (i64.load (i32.const 808)) (i64.load (i32.const 816)))))"""
    tick = ""
    if defer_on_tick is not None:
        tick += f"(drop (call $defer (i32.const {defer_on_tick})))"
    if trap_from_tick:
        tick += f"""
      (i32.store (i32.const 800) (i32.add (i32.load (i32.const 800)) (i32.const 1)))
      (if (i32.ge_u (i32.load (i32.const 800)) (i32.const {trap_from_tick}))
        (then unreachable))"""
    imports = ""
    if defer_on_startup is not None or defer_on_tick is not None:
        imports += _DEFER
    if spin_on_startup_ms:
        imports += _CLOCK
    tag_bytes = tag.encode()
    return edge_flow(
        f"""
    (if (i32.eq (local.get $kind) (i32.const 1)) (then {startup} (nop)))
    (if (i32.eq (local.get $kind) (i32.const 2)) (then {tick} (nop)))
    (if (i32.eq (local.get $kind) (i32.const 3)) (then
      (drop (call $respond (i32.const 1200) (i32.const {len(tag_bytes)})))))
    """,
        {1200: tag},
        imports=imports,
    )
