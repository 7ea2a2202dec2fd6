"""WAT bundles that behave like the EEA bundles Losant's platform compiles.

Unlike Losant's two hello-world samples (which import only ``eea_trace``), a bundle
compiled from a real workflow keeps a payload queue sized by
``eea_config_set_queue_size`` (bytes), queues a timer trigger on every ``eea_loop``,
exports its identity as globals (or carries custom sections), and refuses to
initialise without a Losant device id. These do the same, observably:

- ``eea_loop``: if the queue cannot hold one timer trigger of ``payload_bytes``, it
  traces ``Payload queue overflow, max bytes are: <size>.`` and ``Timer check
  failed.`` (both error level) as platform bundles do; otherwise, every
  ``interval_ms`` the timer fires and the bundle publishes a debug message
  ``timer fired <n>`` to ``losant/<device id>/fromAgent/debug``.
- ``eea_init`` (with ``validate_device_id``): refuses (returns 1, traces ``Device ID
  from eea_get_device_id() failed.``) unless the device id is 24 lower-case hex.
- identity: ``"globals"`` exports BUNDLE_IDENTIFIER & co. (addresses of a u8 length
  and of the UTF-8 bytes), ``"sections"`` appends custom sections, ``None`` neither.
- it records the settings the host gave it and publishes them at eea_init to
  ``losant/<device id>/settings`` as ``queue storage topic payload interval debug``.
"""

from __future__ import annotations

import wasmtime
from wat import _EEA_IMPORTS, custom_section

_PREFIX = "Payload queue overflow, max bytes are: "
_STRINGS = {
    16384: "losant/",
    16400: "/fromAgent/debug",
    16432: _PREFIX,
    16480: "Timer check failed.",
    16512: "Device ID from eea_get_device_id() failed.",
    16576: "timer fired ",
    16592: "/settings",
}


