"""A flow's queued events, delivered back to back in one wasm worker job.

One event at a time costs two thread hand-offs per event (loop → worker, and the
result back), each a futex or self-pipe wake-up. Under load a flow's worker takes
the events already queued (up to :data:`MAX_BATCH`) and runs them in one job:

- each event keeps its own deadline and fuel budget (the instance arms both for
  every call);
- the outer timeout, the backstop for a call blocked in a host function, is one
  ``call_timeout`` per event of the batch;
- the job stops taking events once it has run :data:`SLICE_S` (other flows share
  the worker threads), when the caller gave up (cancelled or timed out), and at the
  first event that fails. The events after that one were not delivered: the caller
  puts them back at the front of the queue, in order.

An idle flow sees no difference: one event in, a batch of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.device.runtime.sandbox import Runtime
from agent.errors import FlowTrap

#: Events at most per worker job.
MAX_BATCH = 32
#: A job takes no further event once it has run this long (seconds).
SLICE_S = 0.02

E = TypeVar("E")
R = TypeVar("R")


@dataclass
class Batch(Generic[R]):
    """How a batch went: ``results`` of the events delivered (a prefix of the batch,
    in order), then ``error`` for the next one if it failed (None: the rest were
    not delivered, or there is no rest)."""

    results: list[R]
    error: Exception | None = None

    @property
    def settled(self) -> int:
        """Events of the batch that have an outcome (delivered or failed)."""
        return len(self.results) + (self.error is not None)


async def deliver(
    runtime: Runtime,
    invoke: Callable[[E], R],
    events: Sequence[E],
    call_timeout: float,
    what: str,
) -> Batch[R]:
    """Call ``invoke`` (blocking, on a worker thread) for each of ``events`` in order."""
    results: list[R] = []
    failed: list[Exception] = []
    gave_up = False

    def job() -> None:
        started = time.perf_counter()
        for event in events:
            if gave_up or (results and time.perf_counter() - started > SLICE_S):
                return
            try:
                results.append(invoke(event))
            except Exception as exc:  # noqa: BLE001 (handed to the caller, by type)
                failed.append(exc)
                return

    try:
        await runtime.run(job, timeout=call_timeout * len(events), what=what)
    except FlowTrap as exc:  # the backstop: a call blocked beyond its deadline
        gave_up = True
        done = list(results)  # (the thread may still append the call it is in)
        return Batch(done, exc if len(done) < len(events) else None)
    except BaseException:
        gave_up = True  # cancelled: the job starts no further event
        raise
    return Batch(results, failed[0] if failed else None)
