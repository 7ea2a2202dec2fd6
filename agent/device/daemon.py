"""The agent daemon: wires state, sandbox, MQTT, reconciler and reporter together.

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

from agent.device._logging import configure_logging
from agent.device.artifacts import ArtifactStore, Fetcher
from agent.device.commands import CommandRouter
from agent.device.config import AgentConfig
from agent.device.local import LocalStore
from agent.device.losant import MAX_MESSAGE as MAX_LOSANT_MESSAGE
from agent.device.losant import LosantProfile
from agent.device.mqtt import Message, MqttSession, Will
from agent.device.outbox import Outbox
from agent.device.pacer import Pacer
from agent.device.ports import CommandPort, LosantPort
from agent.device.reconciler import Reconciler
from agent.device.records import FlowRecords
from agent.device.reporter import Reporter, offline_status
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner
from agent.device.runtime.sandbox import Limits, Runtime
from agent.device.sdnotify import Notifier
from agent.device.settings import NEEDS_RESTART, Settings, derive
from agent.device.state import StateStore
from agent.errors import AgentError
from agent.wire.protocol import FlowRuntime, utc_now_iso
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
        self.reconciler: Reconciler
        self.session: MqttSession
        self.host: FlowHost

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

    def _assemble(self) -> Fetcher:
        """Build the agent's parts from its configuration and persisted state."""
        cfg = self.cfg
        state_store = StateStore(cfg.state_dir)
        state = state_store.load()
        records = FlowRecords(state)
        for note in records.recover():
            log.info("recovered after restart", note=note)
        artifacts = ArtifactStore(cfg.state_dir / "artifacts")
        s = self.settings
        self.session = MqttSession(
            s.mqtt,
            s.client_id,
            # No last will on Losant's broker: it accepts only losant/{id}/... topics.
            will=None if self.losant else Will(self.topics.status, offline_status()),
        )
        self.pacer = Pacer(self.session.publish, s.pace) if self.losant else None
        fetcher = Fetcher(artifacts, s.fetch, mqtt_fetch=self.session.fetch_retained)
        self.fetcher = fetcher
        self.outbox = Outbox(cfg.state_dir / "outbox.sqlite3", s.outbox)
        if self.outbox.count:
            log.info("outbox has messages from before the restart", queued=self.outbox.count)
        reporter = Reporter(
            self.session,
            self.topics,
            state,
            device_type=cfg.device_type,
            runtime=self.runtime.description,
            coalesce_ms=round(s.state_coalesce_s * 1000),
            outbox=self.outbox,
            silent=self.losant is not None,
        )
        self.host = FlowHost(
            self.runtime,
            s.sandbox,
            cfg.device_id,
            flows_dir=cfg.state_dir / "flows",
            device_base=self.topics.base,
            supervision=s.supervision,
            publish=self._flow_publish,
            subscribe=self.session.subscribe,
            unsubscribe=self.session.unsubscribe,
            on_health=self._on_health,
            eea_defaults=s.eea,
            losant_device_id=s.losant_device_id,
            protected=frozenset(
                self.losant.subscriptions()
                if self.losant
                else (self.topics.desired, self.topics.command)
            ),
        )
        self.reconciler = Reconciler(
            cfg,
            state,
            state_store,
            self.host,
            artifacts,
            fetcher,
            reporter,
            records=records,
            trust=Trust.from_files(
                cfg.artifacts.trusted_keys, require=cfg.artifacts.require_signature
            ),
        )
        self.reporter = reporter
        #: Installed flows started from the local store (at boot, and on command).
        self.local = LocalStore(self.reconciler.records, self.host, artifacts)
        reporter.runtime_info = self._runtime_info
        self.commands = CommandRouter(
            CommandPort(self),
            max_age_s=s.command_max_age_s,
            flow_timeout_s=s.flow_timeout_s,
        )
        if self.losant is not None:
            self.reconciler.on_status = self.losant.on_status
        self._command_slots = asyncio.Semaphore(s.command_slots)
        self._command_tasks: set[asyncio.Task[None]] = set()
        return fetcher

    async def run(self) -> None:
        """Run until :meth:`stop`; raises :class:`AgentError` if start-up fails."""
        structlog.contextvars.bind_contextvars(device_id=self.cfg.device_id)
        fetcher = self._assemble()
        reporter = self.reporter
        cfg = self.cfg
        self.runtime.acquire()
        try:
            await self._start_installed()
            await self.reconciler.persist()
            self.session.add_on_connect(self._on_connect)
            self.session.add_on_disconnect(self._on_disconnect)
            if self.losant is not None:
                for topic in self.losant.subscriptions():
                    self.session.subscribe(topic, qos=1)
            else:
                self.session.subscribe(self.topics.desired, qos=1)
                self.session.subscribe(self.topics.command, qos=1)
            self.session.start()
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.reconciler.run_forever(), name="reconciler"),
                    tg.create_task(reporter.run(), name="reporter"),
                    tg.create_task(self._dispatch(), name="dispatcher"),
                    *(
                        [tg.create_task(self.pacer.run(), name="pacer")]
                        if self.pacer is not None
                        else []
                    ),
                    tg.create_task(
                        self.outbox.drain(
                            self.pacer.publish if self.pacer else self.session.publish,
                            self.session.connected,
                        ),
                        name="outbox",
                    ),
                ]
                self._reconciler_task = tasks[0]
                if self.notifier.watchdog_interval:
                    tasks.append(tg.create_task(self._watchdog(), name="watchdog"))
                self._ready.set()
                self.notifier.ready(self._status_line())
                log.info(
                    "agent started",
                    state_dir=str(cfg.state_dir),
                    broker=cfg.effective_mqtt().broker,
                    profile="losant" if self.losant else "edge",
                    flows=len(self.host.running),
                    runtime=self.runtime.description,
                )
                await self._stop.wait()
                log.info("agent stopping")
                self.notifier.stopping()
                for task in [*tasks[1:], *self._command_tasks]:
                    task.cancel()
                # Stage 1: the reconciler stops at a safe point.
                await self._stage("stop reconciler", self.reconciler.close(), STOP_RECONCILE_S)
                tasks[0].cancel()
        finally:
            # Stage 2: stop flows; stage 3: persist; stage 4: offline status; stage 5: MQTT.
            await self._stage("stop flows", self.host.close_all(), STOP_FLOWS_S)
            try:
                await self.reconciler.persist()
            except AgentError as exc:  # the file keeps the last state that was saved
                log.error("cannot save the state at shutdown", error=str(exc))
            if self.losant is None and self.session.connected.is_set():  # (no edge topics
                # on Losant: its broker disconnects a client that publishes retained)
                with contextlib.suppress(Exception):
                    fut = self.session.publish(
                        self.topics.status, offline_status(utc_now_iso()), retain=True
                    )
                    await self._stage("offline status", fut, STOP_OFFLINE_ACK_S)
            await self._stage("disconnect", self.session.stop(), STOP_MQTT_S)
            await fetcher.aclose()
            self.outbox.close()
            await self.runtime.release()
            log.info("agent stopped")

    async def _stage(self, name: str, aw: Any, timeout: float) -> None:
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
        if trust.policy != self.reconciler.trust.policy:
            self.reconciler.set_trust(trust)
        await self.apply(derive(cfg))
        self.reporter.device_type = cfg.device_type
        self.reconciler.trigger()  # e.g. a new device_type: re-judge deviceTypes
        log.info("configuration reloaded")
        self.notifier.ready(self._status_line())

    async def apply(self, new: Settings) -> None:
        """Hand every part its settings (a reload; start-up built them from the same)."""
        old, self.settings = self.settings, new
        configure_logging(new.log.level, new.log.format)
        self.host.limits = new.sandbox
        self.host.supervision = new.supervision
        self.host.eea_defaults = new.eea
        self.host.losant_device_id = new.losant_device_id
        self.fetcher.limits = new.fetch
        self.outbox.limits = new.outbox
        if self.pacer is not None:
            self.pacer.set_limits(new.pace)
        self.reporter.coalesce = new.state_coalesce_s
        self.commands.max_age_s = new.command_max_age_s
        self.commands.set_flow_timeout(new.flow_timeout_s)
        if new.command_slots != old.command_slots:
            self._command_slots = asyncio.Semaphore(new.command_slots)
        if (new.mqtt, new.client_id) != (old.mqtt, old.client_id):
            log.info("MQTT settings changed; reconnecting", broker=new.mqtt.broker)
            await self.session.reconfigure(new.mqtt, new.client_id)

    def live_settings(self) -> Settings:
        """The settings the parts hold now (what :meth:`apply` gave them)."""
        s = self.settings
        return Settings(
            sandbox=self.host.limits,
            supervision=self.host.supervision,
            fetch=self.fetcher.limits,
            outbox=self.outbox.limits,
            pace=self.pacer.limits if self.pacer is not None else s.pace,
            eea=self.host.eea_defaults,
            losant_device_id=self.host.losant_device_id,
            command_max_age_s=self.commands.max_age_s,
            command_slots=s.command_slots,
            flow_timeout_s=self.commands.flow_timeout_s,
            state_coalesce_s=self.reporter.coalesce,
            mqtt=self.session.cfg,
            client_id=self.session.client_id,
            log=s.log,
        )

    def _on_connect(self) -> None:
        self.reporter.on_connect()
        self.host.set_connected(True)
        self.notifier.status(self._status_line())
        if self.losant is not None:
            self.losant.hello()

    def pacer_publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish now, or paced in the Losant profile; never raises."""
        try:
            if self.pacer is not None:
                self.pacer.publish(topic, payload, qos=qos)
            else:
                self.session.publish(topic, payload, qos=qos)
        except (RuntimeError, ValueError) as exc:
            log.warning("message dropped", topic=topic, error=str(exc))

    def _on_disconnect(self) -> None:
        self.host.set_connected(False)
        self.notifier.status(self._status_line())

    def _runtime_info(self, flow_id: str) -> FlowRuntime | None:
        rec = self.reconciler.state.flows.get(flow_id)
        info = self.host.info(flow_id)
        if info is not None:
            return FlowRuntime.model_validate(info)
        if rec is not None and rec.installed is not None:
            return FlowRuntime(health="broken" if rec.broken else "stopped")
        return None

    def _flow_publish(self, topic: str, payload: bytes, qos: int) -> None:
        """A flow's message (already permission-checked), on the event loop: QoS 1 through
        the outbox (kept while offline), QoS 0 straight out (dropped while offline)."""
        if self.losant is not None and len(payload) > MAX_LOSANT_MESSAGE:
            log.warning(
                "message over Losant's 256 KB limit; dropped", topic=topic, bytes=len(payload)
            )
            return
        if qos:
            self.outbox.put(topic, payload)
            return
        self.pacer_publish(topic, payload, qos=0)

    def _on_health(self, runner: FlowRunner) -> None:
        if self.host.running.get(runner.flow_id) is runner and self.reconciler.records.set_broken(
            runner.flow_id, runner.broken
        ):
            self.reconciler.persist_soon()
        self.reporter.mark_dirty()

    def _spawn_command(self, msg: Message) -> None:
        """Handle a command in its own task (it may wait for flows), a bounded number
        at a time; every command gets exactly one response."""

        async def run() -> None:
            async with self._command_slots:
                await self.commands.handle(msg)

        task = asyncio.get_running_loop().create_task(run(), name="command")
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)

    async def _start_installed(self) -> None:
        await self.local.start_all()

    async def restart_flow(self, flow_id: str) -> FlowRunner:
        """Start the installed version afresh (clears ``broken``); for agent.restart-flow."""
        runner = await self.local.restart(flow_id)
        await self.reconciler.persist()
        self.reporter.mark_dirty()
        return runner

    async def _dispatch(self) -> None:
        while True:
            msg = await self.session.messages.get()
            try:
                if self.losant is not None and msg.topic == self.losant.flows_topic:
                    await self.losant.on_bundle(msg.payload)
                elif (
                    self.losant is not None
                    and msg.topic == self.losant.command_topic
                    and not self.losant.fresh_command(msg.payload)
                ):
                    pass  # stale: dropped (logged)
                elif self.losant is None and msg.topic == self.topics.desired:
                    await self.reconciler.offer_desired(msg.payload)
                elif self.losant is None and msg.topic == self.topics.command:
                    self._spawn_command(msg)
                elif not self.host.route(msg.topic, msg.payload):
                    log.debug("message on unhandled topic", topic=msg.topic)
            except AgentError as exc:
                log.error("message handling failed", topic=msg.topic, error=str(exc))
            except Exception:  # a bug on one message must not stop the agent
                log.exception("internal error handling a message", topic=msg.topic)


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
