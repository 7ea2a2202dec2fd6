"""The fast export call agrees with wasmtime-py's ``Func.__call__`` in every outcome."""

from __future__ import annotations

from typing import Any

import pytest
import wasmtime

from agent.device.runtime._wasmcall import FastCall, fast_call

WAT = """
(module
  (import "host" "boom" (func $boom (param i32) (result i32)))
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "five") (param i32 i32 i32 i32 i32) (result i32)
    (i32.sub (i32.add (i32.add (local.get 0) (local.get 1)) (i32.add (local.get 2) (local.get 3)))
             (local.get 4)))
  (global $g (mut i32) (i32.const 0))
  (func (export "set") (param i32) (global.set $g (local.get 0)))
  (func (export "get") (result i32) (global.get $g))
  (func (export "trap") (param i32) (result i32) unreachable)
  (func (export "host") (param i32) (result i32) (call $boom (local.get 0)))
  (func (export "wide") (param i64) (result i64) (local.get 0))
  (func (export "float") (param i32) (result f32) (f32.const 1))
  (func (export "pair") (param i32) (result i32 i32) (local.get 0) (local.get 0))
)
"""


class Boom(Exception):
    pass


@pytest.fixture
def inst() -> tuple[wasmtime.Store, dict[str, Any]]:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, wasmtime.wat2wasm(WAT))

    def boom(x: int) -> int:
        if x == 13:
            raise Boom("host function failed")
        return x * 2

    ty = wasmtime.FuncType([wasmtime.ValType.i32()], [wasmtime.ValType.i32()])
    instance = wasmtime.Instance(store, module, [wasmtime.Func(store, ty, boom)])
    return store, dict(instance.exports(store))


def both(inst: tuple[wasmtime.Store, dict[str, Any]], name: str) -> tuple[Any, FastCall]:
    store, exports = inst
    fast = fast_call(exports[name], store)
    assert isinstance(fast, FastCall)
    return exports[name], fast


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("add", (2, 3)),
        ("add", (2**31 - 1, 1)),  # wraps to the most negative i32, as in wasm
        ("add", (-5, 2)),
        ("add", (0xFFFFFFFF, 0)),  # an unsigned pointer-sized value: -1 as i32
        ("five", (1, 2, 3, 4, 5)),
        ("get", ()),
        ("host", (21,)),
    ],
)
def test_results_are_the_same(
    inst: tuple[wasmtime.Store, dict[str, Any]], name: str, args: tuple[int, ...]
) -> None:
    store, _ = inst
    slow, fast = both(inst, name)
    assert fast(store, *args) == slow(store, *args)


def test_no_result_is_none_and_the_call_has_its_effect(
    inst: tuple[wasmtime.Store, dict[str, Any]],
) -> None:
    store, exports = inst
    _, fast = both(inst, "set")
    assert fast(store, 77) is None
    assert exports["get"](store) == 77


def test_a_trap_is_the_same_trap(inst: tuple[wasmtime.Store, dict[str, Any]]) -> None:
    store, _ = inst
    slow, fast = both(inst, "trap")
    with pytest.raises(wasmtime.Trap) as from_slow:
        slow(store, 1)
    with pytest.raises(wasmtime.Trap) as from_fast:
        fast(store, 1)
    assert from_fast.value.trap_code == from_slow.value.trap_code
    assert str(from_fast.value) == str(from_slow.value)


def test_a_host_functions_exception_comes_out_as_itself(
    inst: tuple[wasmtime.Store, dict[str, Any]],
) -> None:
    store, _ = inst
    slow, fast = both(inst, "host")
    with pytest.raises(Boom, match="host function failed"):
        slow(store, 13)
    with pytest.raises(Boom, match="host function failed"):
        fast(store, 13)
    assert fast(store, 4) == 8  # and the next call is clean


def test_a_wrong_argument_count_is_refused(inst: tuple[wasmtime.Store, dict[str, Any]]) -> None:
    store, _ = inst
    _, fast = both(inst, "add")
    with pytest.raises(wasmtime.WasmtimeError, match="expected 2 arguments"):
        fast(store, 1)


@pytest.mark.parametrize("name", ["wide", "float", "pair"])
def test_other_signatures_keep_the_ordinary_call(
    inst: tuple[wasmtime.Store, dict[str, Any]], name: str
) -> None:
    store, exports = inst
    assert fast_call(exports[name], store) is None
