"""mqtts:// against a Mosquitto TLS listener with certificates generated here: the
agent, and the fleet tool, which builds its client from the same settings."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, free_port
from common import wait_until

from agent import cli
from agent.device.config import load_config
from agent.device.daemon import Agent

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is needed to generate test certificates"
)


def _ssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    for name in ("ca", "other-ca"):
        _ssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=edge-agent test {name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    _ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
        cwd=d,
    )
    return d


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Path) -> Any:
    port = free_port()
    b = Broker(
        tmp_path / "tls",
        extra_conf=(
            f"listener {port} 127.0.0.1\n"
            f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\n"
            f"keyfile {pki / 'server.key'}\n"
        ),
    )
    b.start()
    b.tls_url = f"mqtts://127.0.0.1:{port}"
    yield b
    b.stop()


async def test_mqtts_with_ca_file_connects(tls_broker: Any, pki: Path, make_config: Any) -> None:
    cfg = make_config(mqtt={"broker": tls_broker.tls_url, "ca_file": str(pki / "ca.pem")})
    async with Agent(cfg) as agent:
        await wait_until(agent.session.connected.is_set, what="TLS connection")


# paho drops (without closing) the socket of a failed TLS handshake; CPython's
# refcounting closes it at once (fd count measured flat over ~75 failed handshakes),
# but the finaliser emits a ResourceWarning that pytest would turn into an error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_mqtts_with_untrusted_server_is_a_clear_error(
    tls_broker: Any, pki: Path, make_config: Any
) -> None:
    cfg = make_config(mqtt={"broker": tls_broker.tls_url, "ca_file": str(pki / "other-ca.pem")})
    async with Agent(cfg) as agent:
        await wait_until(lambda: agent.session.last_error, what="a TLS error")
        assert "certificate verify failed" in (agent.session.last_error or "")
        assert not agent.session.connected.is_set()


async def _fleet(*argv: str) -> int:
    """``edge-agent fleet ARGV`` in-process, on a worker thread (it is synchronous)."""
    return await asyncio.to_thread(cli.main, ["fleet", *argv])


async def test_the_fleet_tool_uses_the_agents_tls_settings(
    tls_broker: Any, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One agent.toml: the agent connects with its [mqtt] section, and so does
    ``edge-agent fleet --config``; a command makes the round trip over TLS."""
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'device_id = "dev1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nbroker = "{tls_broker.tls_url}"\nca_file = "{pki / "ca.pem"}"\n'
        "reconnect_min = 0.05\nreconnect_max = 0.5\nkeepalive = 5\n"
    )
    async with Agent(load_config(conf)) as agent:
        await wait_until(agent.session.connected.is_set, what="TLS connection")
        capsys.readouterr()
        rc = await _fleet(
            "command", "--config", str(conf), "--device", "dev1", "--name", "agent.ping"
        )
        out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith('dev1: {"pong": true'), out


# paho drops the socket of a failed TLS handshake (see above).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_the_fleet_tool_refuses_an_untrusted_server_in_one_line(
    tls_broker: Any, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ca-file of another CA: the server's certificate does not verify, and the tool
    says so (exit 1, one line); a CA file that is not there is one line too."""
    url = tls_broker.tls_url
    capsys.readouterr()
    assert await _fleet("get", "--broker", url, "--ca-file", str(pki / "other-ca.pem")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"edge-agent fleet: cannot connect to {url}: "), err
    assert "certificate verify failed" in err
    assert err.count("\n") == 1
    assert await _fleet("get", "--broker", url, "--ca-file", str(pki / "missing.pem")) == 1
    err = capsys.readouterr().err
    assert err == (
        f"edge-agent fleet: cannot set up TLS for {url}: [Errno 2] No such file or directory\n"
    )
