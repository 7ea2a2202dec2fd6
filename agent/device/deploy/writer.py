"""The state file's one writer: ordered, grouped, and never the same bytes twice.

Every save of the agent's state goes through :class:`StateWriter`, on one thread,
so saves land in the order they were asked for and a cancelled caller cannot tear
a write. Each save costs two fsyncs (the file, then its directory), so the writer
does no more of them than durability needs:

- **grouped**: a save asked for while another is being written waits for the next
  write, which carries the newest state (states are whole snapshots, so the newest
  one contains every earlier change); callers return once a snapshot at least as
  new as theirs is on disk;
- **deduplicated**: a snapshot equal to the one the file already holds is not
  written again (a desired document taken in with no run in flight: its intent is
  saved before it takes effect, and the save after taking it in has nothing new).

A failed write is reported to the caller whose job attempted it and stays queued,
so the next save tries it again; nobody is told "saved" for bytes that are not.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from agent.device.deploy.state import StateStore


class StateWriter:
    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")
        self._lock = threading.Lock()
        self._pending: bytes | None = None
        #: What the file holds, as far as this process wrote it (None: unknown).
        self._last: bytes | None = None
        self._closed = False
        #: Jobs submitted and not yet ended (event loop thread only).
        self._jobs = 0
        #: Files written (each two fsyncs): what benchmarks and the regression
        #: guard count per deployment.
        self.writes = 0

    async def write(self, data: bytes) -> None:
        """Have ``data`` (or a newer snapshot) on disk; survives cancellation of the caller."""
        if self._jobs == 0 and data == self._last:
            return  # on disk already, and no job in flight can change that: no hand-off
        with self._lock:
            self._pending = data
        if self._closed:  # the last save at shutdown, after the pool stopped
            await asyncio.to_thread(self._flush)
            return
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._flush)
        self._jobs += 1  # (counted down when the job ends, not when a caller gives up)
        fut.add_done_callback(self._job_done)
        await asyncio.shield(fut)

    def _job_done(self, _fut: asyncio.Future[None]) -> None:
        self._jobs -= 1

    def _flush(self) -> None:
        with self._lock:
            data, self._pending = self._pending, None
        if data is None or data == self._last:
            return  # an earlier job wrote this snapshot or a newer one
        try:
            self._store.save_bytes(data)
        except BaseException:
            with self._lock:
                if self._pending is None:  # (a newer snapshot replaces it anyway)
                    self._pending = data
            self._last = None
            raise
        self._last = data
        self.writes += 1

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)
