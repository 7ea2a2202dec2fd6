"""Configuration: defaults, file, environment, flags, errors, masking, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from common import REPO

from agent.device.config import AgentConfig, env_overrides, load_config
from agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_are_safe_with_only_a_device_id(tmp_path: Path) -> None:
    cfg = AgentConfig.model_validate({"device_id": "dev1", "state_dir": str(tmp_path)})
    assert cfg.mqtt.broker == "mqtt://127.0.0.1:1883"
    assert cfg.mqtt.protocol == "5"
    assert cfg.mqtt.topic_prefix == "edge"
    assert cfg.client_id == "edge-agent-dev1"
    assert cfg.sandbox.memory_limit == 64 * 1024 * 1024
    assert cfg.mqtt.max_inflight <= 20


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'device_id = "from-file"\ndevice_type = "t-file"\n'
        '[mqtt]\nkeepalive = 11\nbroker = "mqtt://file:1"\n',
    )
    env = {
        "EDGE_AGENT_DEVICE_TYPE": "t-env",
        "EDGE_AGENT_MQTT__KEEPALIVE": "22",
        "EDGE_AGENT_MQTT__BROKER": "mqtt://env:2",
    }
    cfg = load_config(path, environ=env, overrides={"mqtt": {"broker": "mqtts://flag:3"}})
    assert cfg.device_id == "from-file"
    assert cfg.device_type == "t-env"
    assert cfg.mqtt.keepalive == 22
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == ("flag", 3, True)


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'device_id = "via-env-file"\n')
    cfg = load_config(None, environ={"EDGE_AGENT_CONFIG": str(path)})
    assert cfg.device_id == "via-env-file"


def test_env_json_values() -> None:
    assert env_overrides({"EDGE_AGENT_A__B": "[1, 2]", "OTHER": "x", "EDGE_AGENT_C": "{bad"}) == {
        "a": {"b": [1, 2]},
        "c": "{bad",
    }


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ('device_id = "a b"\n', {}, "device_id: 'a b' is not an id"),
        ('device_id = "d"\n[mqtt]\nkeepalive = "soon"\n', {}, "mqtt.keepalive"),
        ('device_id = "d"\n[mqtt]\nbroker = "http://x"\n', {}, "mqtt.broker"),
        ('device_id = "d"\n[mqtt]\nprotocol = "4"\n', {}, "mqtt.protocol"),
        ('device_id = "d"\n[sandbox]\nmemory_limit = 10\n', {}, "sandbox.memory_limit"),
        ('device_id = "d"\n[mqtt]\nkeepalve = 5\n', {}, "mqtt.keepalve: unknown option"),
        (
            'device_id = "d"\n',
            {"EDGE_AGENT_MQTT__PORT": "1"},
            "environment: mqtt.port: unknown option",
        ),
        ("device_id = \n", {}, "invalid TOML"),
    ],
)
def test_errors_name_source_key_and_problem(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    assert expected in str(info.value)
    if not str(info.value).startswith("environment"):
        assert str(path) in str(info.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_password_masked_and_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-from-file\nignored\n")
    mqtt = {"password": "hunter2", "password_file": str(secret)}
    cfg = AgentConfig.model_validate({"device_id": "d", "state_dir": str(tmp_path), "mqtt": mqtt})
    assert "hunter2" not in json.dumps(cfg.masked())
    assert cfg.masked()["mqtt"]["password"] == "********"
    assert cfg.mqtt.resolved_password() == "s3cret-from-file"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, env=env, check=False
    )


def test_check_config_cli_ok_and_masked(tmp_path: Path) -> None:
    path = write(
        tmp_path, f'device_id = "d1"\nstate_dir = "{tmp_path}"\n[mqtt]\npassword = "topsecret"\n'
    )
    res = run_cli("check-config", "--config", str(path), "--broker", "mqtt://b:1884")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["mqtt"]["broker"] == "mqtt://b:1884"
    assert "topsecret" not in res.stdout


def test_check_config_cli_error_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, 'device_id = "d1"\n[artifacts]\nmax_size = -5\n')
    res = run_cli("check-config", "--config", str(path))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0]
    assert "artifacts.max_size" in lines[0]


def test_example_config_is_valid() -> None:
    example = REPO / "config" / "agent.example.toml"
    cfg = load_config(example, environ={})
    assert cfg.device_id


def _keys(model: type, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    out: set[str] = set()
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_example_config_documents_every_option() -> None:
    example = (REPO / "config" / "agent.example.toml").read_text()
    section = ""
    seen: set[str] = set()
    for line in example.splitlines():
        stripped = line.lstrip("# ").strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1] + "."
        elif "=" in stripped and not stripped.startswith(("EDGE_AGENT", "Precedence")):
            seen.add(section + stripped.split("=")[0].strip())
    missing = _keys(AgentConfig) - seen
    assert not missing, f"options missing from config/agent.example.toml: {sorted(missing)}"


def test_configuration_doc_is_generated_from_the_model() -> None:
    from agent.device.configdoc import render

    doc = REPO / "docs" / "configuration.md"
    assert doc.read_text() == render(), (
        "docs/configuration.md is stale: run "
        "`python -m agent.device.configdoc > docs/configuration.md`"
    )


def test_losant_profile_flag_and_effective_mqtt(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    path = write(
        tmp_path,
        f'device_id = "gw1"\nstate_dir = "{tmp_path}"\n[losant]\n'
        f'access_key = "key-1"\naccess_secret_file = "{secret}"\n',
    )
    res = run_cli("check-config", "--config", str(path), "--profile", "losant")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["losant"]["enabled"] is True
    assert out["effective_mqtt"]["username"] == "key-1"
    assert out["effective_mqtt"]["password"] == "********"
    assert "s3cr3t" not in res.stdout
    cfg = load_config(path, environ={}, overrides={"losant": {"enabled": True}})
    mqtt = cfg.effective_mqtt()
    assert (mqtt.broker, mqtt.client_id, mqtt.username, mqtt.protocol) == (
        "mqtts://broker.losant.com:8883",
        "gw1",
        "key-1",
        "3.1.1",
    )
    assert mqtt.persistent_session is False
    assert mqtt.password is not None
    assert mqtt.password.get_secret_value() == "s3cr3t"
    assert load_config(path, environ={}).effective_mqtt() == load_config(path, environ={}).mqtt


def test_every_flag_of_every_subcommand_has_help() -> None:
    import argparse

    from agent.cli import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "edge-agent")
    assert missing == []


def test_cli_errors_without_tracebacks(tmp_path: Path) -> None:
    """A state dir that is a file is a config error (exit 2, one line); a reader that
    closes the pipe early (`| head`) gets no traceback."""
    import subprocess
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--device-id",
            "d1",
            "--state-dir",
            str(blocker / "sub"),
            "--broker",
            "mqtt://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"edge-agent: config error: state_dir: cannot use {blocker / 'sub'}: Not a directory"
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first write (like `| head -0`)
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err
    assert proc.returncode == 141


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'device_id = "a b"\n[mqtt]\nkeepalive = 1\nbogus = 3\n[sandbox]\nmemory_limit = 10\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{path}: device_id: 'a b' is not an id")
    assert lines[1] == "  and 3 more:"
    assert [line.split(": ")[1] for line in lines[2:]] == [
        "mqtt.keepalive",
        "mqtt.bogus",
        "sandbox.memory_limit",
    ]
