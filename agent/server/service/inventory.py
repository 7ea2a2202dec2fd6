"""What the devices say, into the database: the inventory and the deployment records.

The broker link hands every ``status`` and ``state`` message to :meth:`Inventory.offer`
(on paho's thread: it only queues). One thread takes them in batches (a burst of a
thousand reports is a few transactions, not a thousand), keeps only the newest
message per topic of a batch, and applies them with the devices' rows locked first,
in the order the desired writer locks in.

Several server processes split the reports (MQTT 5 shared subscriptions), so two
reports of one device may be applied by two processes in either order: a state report
older than the one recorded (by the device's ``time``) is not applied over it. A new
device is created with ``INSERT … ON CONFLICT DO NOTHING`` in a transaction of its
own, so two processes hearing it at once do not fail each other's batch. A batch the
database refused is tried again (a deadlock, a lost connection); one that still fails
is dropped, and ``on_lost`` asks for the devices' retained reports again.

A message is bounded (``MAX_MESSAGE``) and parsed leniently: a malformed report is
logged and dropped, never an error of the loop.

The devices' deployment logs (``{prefix}/{id}/deployments/{deploymentId}/log``,
retained, one per failed attempt) are stored too (``DeploymentLog``, replaced by a
later one; an empty retained message deletes it): Mender's API serves them. A log
read again unchanged (the retained messages are read again every few minutes) is not
written again. They are bounded, since a device chooses its deployment ids and its
logs' contents: the newest :data:`MAX_LOGS_PER_DEVICE` logs of a device are kept (by
when they were stored), each with its newest lines up to :data:`MAX_LOG_LINES` and
:data:`MAX_LOG_CHARS`, each field of a line cut to its length (:data:`LOG_FIELDS`).
Once a batch is recorded, ``on_applied`` is called (the rollout engine looks again).

The devices' events and their responses to the server's commands (never retained by
an agent: a retained one is dropped) are recorded in the same transaction as the
batch's reports, so a batch tried again does not record them twice: events as the
console's timeline, responses matched to the commands by id, both only for devices
the application has and did not decommission
(:mod:`agent.server.service.device_events`).
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import delete, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from agent.server.db import deployments as deployments_repo
from agent.server.db import devices as devices_repo
from agent.server.db import rollouts as rollouts_repo
from agent.server.db.engine import Database
from agent.server.db.models import (
    Deployment,
    DeploymentAttempt,
    DeploymentLog,
    Device,
    new_id,
    utcnow,
)
from agent.server.service import device_events
from agent.server.text import tree_problem
from agent.wire.protocol import is_valid_id

log = structlog.get_logger("agent.server.inventory")

MAX_MESSAGE = 1 << 20
BATCH = 500
#: Seconds a batch gathers messages after its first (reports come in bursts: a
#: release makes every device report several times within seconds; one transaction
#: per 50 ms, not one per message that happened to arrive alone).
GATHER_S = 0.05
#: The attempt statuses that end it.
TERMINAL = deployments_repo.TERMINAL
#: (topic, payload, retained): retained is a report read from the broker's store (on
#: subscribing, or read again), not one the device sent just now.
Report = tuple[str, bytes, bool]
#: Seconds between the tries of a batch the database refused (then it is dropped).
RETRY_DELAYS = (0.1, 0.5, 2.0)
#: A deployment id as the agent accepts it (protocol.md, ``deploymentId``).
DEPLOYMENT_ID = re.compile(r"(?!\.+$)[A-Za-z0-9._:-]{1,128}")
#: Deployment logs kept per device: the newest (by when they were stored).
MAX_LOGS_PER_DEVICE = 50
#: Lines of one deployment log kept, the newest (the agent sends its last
#: ``reconcile.log_lines``, 500 by default).
MAX_LOG_LINES = 2000
#: The fields of a log line kept, each cut to this many characters.
LOG_FIELDS = {"time": 64, "level": 16, "message": 2048}
#: Characters of one log's lines, at most (the newest lines that fit are kept).
MAX_LOG_CHARS = 256 * 1024
#: Devices per query when logs are compared with the stored ones.
LOG_CHUNK = 500
#: (application id, device id, deployment id) → the log's document (None: cleared).
Logs = dict[tuple[str, str, str], dict[str, Any] | None]


class Inventory:
    def __init__(
        self,
        db: Database,
        app_for_prefix: Callable[[str], str | None],
        on_retired: Callable[[str, str], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        on_applied: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.app_for_prefix = app_for_prefix
        #: Called (prefix, device id) once a decommissioned device reports no flows.
        self.on_retired = on_retired
        #: Called once reports were dropped (the database refused them) and the
        #: database answers again: the devices' retained reports are to be read again.
        self.on_lost = on_lost
        #: Called after every batch recorded (the rollout engine looks again).
        self.on_applied = on_applied
        self._lost = False
        #: Devices known to have a row (application id, device id): no INSERT for them.
        self._known: set[tuple[str, str]] = set()
        self.queue: queue.Queue[Report | None] = queue.Queue()
        self.applied = 0
        self._idle = threading.Event()
        self._idle.set()

    def offer(self, topic: str, payload: bytes, retained: bool = False) -> None:
        self._idle.clear()
        self.queue.put((topic, payload, retained))

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
            end = time.monotonic() + GATHER_S
            while len(batch) < BATCH:
                left = end - time.monotonic()
                try:
                    item = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop.set()
                    break
                batch.append(item)
            self._apply_retrying([b for b in batch if b is not None], stop)
            if self.queue.empty():
                self._idle.set()

    def _apply_retrying(self, batch: list[Report], stop: threading.Event) -> None:
        for delay in (*RETRY_DELAYS, None):
            try:
                self.apply(batch)
            except (OperationalError, DBAPIError) as exc:
                # A deadlock, a serialization failure, the connection lost: try again.
                if delay is None or stop.is_set():
                    log.error("device reports dropped", messages=len(batch), error=str(exc))
                    self._lost = True
                    return
                log.warning("device reports not recorded; trying again", error=str(exc))
                stop.wait(delay)
            except Exception:  # a bug: never the end of the loop
                log.exception("could not record device reports", messages=len(batch))
                return
            else:
                if self._lost and self.on_lost is not None:
                    self._lost = False
                    self.on_lost()
                return

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

    def _route_log(self, topic: str) -> tuple[str, str, str] | None:
        """(application id, device id, deployment id) of a deployment log's topic."""
        head, _, tail = topic.rpartition("/deployments/")
        deployment_id, _, last = tail.partition("/")
        prefix, _, device_id = head.rpartition("/")
        if last != "log" or DEPLOYMENT_ID.fullmatch(deployment_id) is None:
            return None
        app_id = self.app_for_prefix(prefix)
        if app_id is None or not is_valid_id(device_id):
            return None
        return app_id, device_id, deployment_id

    def _take_event(
        self,
        topic: str,
        payload: bytes,
        retained: bool,
        now: datetime,
        events: dict[str, list[dict[str, Any]]],
        responses: list[tuple[str, str, str, dict[str, Any]]],
    ) -> None:
        """An event or a command response, parsed into ``events`` or ``responses``
        (a malformed one, or one of no known application, is dropped). A retained
        one is dropped too: an agent never retains either (protocol.md § Events, §
        Commands), and a retained one (someone else's) would be recorded again at
        every subscription."""
        if retained:
            log.debug("retained device event or response dropped", topic=topic[:300])
            return
        response = topic.endswith("/command/response")
        head = topic[: -len("/command/response" if response else "/events")]
        prefix, _, device_id = head.rpartition("/")
        app_id = self.app_for_prefix(prefix)
        if app_id is None or not is_valid_id(device_id):
            return
        doc = _parse(payload)
        if doc is None:
            log.debug("malformed device message dropped", topic=topic, size=len(payload))
            return
        if response:
            got = device_events.response_doc(doc)
            if got is not None:
                responses.append((app_id, device_id, *got))
            return
        row = device_events.event_row(device_id, doc, now)
        if row is None:
            log.debug("malformed device event dropped", device=device_id)
            return
        events.setdefault(app_id, []).append(row)

    def apply(self, batch: list[Report]) -> None:
        prefixes: dict[str, str] = {}
        retired: list[tuple[str, str]] = []
        work: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        logs: Logs = {}
        #: Devices heard now (not only retained reports read again).
        heard: set[tuple[str, str]] = set()
        #: Events by application id; command responses (app, device, command id, doc).
        events: dict[str, list[dict[str, Any]]] = {}
        responses: list[tuple[str, str, str, dict[str, Any]]] = []
        heard_at = utcnow()
        for topic, payload, retained in batch:
            if topic.endswith(("/events", "/command/response")):
                self._take_event(topic, payload, retained, heard_at, events, responses)
                continue
            if topic.endswith("/log"):
                where = self._route_log(topic)
                doc = _parse(payload)
                if where is not None and (doc is not None or not payload):
                    logs[where] = doc  # (None: cleared)
                continue
            route = self._route(topic)
            if route is None:
                continue
            app_id, device_id, kind = route
            doc = _parse(payload)
            if doc is None:
                if payload:
                    log.warning("malformed device report dropped", topic=topic, size=len(payload))
                continue
            docs = work.setdefault((app_id, device_id), {})
            if not retained:
                heard.add((app_id, device_id))
            # The later report of a topic replaces the earlier (a state report by its
            # time: a retained one read again may come after a live, newer one).
            if kind != "state" or "state" not in docs or _newer(doc, docs["state"]):
                docs[kind] = doc
            prefixes[app_id] = topic.rsplit("/", 2)[0]
        self._record_logs(logs)
        if not work and not events and not responses:
            self._applied()
            return
        by_app: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        for (app_id, device_id), docs in work.items():
            by_app.setdefault(app_id, {})[device_id] = docs
        self._create_missing(by_app)
        now = utcnow()
        # The events and responses in the same transaction as the reports: a batch
        # the database refused and that is tried again does not record them twice.
        with self.db.transaction() as s:
            for app_id, devices in sorted(by_app.items()):
                live = {d for a, d in heard if a == app_id}
                done = self._apply_app(s, app_id, devices, live, now)
                retired += [(prefixes[app_id], d) for d in done]
            if events or responses:
                _record_events(s, events, responses, heard_at)
        self.applied += len(work)
        for prefix, device_id in retired:
            if self.on_retired is not None:
                self.on_retired(prefix, device_id)
        self._applied()

    def _record_logs(self, logs: Logs) -> None:
        """The batch's deployment logs, in a transaction of their own (a batch tried
        again finds them stored, unchanged, and does not write them again)."""
        if logs:
            with self.db.transaction() as s:
                _store_logs(s, logs)

    def _applied(self) -> None:
        if self.on_applied is not None:
            self.on_applied()

    def _create_missing(self, by_app: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> None:
        """Rows for devices heard of for the first time, committed on their own (a
        concurrent insert by another process waits on nothing else, and is no error)."""
        new = {
            app_id: [d for d in devices if (app_id, d) not in self._known]
            for app_id, devices in by_app.items()
        }
        if not any(new.values()):
            return
        with self.db.transaction() as s:
            for app_id, ids in sorted(new.items()):
                if not ids:
                    continue
                have = set(
                    s.scalars(
                        select(Device.id).where(Device.application_id == app_id, Device.id.in_(ids))
                    )
                )
                devices_repo.insert_missing(s, app_id, [d for d in ids if d not in have])
        for app_id, ids in new.items():
            self._known.update((app_id, d) for d in ids)

    def _apply_app(
        self,
        s: Session,
        app_id: str,
        devices: dict[str, dict[str, dict[str, Any]]],
        heard: set[str],
        now: datetime,
    ) -> list[str]:
        """Apply one application's reports (``heard``: the devices some of whose
        reports were sent just now, not only read again); returns the decommissioned
        devices whose flows are all gone (their retained documents can be cleared)."""
        retired: list[str] = []
        rows = devices_repo.lock_many(s, app_id, list(devices))
        with_state = [d for d, docs in devices.items() if "state" in docs and d in rows]
        deps: dict[str, dict[str, Deployment]] = {}
        for (dv, flow_id), dep in deployments_repo.for_devices(s, app_id, with_state).items():
            deps.setdefault(dv, {})[flow_id] = dep
        attempts = deployments_repo.attempts_by_id(
            s, [a for d in with_state for a in _attempt_ids(devices[d]["state"])]
        )
        for device_id, docs in sorted(devices.items()):
            dev = rows.get(device_id)
            if dev is None:  # (its row was removed since)
                self._known.discard((app_id, device_id))
                continue
            if dev.decommissioned:
                if "state" in docs and _no_flows(docs["state"]):
                    retired.append(device_id)
                continue
            # A retained report read again is no sign of life: last_seen stays.
            live = device_id in heard
            if "status" in docs:
                _apply_status(dev, docs["status"], now if live else None)
            state = docs.get("state")
            if state is not None:
                if live:
                    dev.last_seen = now
                if not _newer(state, dev.state):
                    continue  # another process applied a later report already
                dev.state = state
                _apply_state(s, dev, deps.setdefault(device_id, {}), state, attempts, now)
        return retired


def _record_events(
    s: Session,
    events: dict[str, list[dict[str, Any]]],
    responses: list[tuple[str, str, str, dict[str, Any]]],
    now: datetime,
) -> None:
    """Record the batch's events and command responses in a savepoint: they are
    checked and bounded before (:mod:`agent.server.service.device_events`), but
    should the database still refuse one (a check missed), the batch's reports
    stand and only these are dropped. A deadlock or a lost connection is no refusal
    of the data: it fails the batch, which is tried again whole."""
    try:
        with s.begin_nested():
            device_events.record(s, events, responses, now)
    except (DataError, IntegrityError) as exc:
        log.error(
            "device events and command responses refused by the database; dropped",
            events=sum(map(len, events.values())),
            responses=len(responses),
            error=str(exc)[:300],
        )


def _store_logs(s: Session, logs: Logs) -> None:
    """Store, replace or drop the logs (see the module): unchanged ones are left
    alone, and a device keeps its newest :data:`MAX_LOGS_PER_DEVICE`."""
    by_device: dict[tuple[str, str], dict[str, dict[str, Any] | None]] = {}
    for (app_id, device_id, deployment_id), doc in logs.items():  # (in the order heard)
        by_device.setdefault((app_id, device_id), {})[deployment_id] = doc
    apps = sorted({app_id for app_id, _ in by_device})
    for app_id in apps:
        devices = sorted(d for a, d in by_device if a == app_id)
        for i in range(0, len(devices), LOG_CHUNK):
            chunk = devices[i : i + LOG_CHUNK]
            incoming = {d: by_device[(app_id, d)] for d in chunk}
            _store_device_logs(s, app_id, incoming)


def _store_device_logs(
    s: Session, app_id: str, incoming: dict[str, dict[str, dict[str, Any] | None]]
) -> None:
    devices = list(incoming)
    ids = sorted({dep for docs in incoming.values() for dep in docs})
    # When each stored log of these devices was stored (for the cap), and the ones
    # named now whole (to compare with).
    stored: dict[str, dict[str, tuple[int, float, str]]] = {d: {} for d in devices}
    for device_id, deployment_id, when in s.execute(
        select(DeploymentLog.device_id, DeploymentLog.deployment_id, DeploymentLog.time).where(
            DeploymentLog.application_id == app_id, DeploymentLog.device_id.in_(devices)
        )
    ):
        stored[device_id][deployment_id] = (0, when.timestamp(), deployment_id)
    current = {
        (row.device_id, row.deployment_id): (row.flow_id, row.messages)
        for row in s.execute(
            select(
                DeploymentLog.device_id,
                DeploymentLog.deployment_id,
                DeploymentLog.flow_id,
                DeploymentLog.messages,
            ).where(
                DeploymentLog.application_id == app_id,
                DeploymentLog.device_id.in_(devices),
                DeploymentLog.deployment_id.in_(ids),
            )
        )
    }
    for device_id, docs in incoming.items():
        order = stored[device_id]
        heard = {deployment_id: n for n, deployment_id in enumerate(docs)}
        # (Of more new logs than a device keeps, the last ones heard.)
        new = [d for d, doc in docs.items() if doc is not None]
        skipped = set(new[:-MAX_LOGS_PER_DEVICE])
        # Written in one order (two server processes lock rows in the same order).
        for deployment_id, doc in sorted(docs.items()):
            if doc is None:
                if order.pop(deployment_id, None) is not None:
                    rollouts_repo.drop_log(s, app_id, device_id, deployment_id)
                continue
            if deployment_id in skipped:
                continue
            row = _log_row(doc)
            if row is None:
                log.warning("malformed deployment log dropped", device=device_id)
                continue
            if current.get((device_id, deployment_id)) == row:
                continue  # (read again, unchanged)
            rollouts_repo.save_log(s, app_id, device_id, deployment_id, *row)
            order[deployment_id] = (1, float(heard[deployment_id]), deployment_id)
        excess = len(order) - MAX_LOGS_PER_DEVICE
        if excess > 0:
            oldest = sorted(order, key=order.__getitem__)[:excess]
            s.execute(
                delete(DeploymentLog).where(
                    DeploymentLog.application_id == app_id,
                    DeploymentLog.device_id == device_id,
                    DeploymentLog.deployment_id.in_(oldest),
                )
            )


def _log_row(doc: dict[str, Any]) -> tuple[str | None, list[dict[str, str]]] | None:
    """(flow id, lines) of a log document as it is stored, or None if malformed."""
    messages = doc.get("messages")
    if not isinstance(messages, list) or tree_problem(doc) is not None:
        return None
    lines: list[dict[str, str]] = []
    chars = 0
    for m in reversed(messages):
        if len(lines) == MAX_LOG_LINES:
            break
        if not isinstance(m, dict):
            continue
        line = {k: _field(m.get(k), n) for k, n in LOG_FIELDS.items()}
        chars += sum(len(v) for v in line.values())
        if chars > MAX_LOG_CHARS:
            break
        lines.append(line)
    lines.reverse()
    return _text(doc.get("flowId"), 128), lines


def _field(value: Any, limit: int) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:limit]


