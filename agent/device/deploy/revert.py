"""Going back to the previous version, from the local store (no network needed).

Used when a new version fails within its health window (:mod:`agent.device.deploy.health`)
and when an aborted deployment had already activated (a ``Revert`` step). The
record is written first (``installed`` = the previous version, ``reverted``, in
flight ``revert``) and saved, then the previous version is started: after a crash
at any point the agent starts the version gone back to from its local store, and
:meth:`~agent.device.deploy.records.FlowRecords.recover` completes the record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from agent.device._logging import capture
from agent.device.deploy.local import LocalStore
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.state import FlowRecord
from agent.device.reporter import Reporter
from agent.errors import AgentError
from agent.wire.protocol import Status

log = structlog.get_logger("agent.device.deploy.revert")


class Reverter:
    def __init__(
        self,
        records: FlowRecords,
        local: LocalStore,
        reporter: Reporter,
        persist: Callable[[], Awaitable[None]],
        *,
        device_id: str,
        log_lines: int,
    ) -> None:
        self.records = records
        self.local = local
        self.reporter = reporter
        self.persist = persist
        self.device_id = device_id
        self.log_lines = log_lines
        self._locks: dict[str, asyncio.Lock] = {}

    async def revert(
        self, flow_id: str, failed_sha256: str, status: Status, reason: str, **fields: object
    ) -> bool:
        """Go back from the installed version ``failed_sha256`` to the previous one and
        end the attempt with ``status``. Nothing happens (False) if that version is
        no longer the installed one, or there is nothing to go back to: two reasons to
        revert at once (a health failure and an abort) revert once."""
        lock = self._locks.setdefault(flow_id, asyncio.Lock())
        async with lock:
            rec = self.records.get(flow_id)
            if rec is None or rec.installed is None or rec.installed.sha256 != failed_sha256:
                return False
            back = rec.previous
            if back is None:
                return False
            failed = rec.installed.version
            log.warning(
                "reverting to the previous version",
                flow_id=flow_id,
                device_id=self.device_id,
                failed=failed,
                to=back.version,
                reason=reason,
            )
            rec = self.records.reverted(
                flow_id, status, f"{reason}; reverted to version {back.version}", **fields
            )
            await self.persist()  # before the work: a crash from here starts `back`
            try:
                await self.local.start(flow_id)
            except AgentError as exc:
                # The failed version still runs (a swap happens only once the previous
                # one started): the record says so, and that the revert failed.
                log.error("the previous version could not start", flow_id=flow_id, error=str(exc))
                rec = self.records.revert_failed(
                    flow_id, status, f"{reason}; going back to version {back.version} failed: {exc}"
                )
            else:
                log.info(
                    "reverted", flow_id=flow_id, device_id=self.device_id, version=back.version
                )
            self.records.settled(flow_id)
            await self.persist()
            self.publish_log(flow_id, rec)
            return True

    def publish_log(self, flow_id: str, rec: FlowRecord) -> None:
        """The deployment log of a failed version: the flow's recent log lines."""
        lines = capture.recent(self.device_id, flow_id, self.log_lines)
        self.reporter.deployment_log(flow_id, rec, lines)
