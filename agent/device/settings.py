"""What the agent's parts are told by the configuration: derived once, in one place.

:func:`derive` turns an :class:`~agent.device.config.AgentConfig` into the settings
of every part (sandbox limits, download limits, supervision, outbox, pacing,
commands, state reports, EEA defaults, MQTT, logging). Start-up builds the parts
from it, and a reload (SIGHUP) derives again and hands every part its new settings
through :meth:`~agent.device.daemon.Agent.apply`: nothing is rebuilt by hand, so no
setting is forgotten.

What a reload cannot change (they name where the agent lives, or size what was
built at start-up) is :data:`NEEDS_RESTART`; a test checks that every other option
of the configuration model takes effect on reload.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.device.artifacts import FetchLimits
from agent.device.config import AgentConfig, LogConfig, MqttConfig
from agent.device.deploy.health import HealthDefaults
from agent.device.deploy.windows import MaintenanceWindow, UpdatePolicy
from agent.device.outbox import OutboxLimits
from agent.device.pacer import PaceLimits
from agent.device.runtime.eea_settings import EEADefaults
from agent.device.runtime.runner import Supervision
from agent.device.runtime.sandbox import Limits

#: Options a reload leaves as they were (logged as "needs a restart").
NEEDS_RESTART: frozenset[str] = frozenset(
    {
        "device_id",  # the topics, the client id and the state are the device's
        "state_dir",
        "losant.enabled",  # the profile decides what is subscribed and built
        "mqtt.topic_prefix",  # the topics every part was built with
        "sandbox.workers",  # the wasm worker threads of the shared runtime
        "sandbox.epoch_tick_ms",  # the engine's epoch ticker
    }
)


@dataclass(frozen=True)
class Settings:
    sandbox: Limits
    supervision: Supervision
    fetch: FetchLimits
    outbox: OutboxLimits
    pace: PaceLimits
    eea: EEADefaults
    losant_device_id: str | None
    command_max_age_s: float
    command_slots: int
    flow_timeout_s: float
    state_coalesce_s: float
    mqtt: MqttConfig
    client_id: str
    log: LogConfig
    health: HealthDefaults
    updates: UpdatePolicy


def health_defaults(cfg: AgentConfig) -> HealthDefaults:
    """``[health]`` of ``cfg``."""
    return HealthDefaults(window_s=cfg.health.window_s, revert=cfg.health.revert)


def update_policy(cfg: AgentConfig) -> UpdatePolicy:
    """``[updates]`` of ``cfg``."""
    u = cfg.updates
    text = u.maintenance_window
    window = MaintenanceWindow.parse(text, u.timezone) if text is not None else None
    return UpdatePolicy(window=window, max_defer_s=u.max_defer_s)


def derive(cfg: AgentConfig) -> Settings:
    """Every part's settings from ``cfg``."""
    sandbox, artifacts, losant = cfg.sandbox, cfg.artifacts, cfg.losant
    mqtt = cfg.effective_mqtt()
    return Settings(
        sandbox=Limits(
            memory_limit=sandbox.memory_limit,
            call_deadline_ms=sandbox.call_deadline_ms,
            epoch_tick_ms=sandbox.epoch_tick_ms,
            fuel_per_call=sandbox.fuel_per_call,
            max_sleep_ms=sandbox.max_sleep_ms,
        ),
        supervision=Supervision(
            max_failures=sandbox.max_failures,
            failure_window=sandbox.failure_window_s,
            backoff_initial=sandbox.restart_backoff_initial,
            backoff_max=sandbox.restart_backoff_max,
        ),
        fetch=FetchLimits(
            max_size=artifacts.max_size,
            connect_timeout=artifacts.connect_timeout,
            read_timeout=artifacts.read_timeout,
            stall_timeout=artifacts.stall_timeout,
            retries=artifacts.retries,
            backoff_initial=artifacts.backoff_initial,
            backoff_max=artifacts.backoff_max,
            min_free_bytes=artifacts.min_free_space,
        ),
        outbox=OutboxLimits(
            max_messages=cfg.outbox.max_messages,
            max_bytes=cfg.outbox.max_bytes,
            drain_rate=cfg.outbox.drain_rate,
            batch=min(20, cfg.mqtt.max_inflight),
        ),
        pace=PaceLimits(
            window_s=losant.window_s,
            per_topic=losant.per_topic,
            per_connection=losant.per_connection,
        ),
        eea=cfg.eea,
        losant_device_id=losant.device_id,
        command_max_age_s=cfg.commands.max_age_s,
        command_slots=cfg.commands.max_concurrent,
        flow_timeout_s=sandbox.call_deadline_ms / 1000 * 2 + 5,
        state_coalesce_s=cfg.reconcile.state_coalesce_ms / 1000,
        mqtt=mqtt,
        client_id=mqtt.client_id or cfg.client_id,
        log=cfg.log,
        health=health_defaults(cfg),
        updates=update_policy(cfg),
    )
