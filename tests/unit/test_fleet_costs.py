"""Per-message costs of the outbox, counted (not timed): SQL statements per put
and per acknowledged batch. Every flow message and command response pays them (and
`edge-agent sim` pays them once per device); these fail when a change brings the
extra statements back."""

from __future__ import annotations

from pathlib import Path

from agent.device.outbox import Outbox, OutboxLimits


def _traced(box: Outbox) -> list[str]:
    statements: list[str] = []
    box._db.set_trace_callback(statements.append)
    return statements


def test_one_statement_per_put_and_per_acknowledged_batch(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.put("t/log", b"first log", retain=True, coalesce="log:a")
    statements = _traced(box)
    box.put("t/event", b"e1")
    assert len(statements) == 1
    box.put("t/state", b"s1", retain=True, coalesce="state")
    box.put("t/state", b"s2-longer", retain=True, coalesce="state")  # replaces s1
    assert len(statements) == 3
    batch = box.peek(20)
    statements.clear()
    box.ack([r.seq for r in batch[:2]])
    assert len(statements) == 1
    # What the counters say is what the table holds, also after a restart.
    assert [r.payload for r in box.peek(20)] == [b"s2-longer"]
    assert (box.count, box.bytes, box.sent) == (1, 9, 2)
    box.put("t/state", b"s3", retain=True, coalesce="state")
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert [(r.topic, r.payload) for r in again.peek(20)] == [("t/state", b"s3")]
    assert (again.count, again.bytes) == (1, 2)


def test_a_coalesced_copy_acknowledged_before_its_replacement_is_not_forgotten(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.db")
    box.put("t/state", b"s1", coalesce="state")
    first = box.peek(1)  # in flight
    box.put("t/state", b"s2", coalesce="state")  # replaces it in the table
    box.ack([r.seq for r in first])  # the PUBACK of s1 arrives: s2 stays queued
    assert [r.payload for r in box.peek(5)] == [b"s2"]
    box.put("t/state", b"s3", coalesce="state")
    assert [r.payload for r in box.peek(5)] == [b"s3"]
    assert (box.count, box.bytes) == (1, 2)


def test_over_the_limits_a_put_still_drops_the_oldest(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", OutboxLimits(max_messages=3))
    box.put("t/state", b"s0", coalesce="state")
    for i in range(4):
        box.put("t/e", str(i).encode())
    assert [r.payload for r in box.peek(10)] == [b"1", b"2", b"3"]
    assert box.dropped == 2
    box.put("t/state", b"s1", coalesce="state")  # its old copy was dropped already
    assert [r.payload for r in box.peek(10)] == [b"2", b"3", b"s1"]
    assert (box.count, box.bytes) == (3, 4)
