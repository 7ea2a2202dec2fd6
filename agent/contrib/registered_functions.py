"""Example registered functions for Losant EEA bundles.

A registered function is a Python callable ``fn(call, *args) -> int`` published
under the entry-point group ``edge_agent.registered_functions``; the entry-point
name is what follows ``eea_fn_`` in the bundle's import. Its wasm signature comes
from the bundle's import, so the callable takes exactly those arguments (i32/i64
as Python ints). ``call`` (an :class:`agent.device.runtime.eea.EEACall`) reads and writes guest
memory with bounds checks. Return 0 for success. It runs on a wasm worker thread,
under the calling flow's deadline: keep it short and never block.

To ship your own, in your package's ``pyproject.toml``::

    [project.entry-points."edge_agent.registered_functions"]
    read_sensor = "my_package.eea:read_sensor"
"""

from __future__ import annotations

import base64
from typing import Any


def base64_encode(
    call: Any, in_ptr: int, in_len: int, out_ptr: int, out_cap: int, out_len_ptr: int
) -> int:
    """``eea_fn_base64_encode(str, str_len, out, out_buffer_len, out_len_u32) -> i32``:
    the example function of Losant's EEA documentation."""
    data = call.read(in_ptr, in_len)
    if data is None:
        return 1
    encoded = base64.b64encode(data)
    if len(encoded) > out_cap:
        return 1
    ok = call.write(out_ptr, encoded) and call.write_u32(out_len_ptr, len(encoded))
    return 0 if ok else 1
