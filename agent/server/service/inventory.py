"""What the devices say, into the database: the inventory and the deployment records.

The broker link hands every ``status`` and ``state`` message to :meth:`Inventory.offer`
(on paho's thread: it only queues). One thread takes them in batches (a burst of a
thousand reports is a few transactions, not a thousand), keeps only the newest
message per topic of a batch, and applies them in device order with each device's
row locked first, the same order the desired writer locks in.

A message is bounded (``MAX_MESSAGE``) and parsed leniently: a malformed report is
logged and dropped, never an error of the loop.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.orm import Session

from agent.server.db import deployments as deployments_repo
from agent.server.db import devices as devices_repo
from agent.server.db.engine import Database
from agent.server.db.models import Deployment, DeploymentAttempt, Device, utcnow
from agent.wire.protocol import is_valid_id

log = structlog.get_logger("agent.server.inventory")

MAX_MESSAGE = 1 << 20
BATCH = 500
#: Seconds a batch waits for more messages after its first.
GATHER_S = 0.02
#: The attempt statuses that end it.
TERMINAL = deployments_repo.TERMINAL


class Inventory:
    def __init__(
        self,
        db: Database,
        app_for_prefix: Callable[[str], str | None],
        on_retired: Callable[[str, str], None] | None = None,
    ) -> None:
        self.db = db
        self.app_for_prefix = app_for_prefix
        #: Called (prefix, device id) once a decommissioned device reports no flows.
        self.on_retired = on_retired
        self.queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.applied = 0
        self._idle = threading.Event()
        self._idle.set()

    def offer(self, topic: str, payload: bytes, _retained: bool = False) -> None:
        self._idle.clear()
        self.queue.put((topic, payload))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                first = self.queue.get(timeout=0.5)
            except queue.Empty:
                self._idle.set()
                continue
            if first is None:
                return
            batch = [first]
            deadline = GATHER_S
            while len(batch) < BATCH:
                try:
                    item = self.queue.get(timeout=deadline)
                except queue.Empty:
                    break
                if item is None:
                    stop.set()
                    break
                batch.append(item)
                deadline = 0.001
            try:
                self.apply([b for b in batch if b is not None])
            except Exception:  # a database outage: the reports are re-sent by devices
                log.exception("could not record device reports", messages=len(batch))
            if self.queue.empty():
                self._idle.set()

    def close(self) -> None:
        self.queue.put(None)

    def wait_idle(self, timeout: float) -> bool:
        """Tests and benchmarks: wait until every queued message was applied."""
        return self._idle.wait(timeout)

    # ------------------------------------------------------------------ applying
    def _route(self, topic: str) -> tuple[str, str, str] | None:
        for kind in ("/status", "/state"):
            if topic.endswith(kind):
                head = topic[: -len(kind)]
                prefix, _, device_id = head.rpartition("/")
                app_id = self.app_for_prefix(prefix)
                if app_id is None or not is_valid_id(device_id):
                    return None
                return app_id, device_id, kind[1:]
        return None

    def apply(self, batch: list[tuple[str, bytes]]) -> None:
        latest: dict[str, bytes] = {}
        prefixes: dict[str, str] = {}
        retired: list[tuple[str, str]] = []
        for topic, payload in batch:
            latest[topic] = payload  # a newer report of a topic replaces the older
        work: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for topic, payload in latest.items():
            route = self._route(topic)
            if route is None:
                continue
            app_id, device_id, kind = route
            doc = _parse(payload)
            if doc is None:
                if payload:
                    log.warning("malformed device report dropped", topic=topic, size=len(payload))
                continue
            work.setdefault((app_id, device_id), {})[kind] = doc
            prefixes[app_id] = topic.rsplit("/", 2)[0]
        if not work:
            return
        now = utcnow()
        with self.db.transaction() as s:
            for (app_id, device_id), docs in sorted(work.items()):
                dev = devices_repo.get(s, app_id, device_id, lock=True)
                if dev is None:
                    dev = devices_repo.ensure(s, app_id, device_id)
                if dev.decommissioned:
                    if "state" in docs and _no_flows(docs["state"]):
                        retired.append((prefixes[app_id], device_id))
                    continue
                if "status" in docs:
                    _apply_status(dev, docs["status"], now)
                if "state" in docs:
                    dev.state = docs["state"]
                    dev.last_seen = now
                    deps = deployments_repo.for_device(s, app_id, device_id)
                    _apply_state(s, dev, deps, docs["state"], now)
        self.applied += len(work)
        for prefix, device_id in retired:
            if self.on_retired is not None:
                self.on_retired(prefix, device_id)


def _no_flows(state: dict[str, Any]) -> bool:
    """Whether a state report shows no flow installed (a decommissioned device done)."""
    flows = state.get("flows")
    if not isinstance(flows, dict):
        return True
    return all(isinstance(f, dict) and not f.get("currentVersion") for f in flows.values())


def _parse(payload: bytes) -> dict[str, Any] | None:
    if not payload or len(payload) > MAX_MESSAGE:
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _apply_status(dev: Device, doc: dict[str, Any], now: datetime) -> None:
    online = doc.get("online") is True
    if online and not dev.online:
        dev.connected_at = now
    if not online and dev.online:
        dev.disconnected_at = now
    dev.online = online
    dev.last_seen = now
    if online:
        dev.agent_version = _text(doc.get("agentVersion"), 64) or dev.agent_version
        dev.device_type = _text(doc.get("deviceType"), 64) or dev.device_type
        dev.runtime = _text(doc.get("runtime"), 128) or dev.runtime


def _apply_state(
    s: Session, dev: Device, deps: dict[str, Deployment], doc: dict[str, Any], now: datetime
) -> None:
    flows = doc.get("flows")
    if not isinstance(flows, dict):
        return
    for flow_id, fs in flows.items():
        if not isinstance(fs, dict) or not is_valid_id(flow_id):
            continue
        dep = deps.get(flow_id)
        if dep is None:  # deployed by another writer (the fleet tool): recorded too
            dep = Deployment(
                application_id=dev.application_id,
                device_id=dev.id,
                flow_id=flow_id,
                desired_version=_text(fs.get("desiredVersion"), 128),
                creation_date=now,
                last_updated=now,
            )
            s.add(dep)
            s.flush()
        current = _text(fs.get("currentVersion"), 128)
        status = _text(fs.get("status"), 32)
        error = _text(fs.get("error"), 4096)
        sha = _text(fs.get("sha256"), 64)
        if (dep.current_version, dep.status, dep.error, dep.current_sha256) != (
            current,
            status,
            error,
            sha,
        ):
            dep.current_version, dep.status, dep.error, dep.current_sha256 = (
                current,
                status,
                error,
                sha,
            )
            dep.last_updated = now
        attempt_id = fs.get("deploymentId")
        if status in TERMINAL and isinstance(attempt_id, str) and len(attempt_id) == 24:
            # (A failed attempt the agent retries later may still end in success.)
            attempt = s.get(DeploymentAttempt, attempt_id)
            if (
                attempt is not None
                and attempt.deployment_id == dep.id
                and (attempt.finished is None or attempt.status != status)
            ):
                attempt.status = status
                attempt.error = error
                attempt.finished = now
