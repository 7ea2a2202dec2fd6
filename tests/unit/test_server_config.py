"""The server's settings and scopes (no I/O beyond a temp file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.server.config import load_server_config
from agent.server.db.engine import normalize_url
from agent.server.errors import ConfigError, Validation
from agent.server.scopes import accepted, validate_scopes


def test_toml_then_flags(tmp_path: Path) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(
        'db = "postgresql://edge@db/edge"\nlisten = "0.0.0.0:9000"\n'
        f'state_dir = "{tmp_path}"\n[mqtt]\nbroker = "mqtts://b:8883"\nprotocol = "3.1.1"\n'
    )
    cfg = load_server_config(conf, {"listen": "127.0.0.1:8081", "broker": None})
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8081)  # the flag wins
    assert cfg.mqtt.broker == "mqtts://b:8883"
    assert cfg.mqtt.protocol == "3.1.1"
    assert cfg.base_url == "http://127.0.0.1:8081"
    assert cfg.artifact_dir == tmp_path / "artifacts"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen = 8080", "listen"),
        ('listen = "nohost"', "HOST:PORT"),
        ("surprise = 1", "surprise"),
        ("db = [", "invalid TOML"),
    ],
)
def test_bad_settings_say_which(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_server_config(conf, {})


def test_database_urls() -> None:
    assert normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    with pytest.raises(ConfigError, match="unsupported database"):
        normalize_url("mysql://u@h/d")
    with pytest.raises(ConfigError, match="not a database URL"):
        normalize_url("::")


@pytest.mark.parametrize(
    ("scope", "resource", "action", "read", "ok"),
    [
        ("all.Application", "edgeDeployments", "release", False, True),
        ("all.Application.read", "edgeDeployments", "get", True, True),
        ("all.Application.read", "edgeDeployments", "release", False, False),
        ("all.Application.bounded", "devices", "post", False, True),
        ("edgeDeployments.*", "edgeDeployments", "replace", False, True),
        ("edgeDeployments.get", "edgeDeployments", "release", False, False),
        ("edgeDeployments.*", "embeddedDeployments", "get", True, False),
        ("edgeDeployment.get", "edgeDeployment", "get", True, True),
        ("all.Device", "devices", "sendCommand", False, True),
        ("all.Device.read", "devices", "get", True, True),
        ("all.Device", "devices", "export", True, False),
        ("devices.sendCommand", "device", "sendCommand", False, False),
    ],
)
def test_scopes_as_losant_lists_them(
    scope: str, resource: str, action: str, read: bool, ok: bool
) -> None:
    assert (scope in accepted(resource, action, read=read)) is ok


def test_unknown_scopes_are_refused() -> None:
    validate_scopes(["all.Application", "devices.get"])
    with pytest.raises(Validation, match="unknown scope"):
        validate_scopes(["all.Everything"])
    with pytest.raises(Validation, match="at least one"):
        validate_scopes([])


def test_the_artifact_sweep_settings(tmp_path: Path) -> None:
    cfg = load_server_config(None, {"state_dir": str(tmp_path)})
    assert (cfg.sweep_interval_s, cfg.sweep_grace_s) == (3600.0, 3600.0)
    conf = tmp_path / "server.toml"
    conf.write_text("sweep_interval_s = 0\nsweep_grace_s = 86400\n")
    cfg = load_server_config(conf, {})
    assert (cfg.sweep_interval_s, cfg.sweep_grace_s) == (0, 86400)  # 0: no sweep
    for text in (
        "sweep_interval_s = -1",
        "sweep_interval_s = 0.01",  # (0 or a minute at least: not a busy loop)
        "sweep_grace_s = -1",
        "sweep_grace_s = 0",  # (under 600 s an upload in progress could lose its bytes)
        "sweep_grace_s = 599",
        "sweep_grace_s = 1e9",
    ):
        conf.write_text(text)
        with pytest.raises(ConfigError, match=text.split()[0]):
            load_server_config(conf, {})
