"""The agent's parts, built in one place from its settings, and re-set in one place.

:func:`assemble` builds every part from the configuration, the derived
:class:`~agent.device.settings.Settings` and the persisted state (the reconciler
recovers the records: each interrupted step maps to its resume point). :meth:`Parts.apply` hands
every part new settings on reload, and :meth:`Parts.live` reads back what they hold,
so a test can check that a reload reached every part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from agent.device._logging import configure_logging
from agent.device.artifacts import ArtifactStore, Fetcher
from agent.device.commands import CommandRouter
from agent.device.config import AgentConfig
from agent.device.deploy.local import LocalStore
from agent.device.deploy.reconciler import Reconciler
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.state import StateStore
from agent.device.dispatch import Dispatcher
from agent.device.losant import LosantProfile
from agent.device.mqtt import MqttSession, Will
from agent.device.outbox import Outbox
from agent.device.pacer import Pacer
from agent.device.ports import CommandPort
from agent.device.publisher import Publisher
from agent.device.reporter import Reporter, offline_status
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import FlowRunner
from agent.device.runtime.sandbox import Runtime
from agent.device.settings import Settings
from agent.wire.protocol import FlowRuntime
from agent.wire.signing import Trust
from agent.wire.topics import Topics

log = structlog.get_logger("agent.device.assembly")


@dataclass(eq=False)
class Parts:
    session: MqttSession
    pacer: Pacer | None
    publisher: Publisher
    fetcher: Fetcher
    outbox: Outbox
    reporter: Reporter
    host: FlowHost
    reconciler: Reconciler
    #: Installed flows started from the local store (at boot, and on command).
    local: LocalStore
    commands: CommandRouter
    dispatcher: Dispatcher

    async def apply(self, old: Settings, new: Settings) -> None:
        """Hand every part its new settings (a reload; start-up built them from the same)."""
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
        self.reconciler.health.defaults = new.health
        self.reconciler.updates = new.updates
        if new.command_slots != old.command_slots:
            self.dispatcher.set_command_slots(new.command_slots)
        if (new.mqtt, new.client_id) != (old.mqtt, old.client_id):
            log.info("MQTT settings changed; reconnecting", broker=new.mqtt.broker)
            await self.session.reconfigure(new.mqtt, new.client_id)

    def live(self, s: Settings) -> Settings:
        """The settings the parts hold now (``s`` for what no part holds by itself)."""
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
            health=self.reconciler.health.defaults,
            updates=self.reconciler.updates,
        )


def assemble(
    cfg: AgentConfig,
    s: Settings,
    runtime: Runtime,
    losant: LosantProfile | None,
    *,
    on_health: Callable[[FlowRunner], None],
) -> Parts:
    """Build the agent's parts from its configuration and persisted state."""
    topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
    state_store = StateStore(cfg.state_dir)
    state = state_store.load()
    records = FlowRecords(state)
    artifacts = ArtifactStore(cfg.state_dir / "artifacts")
    session = MqttSession(
        s.mqtt,
        s.client_id,
        # No last will on Losant's broker: it accepts only losant/{id}/... topics.
        will=None if losant else Will(topics.status, offline_status()),
    )
    pacer = Pacer(session.publish, s.pace) if losant else None
    fetcher = Fetcher(artifacts, s.fetch, mqtt_fetch=session.fetch_retained)
    outbox = Outbox(cfg.state_dir / "outbox.sqlite3", s.outbox)
    if outbox.count:
        log.info("outbox has messages from before the restart", queued=outbox.count)
    publisher = Publisher(session, outbox, pacer)
    reporter = Reporter(
        session,
        topics,
        state,
        device_type=cfg.device_type,
        runtime=runtime.description,
        coalesce_ms=round(s.state_coalesce_s * 1000),
        outbox=outbox,
        silent=losant is not None,
    )
    host = FlowHost(
        runtime,
        s.sandbox,
        cfg.device_id,
        flows_dir=cfg.state_dir / "flows",
        device_base=topics.base,
        supervision=s.supervision,
        publish=publisher.flow_message,
        subscribe=session.subscribe,
        unsubscribe=session.unsubscribe,
        on_health=on_health,
        eea_defaults=s.eea,
        losant_device_id=s.losant_device_id,
        protected=frozenset(losant.subscriptions() if losant else (topics.desired, topics.command)),
    )
    reconciler = Reconciler(
        cfg,
        state,
        state_store,
        host,
        artifacts,
        fetcher,
        reporter,
        records=records,
        trust=Trust.from_files(cfg.artifacts.trusted_keys, require=cfg.artifacts.require_signature),
    )
    local = reconciler.local
    reporter.runtime_info = lambda flow_id: _runtime_info(reconciler, host, flow_id)
    port = CommandPort(
        cfg.device_id,
        topics.command_response,
        host=host,
        reconciler=reconciler,
        local=local,
        outbox=outbox,
        reporter=reporter,
    )
    commands = CommandRouter(port, max_age_s=s.command_max_age_s, flow_timeout_s=s.flow_timeout_s)
    if losant is not None:
        reconciler.on_status = losant.on_status
    dispatcher = Dispatcher(
        session.messages,
        topics,
        reconciler=reconciler,
        commands=commands,
        host=host,
        losant=losant,
        command_slots=s.command_slots,
        on_own_status=None if losant else reporter.on_own_status,
    )
    return Parts(
        session=session,
        pacer=pacer,
        publisher=publisher,
        fetcher=fetcher,
        outbox=outbox,
        reporter=reporter,
        host=host,
        reconciler=reconciler,
        local=local,
        commands=commands,
        dispatcher=dispatcher,
    )


def _runtime_info(reconciler: Reconciler, host: FlowHost, flow_id: str) -> FlowRuntime | None:
    info = host.info(flow_id)
    if info is not None:
        return FlowRuntime.model_validate(info)
    rec = reconciler.state.flows.get(flow_id)
    if rec is not None and rec.installed is not None:
        return FlowRuntime(health="broken" if rec.broken else "stopped")
    return None
