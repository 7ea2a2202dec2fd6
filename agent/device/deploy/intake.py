"""Desired documents in: read within bounds, judged, ordered, and on disk before work.

A document is parsed with the wire bounds, its artifacts are judged by the
signature policy (an entry whose artifact is refused becomes an invalid entry:
status ``failure``, no retries, the running version keeps running), and it is
taken only with a generation higher than the applied one. Its intent (the
document, and ``pending`` for every flow it changes) is persisted before anything
is started from it; if that save fails, what was applied before is restored and
the document is reported ``rejected``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog

from agent.device.config import AgentConfig
from agent.device.deploy.planner import Download, plan
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.state import PersistedState, serialise
from agent.device.reporter import Reporter
from agent.errors import ProtocolError, StateError
from agent.wire.protocol import DesiredState, RejectedDesired, Status, parse_desired, utc_now_iso
from agent.wire.signing import Trust

log = structlog.get_logger("agent.device.deploy.intake")

#: A persisted document was accepted once: only the file system bounds it.
PERSISTED_MAX_BYTES = 1 << 30


class DesiredIntake:
    def __init__(
        self,
        cfg: AgentConfig,
        state: PersistedState,
        records: FlowRecords,
        reporter: Reporter,
        *,
        persist: Callable[[], Awaitable[None]],
        write: Callable[[bytes], Awaitable[None]],
        persist_soon: Callable[[], None],
        trigger: Callable[[], None],
        trust: Trust,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.records = records
        self.reporter = reporter
        self._persist = persist
        self._write = write
        self._persist_soon = persist_soon
        self._trigger = trigger
        self.trust = trust
        #: The document being applied (None before the first one).
        self.desired = self._parse_persisted()

    def set_trust(self, trust: Trust) -> None:
        """A new signature policy: the applied document is judged again."""
        self.trust = trust
        self.desired = self._parse_persisted()

    def _parse_persisted(self) -> DesiredState | None:
        if self.state.desired_raw is None:
            return None
        try:
            desired = parse_desired(self.state.desired_raw.encode(), PERSISTED_MAX_BYTES)
        except ProtocolError as exc:  # cannot happen for a document we accepted
            log.error("persisted desired document unreadable", error=str(exc))
            return None
        return self._admit(desired)

    def _admit(self, desired: DesiredState) -> DesiredState:
        # Every artifact of an entry is judged (not only this device type's): the
        # verdict does not change with the device type.
        for flow_id, spec in list(desired.flows.items()):
            for artifact in spec.all_artifacts():
                reason = self.trust.check(artifact)
                if reason is not None:
                    del desired.flows[flow_id]
                    desired.invalid[flow_id] = reason
                    break
        return desired

    async def take_in(
        self, payload: bytes, supersede: Callable[[DesiredState], Awaitable[None]]
    ) -> bool:
        """Accept or reject ``payload``; ``supersede`` stops the run in flight for a
        document that will be accepted. Returns whether it was accepted."""
        if not payload:
            self.reject(None, "empty desired document (retained message cleared); ignored")
            return False
        try:
            desired = self._admit(parse_desired(payload, self.cfg.reconcile.desired_max_bytes))
        except ProtocolError as exc:
            self.reject(None, str(exc))
            return False
        applied = self.state.generation
        if applied is not None and desired.generation < applied:
            self.reject(
                desired.generation,
                f"generation {desired.generation} is older than the applied {applied}; ignored",
            )
            return False
        text = payload.decode()
        if applied is not None and desired.generation == applied:
            if text != self.state.desired_raw:
                self.reject(
                    desired.generation,
                    f"generation {applied} is already applied with other content; "
                    "a changed document needs a higher generation",
                )
            return False
        at = utc_now_iso()  # (the same in the copy written first and in the state)
        try:  # the intent must be writable before it has any effect (no run stopped)
            await self._write(serialise(self._with_intent(self.state, desired, text, at)))
        except StateError as exc:
            self.reject(desired.generation, f"cannot persist the desired state: {exc}")
            return False
        await supersede(desired)
        before = serialise(self.state)  # (a copy: cheaper than a deep copy of the model)
        self.desired = desired
        self.state.desired_raw = text
        self.state.generation = desired.generation
        self.state.rejected = None
        log.info(
            "desired state accepted",
            generation=desired.generation,
            flows=len(desired.flows),
            invalid=len(desired.invalid),
        )
        self.mark_pending(desired, at=at)
        try:
            # With what the superseded run left; with no run in flight this is the
            # snapshot written above, and the writer does not write it again.
            await self._persist()
        except StateError as exc:
            # Without persisted intent nothing is started: restore what was applied.
            restored = PersistedState.model_validate_json(before)
            for name in PersistedState.model_fields:
                setattr(self.state, name, getattr(restored, name))
            self.desired = self._parse_persisted()
            self.reject(desired.generation, f"cannot persist the desired state: {exc}")
            self._trigger()  # resume what the cancelled run was doing for the applied state
            return False
        self.reporter.mark_dirty()
        self._trigger()
        return True

    def reject(self, generation: int | None, reason: str) -> None:
        log.warning("desired document rejected", generation=generation, reason=reason)
        self.state.rejected = RejectedDesired(
            generation=generation, reason=reason, time=utc_now_iso()
        )
        self.reporter.mark_dirty()
        self._persist_soon()  # (so that a restart still reports it)

    def _with_intent(
        self, state: PersistedState, desired: DesiredState, text: str, at: str
    ) -> PersistedState:
        """A copy of ``state`` that has taken ``desired`` in (announces nothing)."""
        copy = PersistedState.model_validate_json(serialise(state))  # (see `before`)
        copy.desired_raw, copy.generation, copy.rejected = text, desired.generation, None
        self.mark_pending(desired, FlowRecords(copy), at=at)
        return copy

    def mark_pending(
        self, desired: DesiredState, records: FlowRecords | None = None, *, at: str | None = None
    ) -> None:
        """``pending`` for every flow whose target ``desired`` changes."""
        records = records if records is not None else self.records
        for step in plan(desired, records, device_type=self.cfg.device_type, now=time.time()):
            if isinstance(step, Download):
                t = step.target
                rec = records.get(t.flow_id)
                if rec is None or rec.target != t.key:
                    records.transition(
                        t.flow_id,
                        Status.PENDING,
                        target=t.key,
                        generation=t.generation,
                        desired_version=t.version,
                        deployment_id=t.deployment_id,
                        attempts=0,
                        error=None,
                        inflight=None,
                        next_retry_at=None,
                        no_retry=False,
                        reverted=False,
                        deferred_since=None,
                        deferred_until=None,
                        at=at,
                    )