def _bytes_literal(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def platform_bundle(
    *,
    identity: str | None = "globals",
    identifier: str = "1635302774192",
    interface: str = "1.0.0",
    validate_device_id: bool = True,
    interval_ms: int = 200,
    payload_bytes: int = 180,
    memory_import: bool = True,
) -> bytes:
    memory = (
        '(import "env" "memory" (memory 2))' if memory_import else '(memory (export "memory") 2)'
    )
    data = "\n".join(f'  (data (i32.const {addr}) "{text}")' for addr, text in _STRINGS.items())
    ident = ""
    if identity == "globals":
        ident = f"""
  (global (export "BUNDLE_IDENTIFIER") i32 (i32.const 30000))
  (global (export "BUNDLE_IDENTIFIER_LENGTH") i32 (i32.const 30100))
  (global (export "INTERFACE_VERSION") i32 (i32.const 30200))
  (global (export "INTERFACE_VERSION_LENGTH") i32 (i32.const 30300))
  (data (i32.const 30000) "{_bytes_literal(identifier.encode())}")
  (data (i32.const 30100) "{_bytes_literal(bytes([len(identifier.encode())]))}")
  (data (i32.const 30200) "{_bytes_literal(interface.encode())}")
  (data (i32.const 30300) "{_bytes_literal(bytes([len(interface.encode())]))}")"""
    check = ""
    if validate_device_id:
        check = """
    (if (i32.ne (i32.load8_u (i32.const 8256)) (i32.const 24)) (then
      (drop (call $trace (i32.const 16512) (i32.const 42) (i32.const 1)))
      (return (i32.const 1))))
    (loop $hex
      (local.set $c (i32.load8_u (i32.add (i32.const 8192) (local.get $i))))
      (if (i32.eqz (i32.or
            (i32.and (i32.ge_u (local.get $c) (i32.const 48))
                     (i32.le_u (local.get $c) (i32.const 57)))
            (i32.and (i32.ge_u (local.get $c) (i32.const 97))
                     (i32.le_u (local.get $c) (i32.const 102)))))
        (then
          (drop (call $trace (i32.const 16512) (i32.const 42) (i32.const 1)))
          (return (i32.const 1))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $hex (i32.lt_u (local.get $i) (i32.const 24))))"""
    wasm = wasmtime.wat2wasm(f"""
(module
  {_EEA_IMPORTS}
  {memory}
{data}
{ident}
  (global $queue_max (mut i32) (i32.const 0))
  (global $storage_max (mut i32) (i32.const 0))
  (global $topic_len (mut i32) (i32.const 0))
  (global $payload_len (mut i32) (i32.const 0))
  (global $interval (mut i32) (i32.const -1))
  (global $debug (mut i32) (i32.const -1))
  (global $last_fire (mut i64) (i64.const 0))
  (global $fired (mut i32) (i32.const 0))
  ;; decimal digits of $v at $out; returns how many
  (func $itoa (param $v i32) (param $out i32) (result i32) (local $n i32) (local $i i32)
    (loop $digits
      (i32.store8 (i32.add (i32.const 15000) (local.get $n))
                  (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $digits (i32.ne (local.get $v) (i32.const 0))))
    (loop $copy
      (i32.store8 (i32.add (local.get $out) (local.get $i))
        (i32.load8_u (i32.add (i32.const 15000)
                              (i32.sub (i32.sub (local.get $n) (local.get $i)) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $copy (i32.lt_u (local.get $i) (local.get $n))))
    (local.get $n))
  ;; "losant/" + device id + suffix at 12288; returns its length
  (func $topic (param $suffix i32) (param $slen i32) (result i32) (local $id i32)
    (memory.copy (i32.const 12288) (i32.const 16384) (i32.const 7))
    (local.set $id (i32.load8_u (i32.const 8256)))
    (memory.copy (i32.const 12295) (i32.const 8192) (local.get $id))
    (memory.copy (i32.add (i32.const 12295) (local.get $id)) (local.get $suffix) (local.get $slen))
    (i32.add (i32.add (i32.const 7) (local.get $id)) (local.get $slen)))
  ;; append the decimal of $v and a space at $at; returns the new end
  (func $field (param $at i32) (param $v i32) (result i32)
    (local.set $at (i32.add (local.get $at) (call $itoa (local.get $v) (local.get $at))))
    (i32.store8 (local.get $at) (i32.const 32))
    (i32.add (local.get $at) (i32.const 1)))
  (func (export "eea_config_set_queue_size") (param i32) (result i32)
    (global.set $queue_max (local.get 0)) (i32.const 0))
  (func (export "eea_config_set_storage_size") (param i32) (result i32)
    (global.set $storage_max (local.get 0)) (i32.const 0))
  (func (export "eea_config_set_message_buffer_lengths") (param i32 i32) (result i32)
    (global.set $topic_len (local.get 0)) (global.set $payload_len (local.get 1)) (i32.const 0))
  (func (export "eea_config_set_storage_interval") (param i32) (result i32)
    (global.set $interval (local.get 0)) (i32.const 0))
  (func (export "eea_config_set_debug_enabled") (param i32) (result i32)
    (global.set $debug (local.get 0)) (i32.const 0))
  (func (export "eea_config_set_trace_level") (param i32) (result i32) (i32.const 0))
  (func (export "eea_init") (result i32) (local $c i32) (local $i i32) (local $end i32)
    (drop (call $bufs (i32.const 1024) (i32.const 256) (i32.const 2048) (i32.const 4096)))
    (drop (call $devid (i32.const 8192) (i32.const 64) (i32.const 8256)))
    {check}
    (local.set $end (call $field (i32.const 13312) (global.get $queue_max)))
    (local.set $end (call $field (local.get $end) (global.get $storage_max)))
    (local.set $end (call $field (local.get $end) (global.get $topic_len)))
    (local.set $end (call $field (local.get $end) (global.get $payload_len)))
    (local.set $end (call $field (local.get $end) (global.get $interval)))
    (local.set $end (call $field (local.get $end) (global.get $debug)))
    (drop (call $send (i32.const 12288) (call $topic (i32.const 16592) (i32.const 9))
                      (i32.const 13312) (i32.sub (i32.sub (local.get $end) (i32.const 13312))
                                                 (i32.const 1)) (i32.const 1)))
    (i32.const 0))
  (func (export "eea_loop") (param $now i64) (result i32) (local $n i32)
    (if (i32.lt_u (global.get $queue_max) (i32.const {payload_bytes})) (then
      (memory.copy (i32.const 14000) (i32.const 16432) (i32.const {len(_PREFIX)}))
      (local.set $n (call $itoa (global.get $queue_max) (i32.const {14000 + len(_PREFIX)})))
      (i32.store8 (i32.add (i32.const {14000 + len(_PREFIX)}) (local.get $n)) (i32.const 46))
      (drop (call $trace (i32.const 14000) (i32.add (i32.const {len(_PREFIX) + 1})
                                                    (local.get $n)) (i32.const 1)))
      (drop (call $trace (i32.const 16480) (i32.const 19) (i32.const 1)))
      (return (i32.const 0))))
    (if (i64.ge_u (i64.sub (local.get $now) (global.get $last_fire)) (i64.const {interval_ms}))
      (then
        (global.set $last_fire (local.get $now))
        (global.set $fired (i32.add (global.get $fired) (i32.const 1)))
        (memory.copy (i32.const 13312) (i32.const 16576) (i32.const 12))
        (local.set $n (call $itoa (global.get $fired) (i32.const 13324)))
        (drop (call $send (i32.const 12288) (call $topic (i32.const 16400) (i32.const 16))
                          (i32.const 13312) (i32.add (i32.const 12) (local.get $n))
                          (i32.const 0)))))
    (i32.const 0))
  (func (export "eea_message_received") (param i32 i32) (result i32) (i32.const 0))
  (func (export "eea_shutdown") (result i32) (i32.const 0))
)""")
    out = bytes(wasm)
    if identity == "sections":
        out += custom_section("bundleIdentifier", identifier.encode())
        out += custom_section("interfaceVersion", interface.encode())
    return out
