"""The writer of desired documents, and their publisher.

A change (release, remove, replace, decommission) runs in one database transaction:
each device's row is locked (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite takes the
database's write lock at ``BEGIN IMMEDIATE``), its document gets the new entries and
``generation`` + 1 (above whatever the device last reported, so a device that ran
documents of another writer accepts it), a deployment attempt is recorded per flow,
and the transaction commits. Only then is the document published (retained, QoS 1):
under the row lock again, so two server processes never publish one device's
documents out of order, and ``published_generation`` is set once the broker
acknowledged it. A document the broker did not take stays unpublished and the sweep
publishes it when the broker is back; a process killed between commit and publish
leaves the same state for another process's sweep.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select

from agent.server.artifact_store import ArtifactStore, artifact_url
from agent.server.broker_link import BrokerLink, BrokerUnavailable
from agent.server.db import deployments as deployments_repo
from agent.server.db import devices as devices_repo
from agent.server.db.deployments import NewAttempt
from agent.server.db.engine import Database
from agent.server.db.models import Application, Device, FlowVersion
from agent.server.errors import ServerError
from agent.wire.topics import Topics

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sqlalchemy.orm import Session

log = structlog.get_logger("agent.server.desired")

#: What a flow version's manifest may add to its desired entries.
MANIFEST_KEYS = ("triggers", "permissions", "config", "retries", "health")
PUBLISH_BATCH = 200
#: An entry given the attempt's id (the ``deploymentId`` the device reports back).
EntryFor = Callable[[str], dict[str, Any]]
#: Runs inside a change's transaction, after its attempts were recorded (by device id
#: and flow id): what must commit with the documents or not at all (a rollout's
#: devices get their attempt ids). Raising rolls the whole change back.
OnRecorded = Callable[["Session", dict[tuple[str, str], NewAttempt]], None]
#: Asked under a device's lock whether a planned (device, flow id) is still to be
#: written (a rollout's abort entry: only over the entry it aborts).
Keep = Callable[[Device, str], bool]


def version_entry(
    app: Application, base_url: str, fv: FlowVersion, mqtt_limit: int = 0
) -> EntryFor:
    """The desired entry of a flow version: artifact URLs signed for the application,
    or, for an artifact of at most ``mqtt_limit`` bytes, its retained MQTT topic
    (``mqtt:{prefix}/artifacts/{sha256}``, published by the writer before the
    documents that name it)."""

    key = _signing_key(app.signing_key) if app.signing_key else None

    def url(item: dict[str, Any]) -> str:
        if 0 < item["size"] <= mqtt_limit:
            return f"mqtt:{Topics(app.topic_prefix, '').artifact(item['sha256'])}"
        return artifact_url(base_url, app.url_key, app.id, item["sha256"])

    def ref(item: dict[str, Any]) -> dict[str, Any]:
        out = {
            "url": url(item),
            "sha256": item["sha256"],
            "size": item["size"],
            "kind": fv.kind,
        }
        if key is not None:
            from agent.wire.signing import sign

            out["signature"] = sign(key, item["sha256"]).model_dump(by_alias=True)
        return out

    def make(deployment_id: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"version": fv.version, "deploymentId": deployment_id}
        for name in MANIFEST_KEYS:
            if fv.manifest and name in fv.manifest:
                entry[name] = fv.manifest[name]
        typed = [a for a in fv.artifacts if a.get("deviceTypes")]
        untyped = [a for a in fv.artifacts if not a.get("deviceTypes")]
        if untyped:
            entry["artifact"] = ref(untyped[0])
        if typed:
            entry["artifacts"] = [{**ref(a), "deviceTypes": a["deviceTypes"]} for a in typed]
        return entry

    return make


def _signing_key(pem: str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ServerError("the application's signing key is not an ed25519 key")
    return key


def removal_entry(deployment_id: str) -> dict[str, Any]:
    return {"version": "", "deploymentId": deployment_id}


def _reported_generation(dev: Device) -> int:
    gen = (dev.state or {}).get("generation")
    return gen if isinstance(gen, int) and gen >= 0 else 0


class DesiredWriter:
    def __init__(
        self, db: Database, link: BrokerLink | None, store: ArtifactStore | None = None
    ) -> None:
        self.db = db
        self.link = link
        #: Where ``mqtt:`` artifacts are read from before they are published.
        self.store = store
        #: ``mqtt:`` artifact topics this process has published (retained) already.
        self._sent_artifacts: set[str] = set()
        self._kick = threading.Event()

    def change(
        self,
        app: Application,
        plan: dict[str, dict[str, tuple[str | None, EntryFor]]],
        kind: str,
        on_recorded: OnRecorded | None = None,
        keep: Keep | None = None,
    ) -> list[str]:
        """Apply ``plan`` (device id → flow id → (version or None, entry maker)) in one
        transaction; returns the devices whose document changed, then publishes them.
        ``on_recorded`` runs in that transaction (with an empty plan too), after the
        attempts were recorded (a decommissioned or unknown device gets none).
        ``keep`` (device row, flow id), asked under the device's lock: False leaves
        that flow out (no entry, no attempt), as if it had not been planned."""
        changed: list[str] = []
        with self.db.transaction() as s:
            # Every row locked first, in one order (see devices_repo.lock_order).
            devs = devices_repo.lock_many(s, app.id, list(plan))
            if keep is not None:
                plan = {
                    device_id: {f: v for f, v in flows.items() if keep(devs[device_id], f)}
                    if device_id in devs
                    else flows
                    for device_id, flows in plan.items()
                }
                plan = {device_id: flows for device_id, flows in plan.items() if flows}
            gens: dict[str, int] = {}
            releases: list[deployments_repo.Release] = []
            for device_id in sorted(plan):
                dev = devs.get(device_id)
                if dev is None or dev.decommissioned:
                    continue
                gen = max(dev.generation, _reported_generation(dev)) + 1
                gens[device_id] = gen
                releases += [
                    deployments_repo.Release(device_id, flow_id, version, gen)
                    for flow_id, (version, _make) in sorted(plan[device_id].items())
                ]
            attempts = deployments_repo.record_releases(s, app.id, kind, releases)
            for device_id, gen in gens.items():
                dev = devs[device_id]
                flows = dict((dev.desired or {}).get("flows") or {})
                for flow_id, (_version, make) in sorted(plan[device_id].items()):
                    flows[flow_id] = make(attempts[(device_id, flow_id)].id)
                dev.desired = {"generation": gen, "flows": flows}
                dev.generation = gen
                changed.append(device_id)
            if on_recorded is not None:
                on_recorded(s, attempts)
            deployments_repo.insert_attempts(s, attempts.values())
        self.publish(app, changed)
        return changed

    def clear(self, app: Application, device_id: str) -> None:
        """Decommission: every flow removed, then (once published) nothing retained."""
        with self.db.transaction() as s:
            dev = devices_repo.get(s, app.id, device_id, lock=True)
            if dev is None:
                return
            dev.decommissioned = True

    def kick(self) -> None:
        """Wake the sweeper now (a stop, or documents waiting for the broker)."""
        self._kick.set()

    # ------------------------------------------------------------------ publishing
    def publish(self, app: Application, device_ids: Iterable[str]) -> int:
        """Publish the unpublished documents of these devices; returns how many the
        broker took. A broker that is away leaves them to :meth:`sweep`."""
        ids = sorted(device_ids)
        done = 0
        for i in range(0, len(ids), PUBLISH_BATCH):
            try:
                done += self._publish_batch(app.id, app.topic_prefix, ids[i : i + PUBLISH_BATCH])
            except BrokerUnavailable as exc:
                log.warning("desired documents wait for the broker", error=str(exc))
                self._kick.set()
                break
        return done

    def _publish_batch(self, app_id: str, prefix: str, ids: list[str]) -> int:
        if self.link is None:
            raise BrokerUnavailable("no broker configured")
        with self.db.transaction() as s:
            stmt = (
                select(Device)
                .where(
                    Device.application_id == app_id,
                    Device.id.in_(ids),
                    Device.published_generation < Device.generation,
                )
                .order_by(devices_repo.lock_order(s))
                .with_for_update(skip_locked=True)
            )
            rows = list(s.scalars(stmt))
            if not rows:
                return 0
            # The artifacts a document names by topic go first, so a device that reads
            # the document finds its artifact retained.
            self._publish_artifacts(rows)
            self.link.publish_many(
                [(Topics(prefix, d.id).desired, _dump(d.desired), True) for d in rows]
            )
            for d in rows:
                d.published_generation = d.generation
            return len(rows)

    def _publish_artifacts(self, rows: list[Device]) -> None:
        assert self.link is not None
        topics = {
            ref["url"][len("mqtt:") :]: ref["sha256"]
            for d in rows
            for entry in ((d.desired or {}).get("flows") or {}).values()
            for ref in [entry.get("artifact") or {}, *(entry.get("artifacts") or [])]
            if str(ref.get("url", "")).startswith("mqtt:")
        }
        todo = sorted(t for t in topics if t not in self._sent_artifacts)
        if not todo:
            return
        if self.store is None:
            raise BrokerUnavailable("no artifact store to read mqtt: artifacts from")
        self.link.publish_many([(t, self.store.path(topics[t]).read_bytes(), True) for t in todo])
        self._sent_artifacts.update(todo)

    def sweep(self) -> int:
        """Publish whatever is still unpublished (any application); returns how many."""
        with self.db.transaction() as s:
            pending = s.execute(
                select(Device.application_id, Device.id)
                .where(Device.published_generation < Device.generation)
                .order_by(Device.application_id, Device.id)
                .limit(5000)
            ).all()
            apps = {a.id: a for a in s.scalars(select(Application))}
        by_app: dict[str, list[str]] = {}
        for app_id, device_id in pending:
            by_app.setdefault(app_id, []).append(device_id)
        return sum(self.publish(apps[a], ids) for a, ids in by_app.items() if a in apps)

    def run_sweeper(self, stop: threading.Event, interval: float) -> None:
        """The background loop: sweep every ``interval`` s, or at once when kicked."""
        while not stop.is_set():
            self._kick.wait(interval)
            self._kick.clear()
            if stop.is_set():
                return
            try:
                self.sweep()
            except Exception:  # a database outage must not end the loop
                log.exception("publishing sweep failed")
                stop.wait(interval)


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
