"""Flow records: their one writer, and the table of legal status transitions.

Every change to a flow's :class:`~agent.device.deploy.state.FlowRecord` goes through
:class:`FlowRecords`: the reconciler's steps, the intake of a desired document, the
daemon (a flow that cannot start from the local store, a flow that became broken or
was restarted) and :meth:`FlowRecords.recover` after a restart. A status change is
checked against :data:`TRANSITIONS` and announced through one callback (the
reconciler turns it into an event, a state report and the Losant hello).

The statuses fall in two groups (Mender's deployment statuses):

- **verdicts** the planner, the intake or the health watch can reach from any
  record: ``pending`` (a new target, or an install held back), ``failure`` (a
  failed attempt, a failed health window), ``noartifact``, ``removed``,
  ``already-installed``, and ``aborted`` (an attempt superseded or aborted);
- **the pipeline**, the only way to ``success``:

==================  ==========================================================
to                  from
==================  ==========================================================
``downloading``     pending, failure (a retry), aborted, noartifact (the device
                    type changed), downloading and installing (a resumed attempt)
``installing``      downloading
``success``         installing
==================  ==========================================================

A record is created by ``pending``, ``failure`` (an invalid entry), ``noartifact``
or ``aborted`` (a deployment aborted before it reached the device). Anything else
is a bug: :class:`IllegalTransition`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from agent.device.deploy.state import FlowRecord, InFlight, Installed, PersistedState
from agent.errors import AgentError
from agent.wire.protocol import MAX_GENERATION, Status, is_valid_id, utc_now_iso

_ANY = frozenset(Status)

#: status -> the statuses a record may be in before it (None: a new record).
TRANSITIONS: Mapping[Status, frozenset[Status | None]] = {
    Status.PENDING: _ANY | {None},
    Status.FAILURE: _ANY | {None},
    Status.NOARTIFACT: _ANY | {None},
    Status.REMOVED: _ANY,
    Status.ALREADY_INSTALLED: _ANY,
    Status.ABORTED: _ANY | {None},
    Status.DOWNLOADING: frozenset(
        {
            Status.PENDING,
            Status.FAILURE,
            Status.ABORTED,
            Status.NOARTIFACT,
            Status.DOWNLOADING,
            Status.INSTALLING,
        }
    ),
    Status.INSTALLING: frozenset({Status.DOWNLOADING}),
    Status.SUCCESS: frozenset({Status.INSTALLING}),
}


class IllegalTransition(AgentError):
    """A status change :data:`TRANSITIONS` does not allow (a bug, never input)."""


#: (flow id, record, previous status or None for a new record)
OnChange = Callable[[str, FlowRecord, Status | None], None]
_UNSET: Any = object()


class FlowRecords(Mapping[str, FlowRecord]):
    """The flow records of one agent (a read-only mapping), and their only writer."""

    def __init__(self, state: PersistedState) -> None:
        self._state = state
        #: Called after every status change (set by the reconciler).
        self.on_change: OnChange = lambda _f, _r, _p: None
        #: Called after a change that is not a status change (broken, installed).
        self.on_touch: Callable[[str], None] = lambda _f: None

    # ------------------------------------------------------------ reading
    def __getitem__(self, flow_id: str) -> FlowRecord:
        return self._state.flows[flow_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.flows)

    def __len__(self) -> int:
        return len(self._state.flows)

    # ------------------------------------------------------------ writing
    def transition(
        self,
        flow_id: str,
        status: Status,
        *,
        error: str | None = _UNSET,
        target: str | None = _UNSET,
        generation: int | None = _UNSET,
        desired_version: str | None = _UNSET,
        deployment_id: str | None = _UNSET,
        attempts: int | None = _UNSET,
        inflight: InFlight | None = _UNSET,
        next_retry_at: float | None = _UNSET,
        installed: Installed | None = _UNSET,
        no_retry: bool = _UNSET,
        reverted: bool = _UNSET,
        probation_until: float | None = _UNSET,
        deferred_since: float | None = _UNSET,
        deferred_until: float | None = _UNSET,
        at: str | None = None,
    ) -> FlowRecord:
        """Move ``flow_id`` to ``status`` with the given fields; announce it.

        ``at`` is the change's time (default: now), given when the same change is
        also made to a copy that must come out byte for byte the same."""
        rec = self._state.flows.get(flow_id)
        previous = rec.status if rec is not None else None
        if previous not in TRANSITIONS[status]:
            raise IllegalTransition(
                f"flow {flow_id}: {previous.value if previous else 'new'} -> {status.value} "
                "is not a legal transition"
            )
        if rec is None:
            rec = self._state.flows[flow_id] = FlowRecord()
        changes = {
            "error": error,
            "target": target,
            "generation": generation,
            "desired_version": desired_version,
            "deployment_id": deployment_id,
            "attempts": attempts,
            "inflight": inflight,
            "next_retry_at": next_retry_at,
            "installed": installed,
            "no_retry": no_retry,
            "reverted": reverted,
            "probation_until": probation_until,
            "deferred_since": deferred_since,
            "deferred_until": deferred_until,
        }
        for name, value in changes.items():
            if value is not _UNSET:
                setattr(rec, name, value)
        rec.status = status
        rec.last_updated = at or utc_now_iso()
        self.on_change(flow_id, rec, previous)
        return rec

    def activated(
        self,
        flow_id: str,
        installed: Installed,
        *,
        probation_until: float | None = None,
        revert_on_failure: bool = True,
    ) -> FlowRecord:
        """A new version runs: it becomes ``installed`` (the old one ``previous``), the
        flow is not broken any more, and the attempt is a ``success`` (on probation
        until ``probation_until``, when given)."""
        rec = self[flow_id]
        if rec.installed is None:
            rec.previous = None  # a fresh install (or after a removal): nothing before it
        elif not _same_version(rec.installed, installed):
            rec.previous = rec.installed
        rec.broken = False  # a new deployment gives a broken flow a fresh start
        rec.revert_on_failure = revert_on_failure
        return self.transition(
            flow_id,
            Status.SUCCESS,
            installed=installed,
            error=None,
            inflight=None,
            next_retry_at=None,
            probation_until=probation_until,
            deferred_since=None,
            deferred_until=None,
        )

    def reverted(self, flow_id: str, status: Status, error: str, **fields: Any) -> FlowRecord:
        """The installed version failed (its health window) or was aborted: ``previous``
        is installed again (the failed one becomes ``previous``), the attempt ends with
        ``status`` and is not retried. In flight ``revert`` until :meth:`settled`."""
        rec = self[flow_id]
        failed, back = rec.installed, rec.previous
        if back is None:
            raise IllegalTransition(f"flow {flow_id}: no previous version to revert to")
        rec.previous = failed
        rec.broken = False
        return self.transition(
            flow_id,
            status,
            installed=back,
            error=error,
            reverted=True,
            no_retry=True,
            probation_until=None,
            inflight="revert",
            next_retry_at=None,
            **fields,
        )

    def revert_failed(self, flow_id: str, status: Status, error: str) -> FlowRecord:
        """:meth:`reverted` could not start the previous version: the failed one is
        ``installed`` again (it is what runs), the attempt ends with ``status``."""
        rec = self[flow_id]
        rec.installed, rec.previous = rec.previous, rec.installed
        return self.transition(flow_id, status, error=error, reverted=False, no_retry=True)

    def health_failed(self, flow_id: str, error: str) -> FlowRecord:
        """The installed version failed its health window and stays (nothing to go back
        to, or revert is off): ``failure``, not retried."""
        return self.transition(
            flow_id, Status.FAILURE, error=error, no_retry=True, probation_until=None
        )

    def on_probation(self, flow_id: str, until: float) -> None:
        """The installed version is on probation until ``until`` (again)."""
        self._touch(flow_id, probation_until=until)

    def healthy(self, flow_id: str) -> None:
        """The installed version survived its health window."""
        self._touch(flow_id, probation_until=None)

    def settled(self, flow_id: str) -> None:
        """The work in flight (a revert) is done."""
        self._touch(flow_id, inflight=None)

    def _touch(self, flow_id: str, **fields: Any) -> None:
        rec = self._state.flows.get(flow_id)
        if rec is None:
            return
        for name, value in fields.items():
            setattr(rec, name, value)
        rec.last_updated = utc_now_iso()
        self.on_touch(flow_id)

    def removed(self, flow_id: str, generation: int, deployment_id: str | None) -> FlowRecord:
        """The installed version was stopped and purged (kept as ``previous``)."""
        rec = self[flow_id]
        rec.previous = rec.installed
        return self.transition(
            flow_id,
            Status.REMOVED,
            installed=None,
            target="remove",
            generation=generation,
            desired_version=None,
            deployment_id=deployment_id,
            error=None,
            inflight=None,
            attempts=0,
            next_retry_at=None,
            reverted=False,
            no_retry=False,
            probation_until=None,
        )

    def lost(self, flow_id: str, reason: str) -> FlowRecord:
        """The installed version cannot start from the local store: it is installed
        again by the next run (the old target no longer counts as reached)."""
        return self.transition(
            flow_id, Status.FAILURE, installed=None, target=None, error=reason, inflight=None
        )

    def set_broken(self, flow_id: str, broken: bool) -> bool:
        """Mark a flow broken (or not); whether anything changed."""
        rec = self._state.flows.get(flow_id)
        if rec is None or rec.broken == broken:
            return False
        rec.broken = broken
        rec.last_updated = utc_now_iso()
        self.on_touch(flow_id)
        return True

    def forget(self, flow_id: str) -> None:
        """Drop a removed flow's record (it was removed in an earlier generation)."""
        self._state.flows.pop(flow_id, None)
        self.on_touch(flow_id)

    # ------------------------------------------------------------ after a restart
    def recover(self, now: float | None = None) -> list[str]:
        """Map in-flight steps saved before a crash to safe resume points.

        ==============  =====================================================
        in flight       on restart
        ==============  =====================================================
        download        resume: the same attempt goes on (the partial is kept)
        install         the attempt counts as failed ("interrupted during
                        install"); retried if its retry budget allows
        revert          done: ``installed`` is already the version gone back to,
                        and it starts from the local store like any other
        (none)          nothing: installed flows start from the local store
        ==============  =====================================================

        Also repairs what an older agent could save: flow ids such as ``..`` are
        dropped (never touched on disk), a generation past 2^63-1 is reset so the
        next document applies. Returns a note per change, for the log.
        """
        now = time.time() if now is None else now
        state = self._state
        notes: list[str] = []
        for flow_id in [f for f in state.flows if not is_valid_id(f)]:
            del state.flows[flow_id]
            notes.append(f"{flow_id[:80]!r}: not a valid flow id; its record was dropped")
        if state.generation is not None and not 0 <= state.generation <= MAX_GENERATION:
            notes.append(
                f"applied generation ({len(str(state.generation))} digits) is out of "
                "bounds; reset, the next desired document applies"
            )
            state.generation = None
            state.desired_raw = None
        for flow_id, rec in list(state.flows.items()):
            if rec.inflight == "install":
                self.transition(
                    flow_id,
                    Status.FAILURE,
                    inflight=None,
                    error=f"interrupted during install (attempt {rec.attempts})",
                    next_retry_at=now,
                )
                notes.append(f"{flow_id}: install was interrupted; counted as a failed attempt")
            elif rec.inflight == "download":
                notes.append(f"{flow_id}: resuming interrupted download")
            elif rec.inflight == "revert":
                rec.inflight = None
                notes.append(f"{flow_id}: revert to {_version(rec)} completes at start-up")
            elif rec.status in (Status.DOWNLOADING, Status.INSTALLING):
                self.transition(flow_id, Status.PENDING)
        return notes


def _version(rec: FlowRecord) -> str:
    return rec.installed.version if rec.installed is not None else "nothing"


def _same_version(a: Installed, b: Installed) -> bool:
    """Whether two installs run the same thing (bytes, kind, config, manifest)."""
    return (a.version, a.sha256, a.kind, a.config, a.manifest) == (
        b.version,
        b.sha256,
        b.kind,
        b.config,
        b.manifest,
    )
