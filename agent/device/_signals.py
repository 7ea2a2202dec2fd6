"""Signal handlers that cannot be lost.

``loop.add_signal_handler()`` delivers a signal through the loop's self-pipe, the
socket that ``call_soon_threadsafe()`` also writes one byte to per call. When that
socket is full (a busy loop and a few hundred cross-thread callbacks), the signal
number is dropped ("Exception ignored when trying to write to the signal wakeup fd")
and the handler never runs: a SIGINT to ``edge-agent sim`` with 500 agents was lost
that way. A Python-level handler runs in the main thread between bytecodes whatever
the socket holds (a select interrupted by the signal runs it before retrying), and
hands over to the loop with ``call_soon_threadsafe``, which needs no free space to
queue the callback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping
from types import FrameType


def install(
    loop: asyncio.AbstractEventLoop,
    handlers: Mapping[signal.Signals, Callable[[], None]],
    *,
    second_exits: frozenset[signal.Signals] = frozenset(),
    exit_code: int = 1,
) -> Callable[[], None]:
    """Run ``handlers[sig]()`` on ``loop`` when ``sig`` arrives (the loop runs in the
    main thread). A second signal from ``second_exits`` ends the process at once with
    ``exit_code`` (from the handler itself, so even a wedged loop cannot hold it).
    Returns a function that puts the previous handlers back."""
    seen = 0

    def make(callback: Callable[[], None]) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, _frame: FrameType | None) -> None:
            nonlocal seen
            sig = signal.Signals(signum)
            if sig in second_exits:
                seen += 1
                if seen > 1:
                    sys.stderr.write(f"edge-agent: second {sig.name}, exiting at once\n")
                    os._exit(exit_code)
            loop.call_soon_threadsafe(callback)

        return handler

    previous = {sig: signal.signal(sig, make(cb)) for sig, cb in handlers.items()}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
