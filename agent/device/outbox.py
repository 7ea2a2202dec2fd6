"""The offline outbox: every QoS 1 message the agent or its flows publish, persisted.

Messages go into an SQLite table under the state dir (WAL journal: a killed process
loses nothing that was committed) and one drain task publishes them in order, a
batch at a time (at most ``max_inflight``, so order holds), and deletes each row only
when the broker has acknowledged it. While the broker is away, flows keep running
and the outbox fills; after a reconnect that backlog drains at a bounded rate
(``drain_rate``), oldest first, before anything newer; live traffic is not paced.
A restart loses nothing that was in it.

Bounded by count and bytes: when full, the oldest messages are dropped, counted
(persisted) and logged. Messages with a ``coalesce`` key (the state report, each
deployment log) replace their earlier unsent copy: only the latest matters.

QoS 1 gives at-least-once delivery: a message whose PUBACK was lost to a crash is
sent again after the restart (a duplicate, never a gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = structlog.get_logger("agent.device.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    coalesce_key TEXT,
    correlation BLOB,
    created REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_coalesce ON outbox(coalesce_key)
    WHERE coalesce_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxLimits:
    max_messages: int = 50_000
    max_bytes: int = 64 * 1024 * 1024
    drain_rate: float = 200.0  # messages per second after a reconnect
    batch: int = 20  # at most the broker's receive maximum


@dataclass(frozen=True)
class Row:
    seq: int
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None


class Outbox:
    """A persisted FIFO of QoS 1 messages (used from the event loop thread only)."""

    def __init__(self, path: Path, limits: OutboxLimits | None = None) -> None:
        self.path = path
        self.limits = limits or OutboxLimits()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self.count, self.bytes = int(row[0]), int(row[1])
        #: The queued row of each coalesce key: key -> (seq, payload length). It lets a
        #: put replace its earlier copy in one statement, without reading it first.
        self._coalesced: dict[str, tuple[int, int]] = {
            str(k): (int(q), int(n))
            for q, k, n in self._db.execute(
                "SELECT seq, coalesce_key, LENGTH(payload) FROM outbox"
                " WHERE coalesce_key IS NOT NULL"
            )
        }
        #: SQL statements run by put/ack (a regression test counts them per message).
        self.statements = 0
        self.dropped = self._meta("dropped")
        self.sent = 0
        self._wake = asyncio.Event()
        self._last_drop_log = 0.0
        #: How the drain paces itself (a test may observe it).
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # ------------------------------------------------------------ producers
    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        coalesce: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Queue one QoS 1 message (its turn comes after everything already queued).

        One SQL statement, so one (autocommitted) transaction: an earlier unsent copy
        with the same ``coalesce`` key is replaced by ``INSERT OR REPLACE`` on the
        key's unique index (the new row gets the next seq, so it goes out last). Only
        a put that would pass the limits takes the longer path that drops the oldest.
        """
        old = self._coalesced.get(coalesce) if coalesce is not None else None
        count = self.count + (0 if old is not None else 1)
        size = self.bytes + len(payload) - (old[1] if old is not None else 0)
        lim = self.limits
        if count > lim.max_messages or (size > lim.max_bytes and count > 1):
            self._put_over_limits(topic, payload, retain, coalesce, correlation)
            return
        self.statements += 1
        cur = self._db.execute(
            "INSERT OR REPLACE INTO outbox"
            " (topic, payload, retain, coalesce_key, correlation, created)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (topic, payload, int(retain), coalesce, correlation, time.time()),
        )
        self.count, self.bytes = count, size
        if coalesce is not None:
            assert cur.lastrowid is not None
            self._coalesced[coalesce] = (cur.lastrowid, len(payload))
        self._wake.set()

    def _put_over_limits(
        self,
        topic: str,
        payload: bytes,
        retain: bool,
        coalesce: str | None,
        correlation: bytes | None,
    ) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            if coalesce is not None:
                old = self._coalesced.pop(coalesce, None)
                if old is not None:
                    db.execute("DELETE FROM outbox WHERE seq = ?", (old[0],))
                    self.count -= 1
                    self.bytes -= old[1]
            cur = db.execute(
                "INSERT INTO outbox (topic, payload, retain, coalesce_key, correlation, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (topic, payload, int(retain), coalesce, correlation, time.time()),
            )
            if coalesce is not None:
                assert cur.lastrowid is not None
                self._coalesced[coalesce] = (cur.lastrowid, len(payload))
            self.count += 1
            self.bytes += len(payload)
            dropped = self._enforce_limits()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._reload_counts()
            raise
        if dropped:
            self._note_dropped(dropped)
        self._wake.set()

    def _reload_counts(self) -> None:
        """After a rolled-back transaction: the counters from the table again."""
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self.count, self.bytes = int(row[0]), int(row[1])
        self._coalesced = {
            str(k): (int(q), int(n))
            for q, k, n in self._db.execute(
                "SELECT seq, coalesce_key, LENGTH(payload) FROM outbox"
                " WHERE coalesce_key IS NOT NULL"
            )
        }

    def _enforce_limits(self) -> int:
        lim = self.limits
        dropped = 0
        while self.count > lim.max_messages or (self.bytes > lim.max_bytes and self.count > 1):
            row = self._db.execute(
                "SELECT seq, LENGTH(payload), coalesce_key FROM outbox ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
            self.count -= 1
            self.bytes -= int(row[1])
            self._forget_coalesced(row[2], int(row[0]))
            dropped += 1
        if dropped:
            self.dropped += dropped
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('dropped', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (self.dropped,),
            )
        return dropped

    def _note_dropped(self, n: int) -> None:
        now = time.monotonic()
        if now - self._last_drop_log >= 5.0:
            self._last_drop_log = now
            log.warning(
                "outbox full: oldest messages dropped",
                dropped_now=n,
                dropped_total=self.dropped,
                queued=self.count,
                max_messages=self.limits.max_messages,
                max_bytes=self.limits.max_bytes,
            )

    # ------------------------------------------------------------ the drain
    def peek(self, n: int) -> list[Row]:
        rows = self._db.execute(
            "SELECT seq, topic, payload, retain, correlation FROM outbox ORDER BY seq LIMIT ?",
            (n,),
        ).fetchall()
        return [Row(int(r[0]), r[1], bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def ack(self, seqs: list[int]) -> None:
        """Delete acknowledged rows: one statement (and transaction) per batch."""
        if not seqs:
            return
        marks = ",".join("?" * len(seqs))
        self.statements += 1
        rows = self._db.execute(
            f"DELETE FROM outbox WHERE seq IN ({marks})"  # noqa: S608 - placeholders only
            " RETURNING seq, LENGTH(payload), coalesce_key",
            seqs,
        ).fetchall()
        for seq, length, key in rows:
            self.bytes -= int(length)
            self._forget_coalesced(key, int(seq))
        self.count -= len(rows)
        self.sent += len(rows)

    def _forget_coalesced(self, key: str | None, seq: int) -> None:
        if key is not None and self._coalesced.get(key, (None,))[0] == seq:
            del self._coalesced[key]

    async def drain(
        self, publish: Callable[..., asyncio.Future[None]], connected: asyncio.Event
    ) -> None:
        """Publish queued messages in order forever (the drain task)."""
        lim = self.limits
        catching_up = False
        while True:
            if not connected.is_set():
                await connected.wait()
                # What piled up while offline is sent at drain_rate; live traffic is not
                # paced (its rate is bounded where it is produced).
                catching_up = self.count > 0
            batch = self.peek(lim.batch)
            if not batch:
                catching_up = False
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.monotonic()
            futures = []
            for row in batch:
                props = None
                if row.correlation is not None:
                    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                    props.CorrelationData = row.correlation
                try:
                    futures.append(
                        publish(row.topic, row.payload, qos=1, retain=row.retain, properties=props)
                    )
                except (RuntimeError, ValueError) as exc:  # refused outright: drop it
                    log.warning(
                        "message refused by the MQTT client; dropped",
                        topic=row.topic,
                        error=str(exc),
                    )
                    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    fut.set_result(None)
                    futures.append(fut)
            # Rows are deleted only once acknowledged. If the connection drops, paho
            # sends them again after the reconnect and these futures resolve then.
            results = await asyncio.gather(*futures, return_exceptions=True)
            acked = [
                row.seq
                for row, res in zip(batch, results, strict=True)
                if not isinstance(res, BaseException)
            ]
            self.ack(acked)
            pause = len(batch) / lim.drain_rate - (time.monotonic() - started)
            if catching_up and pause > 0:
                await self.sleep(pause)

    def info(self) -> dict[str, Any]:
        return {"queued": self.count, "bytes": self.bytes, "dropped": self.dropped}
