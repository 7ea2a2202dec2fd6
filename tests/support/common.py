"""What every test folder shares: where things are, and waiting on a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
COUNTER_WASM = REPO / "examples" / "flows" / "counter" / "counter.wasm"

#: The ``make_config`` fixture's type: ``make(device_id="dev1", **overrides)``.
MakeConfig = Callable[..., Any]


def eea_samples() -> Path:
    return SHARED / "eea-samples"


async def until(
    check: Callable[[], Any], what: str, timeout: float = 30.0, every: float = 0.1
) -> Any:
    """Poll a blocking ``check`` (an HTTP call, a database read) on a worker thread,
    every ``every`` seconds, until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = await asyncio.to_thread(check)
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(every)


async def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``check`` on the event loop until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        await asyncio.sleep(0.02)