def _attempt_ids(state: dict[str, Any]) -> list[str]:
    flows = state.get("flows")
    if not isinstance(flows, dict):
        return []
    return [
        f["deploymentId"]
        for f in flows.values()
        if isinstance(f, dict)
        and isinstance(f.get("deploymentId"), str)
        and len(f["deploymentId"]) == 24
    ]


def _report_time(doc: dict[str, Any] | None) -> datetime | None:
    value = (doc or {}).get("time")
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _verdicts(doc: dict[str, Any]) -> int:
    flows = doc.get("flows")
    if not isinstance(flows, dict):
        return 0
    return sum(1 for f in flows.values() if isinstance(f, dict) and f.get("status") in TERMINAL)


def _newer(incoming: dict[str, Any], recorded: dict[str, Any] | None) -> bool:
    """Whether a state report is to replace the recorded one: a later ``time`` (the
    device's clock, milliseconds); in the same millisecond, the one with as many
    verdicts or more (an install and its ``success`` can share one). A report without
    a time is applied (another writer's agent, or an old one)."""
    if recorded == incoming:
        return False
    new, old = _report_time(incoming), _report_time(recorded)
    if new is None or old is None:
        return True
    if new != old:
        return new > old
    return _verdicts(incoming) >= _verdicts(recorded or {})


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


