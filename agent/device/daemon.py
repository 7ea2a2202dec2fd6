"""The agent daemon: its lifecycle (start-up, reload, staged shutdown) over its parts.

The parts are built in one place (:func:`~agent.device.assembly.assemble`).
Start-up order matters for an operator whose device boots without a network:

1. load the persisted state and map interrupted steps to resume points;
2. start every installed flow from the local artifact store (no network needed);
3. start the MQTT session (it connects in the background, with backoff) and the
   reconciler, which resumes interrupted attempts from the persisted desired state.

Shutdown is staged: stop the reconciler at a safe point (an activation in progress
completes), stop flows, persist state, publish ``{"online": false}``, disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from agent.device.assembly import Parts, assemble
from agent.device.commands import CommandRouter
from agent.device.config import AgentConfig
from agent.device.deploy.local import LocalStore
from agent.device.deploy.reconciler import Reconciler
from agent.device.losant import LosantProfile
from agent.device.mqtt import MqttSession
from agent.device.outbox import Outbox
from agent.device.ports import LosantPort
from agent.device.reporter import Reporter, offline_status
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner
from agent.device.runtime.sandbox import Limits, Runtime
from agent.device.sdnotify import Notifier
from agent.device.settings import NEEDS_RESTART, Settings, derive
from agent.errors import AgentError
from agent.wire.protocol import utc_now_iso
from agent.wire.signing import Trust
from agent.wire.topics import Topics

log = structlog.get_logger("agent.device.daemon")

#: Seconds each shutdown stage may take; they sum well below systemd's TimeoutStopSec.
STOP_RECONCILE_S = 10.0
STOP_FLOWS_S = 5.0
STOP_OFFLINE_ACK_S = 2.0
STOP_MQTT_S = 3.0


def sandbox_limits(cfg: AgentConfig) -> Limits:
    """The sandbox limits ``cfg`` gives (for parts built outside an agent)."""
    return derive(cfg).sandbox


class Agent:
    """One device agent. ``async with Agent(cfg) as agent:`` runs it until the block ends.

    Several agents may share one :class:`Runtime` (fleet simulation); by default
    each agent creates its own.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        runtime: Runtime | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.cfg = cfg
        #: What every part is told by the configuration (see :mod:`.settings`).
        self.settings = derive(cfg)
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.runtime = runtime or Runtime(
            self.settings.sandbox,
            workers=cfg.sandbox.workers,
            cache_dir=cfg.state_dir / "cache" / "modules",
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.losant = LosantProfile(LosantPort(self)) if cfg.losant.enabled else None
        self.notifier = notifier or Notifier()
        self._reconciler_task: asyncio.Task[None] | None = None
        #: Built by :meth:`run` (from the persisted state, which it may not read earlier).
        self.parts: Parts

    # The parts an operator (and a test) most often looks at.
    @property
    def session(self) -> MqttSession:
        return self.parts.session

    @property
    def reconciler(self) -> Reconciler:
        return self.parts.reconciler

    @property
    def host(self) -> FlowHost:
        return self.parts.host

    @property
    def reporter(self) -> Reporter:
        return self.parts.reporter

    @property
    def outbox(self) -> Outbox:
        return self.parts.outbox

    @property
    def commands(self) -> CommandRouter:
        return self.parts.commands

    @property
    def local(self) -> LocalStore:
        return self.parts.local

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Agent:
        self._task = asyncio.create_task(self.run(), name=f"agent-{self.cfg.device_id}")
        ready = asyncio.ensure_future(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            ready.cancel()
            self._task.result()  # raises the start-up error
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._task is not None:
            await self._task

    @property
    def ready(self) -> asyncio.Event:
        """Set once flows from the local store run and the broker connection is being tried."""
        return self._ready

    def stop(self) -> None:
        self._stop.set()

    async def stopped(self) -> None:
        """Return when a stop was requested or the agent ended by itself."""
        assert self._task is not None
        waiter = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    async def run(self) -> None:
        """Run until :meth:`stop`; raises :class:`AgentError` if start-up fails."""
        structlog.contextvars.bind_contextvars(device_id=self.cfg.device_id)
        self.parts = p = assemble(
            self.cfg, self.settings, self.runtime, self.losant, on_health=self._on_health
        )
        self.runtime.acquire()
        try:
            await p.local.start_all()
            await p.reconciler.persist()
            p.session.add_on_connect(self._on_connect)
            p.session.add_on_disconnect(self._on_disconnect)
            # The birth message and the outbox wait until the broker serves the session
            # (answers its subscriptions): a retained message sent to a cluster still
            # failing over can be lost.
            p.session.add_on_established(p.reporter.on_connect)
            topics = (
                self.losant.subscriptions()
                if self.losant is not None
                # (its own status too: see Reporter.on_own_status)
                else [self.topics.desired, self.topics.command, self.topics.status]
            )
            for topic in topics:
                p.session.subscribe(topic, qos=1)
            p.session.start()
            async with asyncio.TaskGroup() as tg:
                self._reconciler_task = tg.create_task(
                    p.reconciler.run_forever(), name="reconciler"
                )
                await self._serve(tg)
                # Stage 1: the reconciler stops at a safe point.
                await _stage("stop reconciler", p.reconciler.close(), STOP_RECONCILE_S)
                self._reconciler_task.cancel()
        finally:
            await self._shut_down()

    async def _serve(self, tg: asyncio.TaskGroup) -> None:
        """Start the other tasks, say ready, and serve until a stop is asked for."""
        p = self.parts
        out = p.pacer.publish if p.pacer else p.session.publish
        tasks = [
            tg.create_task(p.reporter.run(), name="reporter"),
            tg.create_task(p.dispatcher.run(), name="dispatcher"),
            tg.create_task(p.outbox.drain(out, p.session.established), name="outbox"),
        ]
        if p.pacer is not None:
            tasks.append(tg.create_task(p.pacer.run(), name="pacer"))
        if self.notifier.watchdog_interval:
            tasks.append(tg.create_task(self._watchdog(), name="watchdog"))
        self._ready.set()
        self.notifier.ready(self._status_line())
        log.info(
            "agent started",
            state_dir=str(self.cfg.state_dir),
            broker=self.settings.mqtt.broker,
            profile="losant" if self.losant else "edge",
            flows=len(p.host.running),
            runtime=self.runtime.description,
        )
        await self._stop.wait()
        log.info("agent stopping")
        self.notifier.stopping()
        for task in tasks:
            task.cancel()
        p.dispatcher.cancel_commands()

    async def _shut_down(self) -> None:
        """Stage 2: stop flows; 3: persist; 4: offline status; 5: MQTT; then release."""
        p = self.parts
        await _stage("stop flows", p.host.close_all(), STOP_FLOWS_S)
        try:
            await p.reconciler.persist()
        except AgentError as exc:  # the file keeps the last state that was saved
            log.error("cannot save the state at shutdown", error=str(exc))
        p.reporter.stopping = True  # its own offline status is not to be answered
        if self.losant is None and p.session.connected.is_set():  # (no edge topics on
            # Losant: its broker disconnects a client that publishes retained)
            with contextlib.suppress(Exception):
                fut = p.session.publish(
                    self.topics.status, offline_status(utc_now_iso()), retain=True
                )
                await _stage("offline status", fut, STOP_OFFLINE_ACK_S)
        await _stage("disconnect", p.session.stop(), STOP_MQTT_S)
        await p.fetcher.aclose()
        p.outbox.close()
        await self.runtime.release()
        log.info("agent stopped")

    def _status_line(self) -> str:
        connected = self.session.connected.is_set()
        broker = self.settings.mqtt.broker  # (not effective_mqtt(): it reads a secret file)
        return (
            f"{'connected to' if connected else 'connecting to'} {broker}; "
            f"{len(self.host.running)} flow(s) running; outbox {self.outbox.count} queued"
        )

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog while the loop and the reconciler are healthy: this
        task not running (a blocked loop) or a dead reconciler stops the pings."""
        interval = self.notifier.watchdog_interval or 10.0
        while True:
            await asyncio.sleep(interval)
            task = self._reconciler_task
            if task is not None and not task.done():
                self.notifier.watchdog()
            else:
                log.error("reconciler is not running; withholding the watchdog ping")

    async def reload(self, cfg: AgentConfig, trust: Trust | None = None) -> None:
        """Apply a new configuration without stopping flows (SIGHUP). ``trust`` is the
        signature policy loaded from ``cfg`` (loaded here when not given). Options of
        :data:`~agent.device.settings.NEEDS_RESTART` keep their values (logged)."""
        if trust is None:
            trust = Trust.from_files(
                cfg.artifacts.trusted_keys, require=cfg.artifacts.require_signature
            )
        self.notifier.reloading()
        old = self.cfg
        kept = sorted(k for k in NEEDS_RESTART if _option(cfg, k) != _option(old, k))
        if kept:
            log.warning("these options change only with a restart", options=kept)
            cfg = _with_options(cfg, {k: _option(old, k) for k in kept})
        self.cfg = cfg
        self.reconciler.cfg = cfg
        await self.apply(derive(cfg))
        self.reporter.device_type = cfg.device_type
        if trust.policy != self.reconciler.trust.policy:
            await self.reconciler.set_trust(trust)  # (and reconsiders)
        else:
            await self.reconciler.reconsider()  # e.g. a new device_type: other artifacts
        log.info("configuration reloaded")
        self.notifier.ready(self._status_line())

    async def apply(self, new: Settings) -> None:
        """Hand every part its settings (a reload; start-up built them from the same)."""
        old, self.settings = self.settings, new
        await self.parts.apply(old, new)

    def live_settings(self) -> Settings:
        """The settings the parts hold now (what :meth:`apply` gave them)."""
        return self.parts.live(self.settings)

    def _on_connect(self) -> None:
        self.host.set_connected(True)
        self.notifier.status(self._status_line())
        if self.losant is not None:
            self.losant.hello()

    def _on_disconnect(self) -> None:
        self.host.set_connected(False)
        self.notifier.status(self._status_line())

    def _on_health(self, runner: FlowRunner) -> None:
        if self.host.running.get(runner.flow_id) is runner and self.reconciler.records.set_broken(
            runner.flow_id, runner.broken
        ):
            self.reconciler.persist_soon()
        self.reconciler.health.on_runner(runner)
        self.reporter.mark_dirty()


async def _stage(name: str, aw: Any, timeout: float) -> None:
    started = time.monotonic()
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.warning("shutdown stage timed out", stage=name, timeout_s=timeout)
    except AgentError as exc:
        log.warning("shutdown stage failed", stage=name, error=str(exc))
    else:
        log.debug(
            "shutdown stage done", stage=name, ms=round((time.monotonic() - started) * 1000, 1)
        )


def _option(cfg: AgentConfig, key: str) -> object:
    value: object = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _with_options(cfg: AgentConfig, values: dict[str, object]) -> AgentConfig:
    """``cfg`` with dotted options replaced (sections copied, never shared)."""
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if not section:
            cfg = cfg.model_copy(update={name: value})
        else:
            sub = getattr(cfg, section).model_copy(update={name: value})
            cfg = cfg.model_copy(update={section: sub})
    return cfg
