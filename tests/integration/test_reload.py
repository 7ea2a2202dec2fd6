"""A reload (SIGHUP) applies every option of the configuration, or says it cannot.

Start-up and reload share one builder (agent.device.settings.derive): after a
reload with one option changed, the parts hold exactly what start-up would have
given them, the reconciler reads the new configuration, and an option listed in
NEEDS_RESTART keeps its old value. The table below must name every option of the
model: a new option fails this test until it is reloadable or listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from common import MakeConfig, wait_until
from pydantic import BaseModel, SecretStr

from agent.device.config import AgentConfig
from agent.device.daemon import Agent, _option, _with_options
from agent.device.settings import NEEDS_RESTART, derive
from agent.wire.signing import generate


def leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaves(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def changed_values(tmp_path: Path, broker: Broker) -> dict[str, Any]:
    """A different valid value for every reloadable option."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    generate(tmp_path / "k.key", tmp_path / "k.pub")
    pem = tmp_path / "x.pem"
    pem.write_text("not used by a plain mqtt:// connection\n")
    return {
        "device_type": "gw-b",
        "mqtt.broker": f"mqtt://localhost:{broker.port}",
        "mqtt.client_id": "reloaded-client",
        "mqtt.username": "someone",
        "mqtt.password": SecretStr("pw"),
        "mqtt.password_file": secret,
        "mqtt.ca_file": pem,
        "mqtt.cert_file": pem,
        "mqtt.key_file": pem,
        "mqtt.protocol": "3.1.1",
        "mqtt.keepalive": 7,
        "mqtt.session_expiry": 60,
        "mqtt.reconnect_min": 0.07,
        "mqtt.reconnect_max": 0.7,
        "mqtt.connect_timeout": 4.0,
        "mqtt.max_inflight": 5,
        "mqtt.max_queued": 77,
        "mqtt.persistent_session": False,
        "artifacts.max_size": 1 << 20,
        "artifacts.connect_timeout": 3.0,
        "artifacts.read_timeout": 3.5,
        "artifacts.stall_timeout": 4.5,
        "artifacts.retries": 5,
        "artifacts.backoff_initial": 0.3,
        "artifacts.backoff_max": 3.0,
        "artifacts.min_free_space": 4096,
        "artifacts.trusted_keys": [tmp_path / "k.pub"],
        "artifacts.require_signature": True,
        "sandbox.memory_limit": 32 << 20,
        "sandbox.call_deadline_ms": 700,
        "sandbox.fuel_per_call": 12345,
        "sandbox.max_sleep_ms": 123,
        "sandbox.max_failures": 9,
        "sandbox.failure_window_s": 99.0,
        "sandbox.restart_backoff_initial": 0.9,
        "sandbox.restart_backoff_max": 9.0,
        "reconcile.retry_backoff_initial": 0.3,
        "reconcile.retry_backoff_max": 3.0,
        "reconcile.desired_max_bytes": 4096,
        "reconcile.state_coalesce_ms": 33,
        "reconcile.log_lines": 99,
        "health.window_s": 5.0,
        "health.revert": False,
        "updates.maintenance_window": "01:00-03:30",
        "updates.timezone": "Europe/Berlin",
        "updates.max_defer_s": 60.0,
        "outbox.max_messages": 99,
        "outbox.max_bytes": 99999,
        "outbox.drain_rate": 9.0,
        "losant.broker": "mqtts://losant.example:8883",
        "losant.access_key": "k",
        "losant.access_secret": SecretStr("s"),
        "losant.access_secret_file": secret,
        "losant.ca_file": pem,
        "losant.trace_level": 1,
        "losant.device_id": "a" * 24,
        "losant.max_bundle_bytes": 1 << 20,
        "losant.window_s": 5.0,
        "losant.per_topic": 3,
        "losant.per_connection": 33,
        "eea.queue_size": 4096,
        "eea.storage_size": 2048,
        "eea.topic_buffer": 128,
        "eea.payload_buffer": 2048,
        "eea.storage_interval_ms": 0,
        "eea.trace_level": 0,
        "eea.debug_enabled": False,
        "eea.loop_interval_ms": 25,
        "commands.max_age_s": 30.0,
        "commands.max_concurrent": 3,
        "log.level": "debug",
        "log.format": "json",
    }


def test_every_option_is_reloadable_or_needs_a_restart(tmp_path: Path, broker: Broker) -> None:
    table = set(changed_values(tmp_path, broker))
    assert table.isdisjoint(NEEDS_RESTART)
    assert table | NEEDS_RESTART == set(leaves(AgentConfig))


async def test_reload_applies_each_option(
    tmp_path: Path, broker: Broker, make_config: MakeConfig
) -> None:
    from agent.device._logging import configure_logging

    base = make_config()
    async with Agent(base) as agent:
        await wait_until(agent.session.connected.is_set, what="connected")
        try:
            for key, value in changed_values(tmp_path, broker).items():
                new = _with_options(AgentConfig.model_validate(base.model_dump()), {key: value})
                assert _option(new, key) == value
                await agent.reload(new)
                assert agent.cfg == new, key
                assert agent.reconciler.cfg is agent.cfg, key
                assert agent.live_settings() == derive(new), key
                assert agent.reporter.device_type == new.device_type
                await agent.reload(base)  # and back
                assert agent.live_settings() == derive(base), key
        finally:
            configure_logging("info")


@pytest.mark.parametrize("key", sorted(NEEDS_RESTART - {"state_dir", "device_id"}))
async def test_options_that_need_a_restart_keep_their_value(
    key: str, make_config: MakeConfig
) -> None:
    base = make_config()
    value: Any = {
        "losant.enabled": True,
        "mqtt.topic_prefix": "other",
        "sandbox.workers": 7,
        "sandbox.epoch_tick_ms": 3,
    }[key]
    async with Agent(base) as agent:
        await agent.reload(_with_options(base, {key: value}))
        assert _option(agent.cfg, key) == _option(base, key)
        assert agent.live_settings() == derive(base)