def _apply_status(dev: Device, doc: dict[str, Any], now: datetime | None) -> None:
    """``now``: when it was heard (None: a retained status read again)."""
    online = doc.get("online") is True
    at = now or utcnow()
    if online and not dev.online:
        dev.connected_at = at
    if not online and dev.online:
        dev.disconnected_at = at
    dev.online = online
    if now is not None:
        dev.last_seen = now
    if online:
        dev.agent_version = _text(doc.get("agentVersion"), 64) or dev.agent_version
        dev.device_type = _text(doc.get("deviceType"), 64) or dev.device_type
        dev.runtime = _text(doc.get("runtime"), 128) or dev.runtime


def _apply_state(
    s: Session,
    dev: Device,
    deps: dict[str, Deployment],
    doc: dict[str, Any],
    attempts: dict[str, DeploymentAttempt],
    now: datetime,
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
                id=new_id(),
                application_id=dev.application_id,
                device_id=dev.id,
                flow_id=flow_id,
                desired_version=_text(fs.get("desiredVersion"), 128),
                creation_date=now,
                last_updated=now,
            )
            s.add(dep)
            deps[flow_id] = dep
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
        if status in TERMINAL and isinstance(attempt_id, str):
            # (A failed attempt the agent retries later may still end in success.)
            attempt = attempts.get(attempt_id)
            if (
                attempt is not None
                and attempt.deployment_id == dep.id
                and (attempt.finished is None or attempt.status != status)
            ):
                attempt.status = status
                attempt.error = error
                attempt.finished = now
