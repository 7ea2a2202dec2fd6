"""The state file's one writer: order, grouping, no identical rewrites, failures kept."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from agent.device.deploy.state import StateStore
from agent.device.deploy.writer import StateWriter
from agent.errors import StateError


class RecordingStore(StateStore):
    """The real store; records each file written, can hold a write or fail it."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.saved: list[bytes] = []
        self.hold: threading.Event | None = None
        self.holding = threading.Event()
        self.full = False

    def save_bytes(self, data: bytes) -> None:
        if self.hold is not None:
            self.holding.set()
            self.hold.wait(5)
        if self.full:
            raise StateError(f"cannot write {self.path}: No space left on device")
        super().save_bytes(data)
        self.saved.append(data)


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path)


async def test_the_same_snapshot_is_not_written_twice(store: RecordingStore) -> None:
    writer = StateWriter(store)
    await writer.write(b"a")
    await writer.write(b"a")
    await writer.write(b"b")
    await writer.write(b"a")
    writer.close()
    assert store.saved == [b"a", b"b", b"a"]
    assert writer.writes == 3
    assert store.path.read_bytes() == b"a"


async def test_saves_asked_for_during_a_write_share_the_next_one(store: RecordingStore) -> None:
    writer = StateWriter(store)
    store.hold = threading.Event()
    first = asyncio.create_task(writer.write(b"1"))
    await asyncio.to_thread(store.holding.wait, 5)
    later = [asyncio.create_task(writer.write(data)) for data in (b"2", b"3", b"4")]
    await asyncio.sleep(0)
    store.hold.set()
    await asyncio.gather(first, *later)
    writer.close()
    assert store.saved == [b"1", b"4"]  # the newest snapshot holds every earlier change
    assert store.path.read_bytes() == b"4"


async def test_a_failed_write_is_reported_and_tried_again(store: RecordingStore) -> None:
    writer = StateWriter(store)
    await writer.write(b"a")
    store.full = True
    with pytest.raises(StateError, match="No space left"):
        await writer.write(b"b")
    assert store.path.read_bytes() == b"a"
    store.full = False
    await writer.write(b"b")  # not mistaken for already written
    writer.close()
    assert store.saved == [b"a", b"b"]


async def test_a_cancelled_caller_does_not_tear_its_write(store: RecordingStore) -> None:
    writer = StateWriter(store)
    store.hold = threading.Event()
    task = asyncio.create_task(writer.write(b"x"))
    await asyncio.to_thread(store.holding.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.hold.set()
    writer.close()  # waits for the write in progress
    assert store.saved == [b"x"]


async def test_after_close_a_last_save_still_lands(store: RecordingStore) -> None:
    writer = StateWriter(store)
    await writer.write(b"a")
    writer.close()
    await writer.write(b"z")
    assert store.path.read_bytes() == b"z"


async def test_a_write_in_flight_for_a_caller_that_gave_up_is_not_mistaken_for_done(
    store: RecordingStore,
) -> None:
    """The snapshot the file holds is compared without a thread hand-off only while
    no write is in flight, also one whose caller was cancelled."""
    writer = StateWriter(store)
    await writer.write(b"w")
    store.hold = threading.Event()
    task = asyncio.create_task(writer.write(b"x"))
    await asyncio.to_thread(store.holding.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    again = asyncio.create_task(writer.write(b"w"))  # equal to the last one written
    await asyncio.sleep(0)
    assert not again.done()
    store.hold.set()
    await again
    writer.close()
    assert store.path.read_bytes() == b"w"
    assert store.saved == [b"w", b"x", b"w"]
