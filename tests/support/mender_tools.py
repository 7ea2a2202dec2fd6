"""Mender's own tools as test peers: ``mender-artifact`` (Debian package, 3.9) writes
the artifacts, and the seed's multipart upload posts them to the server's repository."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx

ARTIFACTS_PATH = "/api/management/v1/deployments/artifacts"


def tool_env() -> dict[str, str]:
    """The environment Mender's tools run in: never through a proxy to loopback."""
    env = dict(os.environ)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def mender_artifact(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``mender-artifact`` with ``args``; a non-zero exit fails with its output."""
    proc = subprocess.run(
        ["mender-artifact", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tool_env(),
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"mender-artifact {' '.join(args)} exited {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def write_artifact(
    dir: Path,
    payload: bytes,
    *,
    name: str,
    device_types: list[str],
    software_name: str,
    software_version: str,
    type_: str = "wasm-flow",
    file_name: str = "flow.wasm",
    extra: tuple[str, ...] = (),
) -> Path:
    """Write ``payload`` as ``dir/<file_name>`` and wrap it in a Mender artifact v3 with
    the real ``mender-artifact write module-image``; returns the ``.mender`` path."""
    work = dir / f"{name}.src"
    work.mkdir(parents=True, exist_ok=True)
    payload_path = work / file_name
    payload_path.write_bytes(payload)
    out = dir / f"{name}.mender"
    args = ["write", "module-image", "-T", type_, "-n", name]
    for device_type in device_types:
        args += ["-t", device_type]
    args += ["-f", str(payload_path), "-o", str(out)]
    args += ["--software-name", software_name, "--software-version", software_version]
    mender_artifact(*args, *extra)
    shutil.rmtree(work, ignore_errors=True)
    return out


def upload_artifact(base_url: str, token: str, path: Path, description: str = "") -> httpx.Response:
    """Post a ``.mender`` file as the seed (and mender-cli) does: multipart ``size``,
    ``description``, then ``artifact`` last."""
    data = path.read_bytes()
    files: list[tuple[str, tuple[str | None, str | bytes] | tuple[str, bytes, str]]] = [
        ("size", (None, str(len(data)))),
        ("description", (None, description)),
        ("artifact", (path.name, data, "application/octet-stream")),
    ]
    with httpx.Client(base_url=base_url, timeout=30.0, trust_env=False) as client:
        return client.post(
            ARTIFACTS_PATH, files=files, headers={"Authorization": f"Bearer {token}"}
        )
