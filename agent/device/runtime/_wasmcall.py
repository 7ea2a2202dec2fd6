"""Calling a wasm export with i32 arguments without wasmtime-py's per-call conversions.

``wasmtime.Func.__call__`` looks the function's type up and converts every argument
and result through ``ValType`` objects that it allocates and frees on each call:
about a third of an event's cost in ``bench/invoke.py``. For an export whose
signature was checked once (only i32 parameters, no result or one i32), a
:class:`FastCall` keeps a ready argument array and calls ``wasmtime_func_call``
through wasmtime-py's own ctypes bindings, inside wasmtime-py's own
``enter_wasm``: traps, and exceptions raised by host functions, come out exactly
as from ``Func.__call__``.

Those bindings are private to wasmtime-py, which is pinned to one major version in
``pyproject.toml``. If the names this needs are missing, :func:`fast_call` returns
None and the caller uses ``Func.__call__``; ``tests/unit/test_wasmcall.py`` checks
that both paths agree, so an upgrade that moves them shows up as a failing test.
"""

from __future__ import annotations

import ctypes
from typing import Any

import wasmtime

_AVAILABLE = True
try:
    from wasmtime import _ffi as _wt_ffi
    from wasmtime._func import enter_wasm as _enter_wasm

    _I32: int = _wt_ffi.WASMTIME_I32.value
    _VAL: Any = _wt_ffi.wasmtime_val_t
    _CALL: Any = _wt_ffi.wasmtime_func_call
except (ImportError, AttributeError):  # pragma: no cover - another wasmtime-py layout
    _AVAILABLE = False


class FastCall:
    """One export with (i32, …) -> i32 | () signature, called without conversions.

    Not thread-safe on its own (it reuses its argument array): the instance's lock
    makes one thread at a time call into a Store.
    """

    __slots__ = ("_args", "_func", "_n", "_nresults", "_results")

    def __init__(self, func: wasmtime.Func, nparams: int, nresults: int) -> None:
        self._func = func
        self._n = nparams
        self._nresults = nresults
        self._args = (_VAL * max(nparams, 1))()
        for i in range(nparams):
            self._args[i].kind = _I32
        self._results = (_VAL * max(nresults, 1))()

    def __call__(self, store: wasmtime.Store, *args: int) -> int | None:
        if len(args) != self._n:
            raise wasmtime.WasmtimeError(f"expected {self._n} arguments, got {len(args)}")
        argv = self._args
        for i, value in enumerate(args):
            argv[i].of.i32 = value  # (ctypes wraps to 32 bits, as wasmtime-py does)
        with _enter_wasm(store) as trap:
            error = _CALL(
                store._context(),
                ctypes.byref(self._func._func),
                argv,
                self._n,
                self._results,
                self._nresults,
                trap,
            )
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)
        return int(self._results[0].of.i32) if self._nresults else None


def fast_call(func: wasmtime.Func, store: wasmtime.Store) -> Any:
    """A :class:`FastCall` for ``func``, or None when its signature or this
    wasmtime-py does not allow one (then call ``func`` itself)."""
    if not _AVAILABLE:
        return None
    ty = func.type(store)
    i32 = wasmtime.ValType.i32()
    params, results = list(ty.params), list(ty.results)
    if any(p != i32 for p in params) or len(results) > 1 or any(r != i32 for r in results):
        return None
    return FastCall(func, len(params), len(results))
