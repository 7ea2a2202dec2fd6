"""Everything one server process holds: settings, database, artifact store, broker
link, the desired writer and the inventory, and the threads that run them."""

from __future__ import annotations

import gc
import threading
import time

import structlog

from agent.server.artifact_store import ArtifactStore
from agent.server.broker_link import BrokerLink, BrokerUnavailable
from agent.server.config import ServerConfig
from agent.server.db import applications as apps_repo
from agent.server.db.engine import Database
from agent.server.service.artifact_sweep import sweep
from agent.server.service.desired import DesiredWriter
from agent.server.service.inventory import Inventory
from agent.server.service.rollout_engine import RolloutEngine
from agent.wire.topics import Topics

log = structlog.get_logger("agent.server")

#: Seconds between reloads of the application list (another process, or the admin
#: command, may have created one).
APPS_REFRESH_S = 5.0
#: Seconds between reads of every device's retained reports: what a server process
#: that died took with it (reports it had received and not recorded) is recorded
#: within this time by the others.
RESYNC_S = 300.0


class ServerContext:
    def __init__(self, cfg: ServerConfig, *, with_broker: bool = True) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(cfg.db_url)
        self.db.migrate()
        self.store = ArtifactStore(cfg.artifact_dir)
        self._prefixes: dict[str, str] = {}
        self._prefix_lock = threading.Lock()
        self._url_keys: dict[str, str] = {}
        self.engine = RolloutEngine(self)
        self.inventory = Inventory(
            self.db,
            self.app_for_prefix,
            on_retired=self.retire,
            on_lost=self.resync,
            on_applied=self.engine.kick,
        )
        instance = cfg.instance or f"{int(time.time() * 1000) % 10**9}"
        self.link = (
            BrokerLink(cfg.mqtt, f"edge-server-{instance}", self.inventory.offer)
            if with_broker
            else None
        )
        self.writer = DesiredWriter(self.db, self.link, self.store)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def retire(self, prefix: str, device_id: str) -> None:
        """Clear a decommissioned device's retained documents (desired, state, status)."""
        if self.link is None:
            return
        topics = Topics(prefix, device_id)
        try:
            self.link.publish_many(
                [(t, b"", True) for t in (topics.desired, topics.state, topics.status)]
            )
        except BrokerUnavailable as exc:
            log.warning("could not clear a decommissioned device's documents", error=str(exc))

    def resync(self) -> None:
        """Read the devices' retained reports again (see :meth:`BrokerLink.resync`)."""
        if self.link is not None:
            self.link.resync()

    def url_key(self, app_id: str) -> str | None:
        """The key that signs an application's artifact URLs (it never changes, so it
        is read from the database once per process: downloads do not touch it)."""
        key = self._url_keys.get(app_id)
        if key is None:
            with self.db.transaction() as s:
                app = apps_repo.get_application(s, app_id)
                key = app.url_key if app is not None else None
            if key is not None:
                self._url_keys[app_id] = key
        return key

    def app_for_prefix(self, prefix: str) -> str | None:
        with self._prefix_lock:
            return self._prefixes.get(prefix)

    def refresh_applications(self) -> None:
        with self.db.transaction() as s:
            found = {a.topic_prefix: a.id for a in apps_repo.all_applications(s)}
        with self._prefix_lock:
            self._prefixes = found
        if self.link is not None:
            for prefix in found:
                self.link.watch(prefix)

    def start(self) -> None:
        self.refresh_applications()
        if self.link is not None:
            self.link.start()
        for name, target in (
            ("inventory", lambda: self.inventory.run(self._stop)),
            ("publisher", lambda: self.writer.run_sweeper(self._stop, self.cfg.publish_retry_s)),
            ("applications", self._refresh_loop),
            ("rollouts", lambda: self.engine.run(self._stop)),
            *([("artifact-sweep", self._sweep_loop)] if self.cfg.sweep_interval_s > 0 else []),
        ):
            t = threading.Thread(target=target, name=f"server-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        # What start-up made (the modules of FastAPI, SQLAlchemy, pydantic: most of the
        # heap) lives as long as the process: out of the collector's way, so a full
        # collection walks what requests make, not the whole heap (bench/server.py: a
        # listing of 1,000 rows had a p99 of 110 ms, every 12th request paying a full
        # collection; 55 ms without them).
        gc.collect()
        gc.freeze()

    def _refresh_loop(self) -> None:
        last_resync = time.monotonic()
        while not self._stop.wait(APPS_REFRESH_S):
            try:
                self.refresh_applications()
            except Exception:  # the database away for a moment
                log.exception("could not reload the applications")
            if time.monotonic() - last_resync > RESYNC_S:
                last_resync = time.monotonic()
                self.resync()

    def _sweep_loop(self) -> None:
        """Remove unreferenced artifact bytes every ``sweep_interval_s`` (see
        :mod:`agent.server.service.artifact_sweep`; safe in several processes at once)."""
        while not self._stop.wait(self.cfg.sweep_interval_s):
            try:
                sweep(self.db, self.store, grace_s=self.cfg.sweep_grace_s)
            except Exception:  # the database or the disk away for a moment
                log.exception("artifact sweep failed")

    def stop(self) -> None:
        gc.unfreeze()  # (a test process starts and stops many)
        self._stop.set()
        self.inventory.close()
        self.writer.kick()
        self.engine.kick()
        for t in self._threads:
            t.join(timeout=5)
        if self.link is not None:
            self.link.stop()
        self.db.close()
