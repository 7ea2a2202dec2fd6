"""The operator side: deployments across a fleet, over the broker alone.

A :class:`FleetClient` reads the retained ``desired``, ``state`` and ``status`` topics
of every device under a prefix, and changes desired documents by read-modify-write:
it publishes the new document (``generation`` + 1, retained, QoS 1) and then reads it
back; if another operator's write won the race (the retained document is not ours),
it reads again and retries. Operations follow Losant's edge deployments (release,
replace, remove, get) and Mender's deployment statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho

from agent.device.config import MqttConfig
from agent.device.mqtt import client as mqtt_client
from agent.errors import AgentError
from agent.wire.protocol import Status, is_valid_id

STATUSES = [s.value for s in Status]
Change = Callable[[str, dict[str, Any]], dict[str, Any] | None]
MAX_RETRIES = 10
#: Seconds to wait for the broker's PUBACKs of one batch of desired documents.
ACK_TIMEOUT = 30.0
#: Seconds to wait for our own documents to come back through the subscription.
ECHO_TIMEOUT = 10.0
#: What the tool changes in the agent's ``[mqtt]`` settings it connects with. Its
#: session ends with it: a persistent one would leave state on the broker for every
#: run (NATS: a JetStream consumer). And a release to a large fleet queues one desired
#: document per device at once, so paho's queue is not capped.
OPERATOR_SESSION = {"persistent_session": False, "max_queued": 0}


class FleetError(AgentError):
    """An operator command that cannot be carried out (one line, for the terminal)."""


@dataclass
class Device:
    device_id: str
    desired: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    status: dict[str, Any] | None = None

    @property
    def online(self) -> bool:
        return bool(self.status and self.status.get("online"))

    @property
    def generation(self) -> int:
        return int((self.desired or {}).get("generation", 0))


@dataclass(frozen=True)
class Artifact:
    url: str
    sha256: str
    size: int
    kind: str = "wasm"
    signature: dict[str, str] | None = None

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.url,
            "sha256": self.sha256,
            "size": self.size,
            "kind": self.kind,
        }
        if self.signature:
            out["signature"] = self.signature
        return out


@dataclass
class _Latest:
    messages: dict[str, bytes] = field(default_factory=dict)
    last_change: float = 0.0
    #: When a desired document last arrived (the read-modify-write waits on these only).
    last_desired: float = 0.0


class FleetClient:
    """One operator connection (paho's own network thread; the CLI is synchronous).

    The client is built, TLS included, by :mod:`agent.device.mqtt.client` from the
    same ``[mqtt]`` settings as the agent's (with :data:`OPERATOR_SESSION`).
    """

    def __init__(self, cfg: MqttConfig, client_id: str = "", *, connect: bool = True) -> None:
        self.cfg = cfg
        self.prefix = cfg.topic_prefix
        self._latest = _Latest()
        self._responses = {}
        self._watch: dict[str, list[bytes]] = {}
        self._cond = threading.Condition()
        self._session_cfg = cfg.model_copy(update=OPERATOR_SESSION)
        self.client = mqtt_client.build_client(
            self._session_cfg,
            client_id or f"edge-fleet-{int(time.time() * 1000) % 10**9}",
            reconnect_on_failure=True,  # paho's loop_start thread reconnects
        )
        if cfg.tls:
            try:
                mqtt_client.setup_tls(self.client, cfg)
            except OSError as exc:  # a CA or key file missing or not PEM (ssl.SSLError)
                raise FleetError(f"cannot set up TLS for {cfg.broker}: {exc}") from None
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._subacks: dict[int, list[Any]] = {}
        if connect:
            self.connect()

    # ------------------------------------------------------------ connection
    def connect(self) -> None:
        try:
            mqtt_client.connect(self.client, self._session_cfg)
        except OSError as exc:  # a TLS certificate that does not verify too
            raise FleetError(f"cannot connect to {self.cfg.broker}: {exc}") from None
        self.client.loop_start()
        try:
            for what in ("desired", "state", "status"):
                self.subscribe(f"{self.prefix}/+/{what}", timeout=10)
        except FleetError:
            self.close()
            raise

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, reasons: list[Any], _p: Any
    ) -> None:
        with self._cond:
            self._subacks[mid] = list(reasons)
            self._cond.notify_all()

    def subscribe(self, topic: str, timeout: float = 5.0) -> None:
        """Subscribe and wait for the broker's SUBACK; a refusal or no answer is a
        :class:`FleetError`.

        QoS 0: the tool reads retained messages and waits for answers with timeouts,
        so redelivery buys nothing, and a QoS 1 subscription costs a clustered broker
        durable state per run (NATS: a JetStream consumer, which cannot even be placed
        while a node of a three-node cluster is down)."""
        rc, mid = self.client.subscribe(topic, qos=0)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise FleetError(f"cannot subscribe to {topic}: {paho.error_string(rc)}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._subacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(
                        f"broker {self.cfg.broker} did not confirm the subscription to "
                        f"{topic} within {timeout:g} s"
                    )
                self._cond.wait(left)
            reasons = self._subacks.pop(mid)
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            raise FleetError(
                f"broker {self.cfg.broker} refused the subscription to {topic}: {refused[0]}"
            )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/command/response"):
            self._on_response(bytes(msg.payload))
            return
        with self._cond:
            if msg.topic in self._watch:
                self._watch[msg.topic].append(bytes(msg.payload))
            self._latest.messages[msg.topic] = bytes(msg.payload)
            self._latest.last_change = time.monotonic()
            if msg.topic.endswith("/desired"):
                self._latest.last_desired = self._latest.last_change
            self._cond.notify_all()

    def settle(self, quiet: float = 0.3, limit: float = 5.0, *, desired_only: bool = False) -> None:
        """Wait until the retained messages stopped arriving (quiet for ``quiet`` s);
        ``desired_only``: until no desired document arrived for that long."""
        start = time.monotonic()
        with self._cond:
            while time.monotonic() - start < limit:
                last = self._latest.last_desired if desired_only else self._latest.last_change
                since = time.monotonic() - max(last, start)
                if since >= quiet:
                    return
                self._cond.wait(quiet - since)

    # ------------------------------------------------------------ reading
    def _doc(self, topic: str) -> dict[str, Any] | None:
        raw = self._latest.messages.get(topic)
        if not raw:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def devices(self) -> dict[str, Device]:
        """Every device that has a desired, state or status topic (after settling)."""
        out: dict[str, Device] = {}
        with self._cond:
            topics = list(self._latest.messages)
        n = len(self.prefix.split("/"))
        for topic in topics:
            parts = topic.split("/")
            if len(parts) != n + 2 or parts[n + 1] not in ("desired", "state", "status"):
                continue
            dev = out.setdefault(parts[n], Device(parts[n]))
            setattr(dev, parts[n + 1], self._doc(topic))
        return dict(sorted(out.items()))

    # ------------------------------------------------------------ writing
    def update_desired(self, device_id: str, change: Change) -> int | None:
        """Read-modify-write one device's desired document (see :meth:`update_many`)."""
        return self.update_many([device_id], change)[device_id]

    def update_many(self, device_ids: Iterable[str], change: Change) -> dict[str, int | None]:
        """Read-modify-write the desired documents of many devices at once.

        ``change(device_id, doc)`` gets a copy of a device's current document and returns
        the new one (its ``generation`` is set here) or None for no change. All changed
        documents are published, then read back: a device whose retained document is
        not ours after the topic went quiet lost a race with another writer, and its
        change is applied again to the document that won. Returns each device's
        written generation (None: nothing to do).
        """
        pending = list(dict.fromkeys(device_ids))
        for device_id in pending:
            if not is_valid_id(device_id):
                raise FleetError(f"invalid device id {device_id!r}")
        written: dict[str, int | None] = {}
        for attempt in range(MAX_RETRIES):
            sent: dict[str, tuple[str, bytes, int]] = {}
            infos = []
            for device_id in pending:
                topic = f"{self.prefix}/{device_id}/desired"
                current = self._doc(topic) or {"generation": 0, "flows": {}}
                new = change(device_id, json.loads(json.dumps(current)))
                if new is None or _same(new, current):
                    # Nothing to change; after a lost race: the winner's document already
                    # holds our change (two writers must not bump generations forever).
                    written[device_id] = (
                        int(current.get("generation", 0)) if attempt and new else None
                    )
                    continue
                generation = int(current.get("generation", 0)) + 1
                new["generation"] = generation
                payload = json.dumps(new, sort_keys=True).encode()
                with self._cond:
                    self._watch[topic] = []  # every document that arrives from now on
                infos.append(self.client.publish(topic, payload, qos=1, retain=True))
                sent[device_id] = (topic, payload, generation)
            self._wait_acks(infos, ACK_TIMEOUT)
            self._wait_echo({topic: payload for topic, payload, _ in sent.values()})
            # A concurrent write may land just after ours: wait for desired documents to
            # stop arriving (the devices' state reports are not what we wait for).
            self.settle(quiet=0.2, limit=2.0, desired_only=True)
            pending = []
            for device_id, (topic, payload, generation) in sent.items():
                if self._latest.messages.get(topic) == payload:
                    written[device_id] = generation
                else:  # another writer's document is there now: apply ours to it
                    pending.append(device_id)
            if not pending:
                return written
        raise FleetError(
            f"{', '.join(pending[:5])}: desired document kept changing under us; "
            f"gave up after {MAX_RETRIES} attempts"
        )

    def _wait_acks(self, infos: list[paho.MQTTMessageInfo], timeout: float) -> None:
        """Wait for the broker's PUBACKs, all within one ``timeout``."""
        deadline = time.monotonic() + timeout
        for info in infos:
            left = deadline - time.monotonic()
            try:
                if left > 0:
                    info.wait_for_publish(left)
            except (RuntimeError, ValueError) as exc:  # paho: not connected / queue full
                raise FleetError(f"publishing to {self.cfg.broker} failed: {exc}") from None
            if not info.is_published():
                raise FleetError(
                    f"broker {self.cfg.broker} did not acknowledge the desired documents "
                    f"within {timeout:g} s; some may have been written (check with get)"
                )

    def _wait_echo(self, expected: dict[str, bytes], timeout: float = ECHO_TIMEOUT) -> None:
        """Wait until the broker sent each of our documents back (a competing document
        may already have replaced it: that is decided after the topic went quiet).
        Without the echo the write cannot be verified: that is an error, not a retry
        (a retry would bump a generation that may well have been written)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            try:
                while time.monotonic() < deadline:
                    missing = [t for t, p in expected.items() if p not in self._watch.get(t, ())]
                    if not missing:
                        return
                    self._cond.wait(0.05)
            finally:
                for topic in expected:
                    self._watch.pop(topic, None)
        raise FleetError(
            f"broker {self.cfg.broker} acknowledged but did not deliver back "
            f"{len(missing)} desired document(s) within {timeout:g} s (e.g. {missing[0]}); "
            "check with get before writing again"
        )

    def publish_artifact(self, data: bytes, limit: int) -> Artifact:
        """Publish a small artifact content-addressed and retained; an ``mqtt:`` URL."""
        if len(data) > limit:
            raise FleetError(
                f"artifact of {len(data)} bytes is over the {limit}-byte limit "
                "for MQTT delivery: serve it over HTTP(S) and pass its URL"
            )
        sha = hashlib.sha256(data).hexdigest()
        topic = f"{self.prefix}/artifacts/{sha}"
        self.client.publish(topic, data, qos=1, retain=True).wait_for_publish(30)
        return Artifact(f"mqtt:{topic}", sha, len(data))

    def command(
        self, device_ids: list[str], name: str, payload: Any = None, timeout: float = 10.0
    ) -> dict[str, dict[str, Any] | None]:
        """Send a device command (Losant's ``{name, payload, time}``) and collect each
        device's response (None: no response within ``timeout``)."""
        stamp = f"{int(time.time() * 1000)}"
        ids = {f"fleet-{stamp}-{i}": d for i, d in enumerate(device_ids)}
        with self._cond:
            self._responses = {}
        for device_id in dict.fromkeys(device_ids):
            self.subscribe(f"{self.prefix}/{device_id}/command/response")
        for request_id, device_id in ids.items():
            doc = {"name": name, "payload": payload, "time": int(stamp), "id": request_id}
            self.client.publish(
                f"{self.prefix}/{device_id}/command", json.dumps(doc).encode(), qos=1
            ).wait_for_publish(10)
        deadline = time.monotonic() + timeout
        with self._cond:
            while set(ids) - set(self._responses) and time.monotonic() < deadline:
                self._cond.wait(0.05)
            got = dict(self._responses)
        for device_id in dict.fromkeys(device_ids):
            self.client.unsubscribe(f"{self.prefix}/{device_id}/command/response")
        return {device_id: got.get(request_id) for request_id, device_id in ids.items()}

    _responses: dict[str, dict[str, Any]]

    def _on_response(self, raw: bytes) -> None:
        try:
            doc = json.loads(raw)
        except ValueError:
            return
        if isinstance(doc, dict) and isinstance(doc.get("id"), str):
            with self._cond:
                self._responses[doc["id"]] = doc
                self._cond.notify_all()

    def read_topic(self, topic: str, timeout: float = 3.0) -> dict[str, Any] | None:
        """Subscribe to one (retained) topic and return its JSON document."""
        self.subscribe(topic)
        deadline = time.monotonic() + timeout
        with self._cond:
            while topic not in self._latest.messages and time.monotonic() < deadline:
                self._cond.wait(0.05)
        self.client.unsubscribe(topic)
        return self._doc(topic)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two desired documents are the same apart from their generation."""
    return {k: v for k, v in a.items() if k != "generation"} == {
        k: v for k, v in b.items() if k != "generation"
    }


def load_artifact(client: FleetClient, source: str, limit: int, kind: str = "wasm") -> Artifact:
    """A local file (published over MQTT when small) or a URL (fetched to hash it)."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        import httpx

        try:
            data = httpx.get(source, timeout=30, follow_redirects=True).raise_for_status().content
        except httpx.HTTPError as exc:
            raise FleetError(f"cannot fetch {source}: {exc}") from None
        return Artifact(source, hashlib.sha256(data).hexdigest(), len(data), kind)
    path = Path(parts.path if parts.scheme == "file" else source)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}") from None
    if parts.scheme == "file":
        return Artifact(path.resolve().as_uri(), hashlib.sha256(data).hexdigest(), len(data), kind)
    artifact = client.publish_artifact(data, limit)
    return Artifact(artifact.url, artifact.sha256, artifact.size, kind)


def place(current: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """The flow's desired entry once ``entry`` is released over ``current``.

    A release for some device types (an entry with ``artifacts``) of the version
    the entry already has adds to it: the released types are taken out of the items
    that had them (an item left with no type goes), other types keep their artifact,
    and the entry keeps its ``deploymentId``, so devices of the other types see no
    change at all. An entry that named its types at the top (``deviceTypes`` with
    one ``artifact``) becomes an item for those types. Anything else replaces the
    entry."""
    items = entry.get("artifacts")
    if (
        not items
        or not isinstance(current, dict)
        or current.get("version") != entry.get("version")
        or current.get("abort")
    ):
        return entry
    released = {t for item in items for t in item.get("deviceTypes", ())}
    existing = [i for i in current.get("artifacts") or [] if isinstance(i, dict)]
    base = {k: v for k, v in current.items() if k not in ("artifact", "deviceTypes")}
    if current.get("deviceTypes") and isinstance(current.get("artifact"), dict):
        existing.append({"deviceTypes": current["deviceTypes"], **current["artifact"]})
    elif isinstance(current.get("artifact"), dict):
        base["artifact"] = current["artifact"]  # (serves every other type)
    kept = []
    for item in existing:
        types = [t for t in item.get("deviceTypes") or () if t not in released]
        if types:
            kept.append({**item, "deviceTypes": types})
    merged = {**base, **{k: v for k, v in entry.items() if k != "deploymentId"}}
    merged["artifacts"] = [*kept, *items]
    if "deploymentId" not in current and "deploymentId" in entry:
        merged["deploymentId"] = entry["deploymentId"]
    return merged


def flow_status(dev: Device, flow_id: str) -> str | None:
    """A flow's deployment status on a device, as of the device's desired document.

    Until the agent has reported on the desired generation (its state's ``generation``
    is older), a flow whose desired entry has a version is ``pending``, whatever the
    state says about an earlier deployment.
    """
    desired = ((dev.desired or {}).get("flows") or {}).get(flow_id) or {}
    state = dev.state or {}
    st = (state.get("flows") or {}).get(flow_id) or {}
    seen = int(state.get("generation") or 0) >= dev.generation
    if not seen:
        rejected = state.get("rejected") or {}
        if rejected.get("generation") == dev.generation:
            return "failure"  # the agent refused the whole document (see `get --json`)
        return "pending" if desired.get("version") else st.get("status")
    return st.get("status", "pending" if desired.get("version") else None)


def table_rows(devices: Iterable[Device]) -> list[dict[str, Any]]:
    """One row per device and flow: what ``fleet get`` shows (Losant's columns)."""
    rows = []
    for dev in devices:
        desired = (dev.desired or {}).get("flows") or {}
        state = (dev.state or {}).get("flows") or {}
        for flow_id in sorted(set(desired) | set(state)):
            d = desired.get(flow_id) or {}
            st = state.get(flow_id) or {}
            rows.append(
                {
                    "deviceId": dev.device_id,
                    "flowId": flow_id,
                    "desiredVersion": d.get("version") or None,
                    "currentVersion": st.get("currentVersion"),
                    "status": flow_status(dev, flow_id),
                    "health": (st.get("health") or {}).get("state"),
                    "reverted": bool(st.get("reverted")),
                    "deploymentId": d.get("deploymentId") or st.get("deploymentId"),
                    "attempts": st.get("attempts", 0),
                    "error": st.get("error"),
                    "lastUpdated": st.get("lastUpdated"),
                    "online": dev.online,
                }
            )
    return rows


# ---------------------------------------------------------------- phased rollouts
OK_STATUSES = frozenset({"success", "already-installed"})


def outcome(dev: Device, flow_id: str, *, health_gate: bool = True) -> str:
    """Where a device is with its deployment of ``flow_id``: ``ok``, ``failed``,
    ``skipped`` (noartifact: another device type) or ``waiting``. With
    ``health_gate``, a version still on probation (its health window) is not done
    yet: it may still fail and revert."""
    status = flow_status(dev, flow_id)
    st = ((dev.state or {}).get("flows") or {}).get(flow_id) or {}
    if status in OK_STATUSES:
        on_probation = (st.get("health") or {}).get("state") == "probation"
        return "waiting" if health_gate and on_probation else "ok"
    if status == "noartifact":
        return "skipped"
    if status == "aborted":
        return "failed"
    if status == "failure":
        seen = int((dev.state or {}).get("generation") or 0) >= dev.generation
        return "failed" if not seen or not st.get("retryAt") else "waiting"
    return "waiting"


def phase_sizes(phases: list[str], total: int) -> list[int]:
    """Cumulative device counts of phases given as ``10%`` or as device counts."""
    sizes = []
    for phase in phases:
        try:
            if phase.endswith("%"):
                pct = float(phase[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                size = max(1, math.ceil(total * pct / 100))
            else:
                size = int(phase)
                if size < 1:
                    raise ValueError
        except ValueError:
            raise FleetError(f"phase {phase!r}: expected a percentage (10%) or a count") from None
        sizes.append(min(size, total))
    if sizes != sorted(sizes):
        raise FleetError("phases are cumulative: each must cover at least the previous one")
    if not sizes or sizes[-1] != total:
        raise FleetError("the last phase must cover every device (100%)")
    return sorted(set(sizes))


def failure_limit(spec: str, total: int) -> int:
    """How many failed devices are tolerated: ``5%`` of the targets, or a count."""
    try:
        if spec.endswith("%"):
            return math.floor(total * float(spec[:-1]) / 100)
        return int(spec)
    except ValueError:
        raise FleetError(f"--max-failures {spec!r}: expected a percentage or a count") from None


@dataclass
class PhaseProgress:
    index: int
    devices: list[str]
    counts: dict[str, int]


@dataclass
class RolloutResult:
    phases_done: int
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    stopped: str | None = None  # "failures" or "timeout"


class Rollout:
    """A phased release (Mender's phases): each phase's devices must succeed before the
    next phase is released; more failures than tolerated stop the rollout, and with
    ``rollback`` the devices that failed get their previous desired entry back."""

    def __init__(
        self,
        client: FleetClient,
        flow_id: str,
        entry: dict[str, Any],
        targets: list[str],
        phases: list[int],
        *,
        max_failures: int,
        timeout: float,
        rollback: bool = False,
        on_progress: Callable[[PhaseProgress], None] = lambda _p: None,
        poll: float = 0.2,
        health_gate: bool = True,
    ) -> None:
        self.client = client
        self.flow_id = flow_id
        self.entry = entry
        self.targets = targets
        self.phases = phases
        self.max_failures = max_failures
        self.timeout = timeout
        self.rollback = rollback
        self.on_progress = on_progress
        self.poll = poll
        #: A phase is done when its devices are past their health window, not
        #: merely running the new version (which may still fail and revert).
        self.health_gate = health_gate
        self.previous: dict[str, dict[str, Any] | None] = {}
        #: The entry each device was given (``entry``, or merged into its own).
        self.placed: dict[str, dict[str, Any]] = {}

    def _release(self, device_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        flows = dict(doc.get("flows") or {})
        self.previous.setdefault(device_id, flows.get(self.flow_id))
        flows[self.flow_id] = self.placed[device_id] = place(flows.get(self.flow_id), self.entry)
        return {**doc, "flows": flows}

    def _classify(self, devices: list[str]) -> dict[str, list[str]]:
        known = self.client.devices()
        out: dict[str, list[str]] = {"ok": [], "failed": [], "skipped": [], "waiting": []}
        for device_id in devices:
            dev = known.get(device_id) or Device(device_id)
            out[outcome(dev, self.flow_id, health_gate=self.health_gate)].append(device_id)
        return out

    def wait(self, devices: list[str], index: int = 0) -> tuple[dict[str, list[str]], str | None]:
        """Poll until no device of ``devices`` is still waiting, more than ``max_failures``
        failed, or ``timeout`` passed. Returns the groups and why it stopped early."""
        deadline = time.monotonic() + self.timeout
        while True:
            groups = self._classify(devices)
            self.on_progress(
                PhaseProgress(index, list(devices), {k: len(v) for k, v in groups.items()})
            )
            if len(groups["failed"]) > self.max_failures:
                return groups, "failures"
            if not groups["waiting"]:
                return groups, None
            if time.monotonic() > deadline:
                return groups, "timeout"
            time.sleep(self.poll)

    def run(self) -> RolloutResult:
        result = RolloutResult(phases_done=0)
        released: list[str] = []
        for index, size in enumerate(self.phases):
            batch = self.targets[len(released) : size]
            self.client.update_many(batch, self._release)
            released.extend(batch)
            groups, result.stopped = self.wait(released, index)
            result.ok, result.failed = groups["ok"], groups["failed"]
            result.skipped, result.waiting = groups["skipped"], groups["waiting"]
            if result.stopped:
                break
            result.phases_done = index + 1
        result.not_started = self.targets[len(released) :]
        if result.stopped == "failures" and self.rollback:
            self.client.update_many(result.failed, self._restore)
            result.rolled_back = result.failed
        return result

    def _restore(self, device_id: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        flows = dict(doc.get("flows") or {})
        if flows.get(self.flow_id) != self.placed.get(device_id, self.entry):
            return None  # someone else changed it since: leave their change alone
        previous = self.previous.get(device_id)
        dep = f"{self.entry.get('deploymentId', self.flow_id)}-rollback"[:128]
        flows[self.flow_id] = (
            {**previous, "deploymentId": dep}
            if previous and previous.get("version")
            else {"version": "", "deploymentId": dep}
        )
        return {**doc, "flows": flows}
