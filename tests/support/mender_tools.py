"""Mender's own tools as test peers: ``mender-artifact`` (Debian package, 3.9) writes
the artifacts, and the seed's multipart upload posts them to the server's repository."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- crafted artifacts
# Edits of a real artifact, for the checks of bad input: each keeps everything else
# valid (checksums recomputed) unless the edit is the fault.


def tar_members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members of a plain tar, in order."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            fh = tar.extractfile(info)
            out.append((info, fh.read() if fh is not None else b""))
    return out


def pack(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A plain tar of ``members`` (TarInfo kept as given: links, devices, odd names)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for given, body in members:
            info = copy.copy(given)
            if info.isreg():
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            else:
                tar.addfile(info)
    return buf.getvalue()


def entry(
    name: str, body: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(body)
    info.mode = 0o600
    return info, body


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_manifest(
    members: list[tuple[tarfile.TarInfo, bytes]],
) -> list[tuple[tarfile.TarInfo, bytes]]:
    """``members`` with a manifest of their checksums (version, header, payload files)."""
    sums: dict[str, str] = {}
    for info, body in members:
        if info.name == "version" or info.name.startswith("header.tar"):
            sums[info.name] = _sha(body)
        elif info.name.startswith("data/") and info.isreg():
            stem = info.name.split(".tar")[0]
            raw = _decompress(info.name, body)
            for file_info, file_body in tar_members(raw):
                sums[f"{stem}/{file_info.name}"] = _sha(file_body)
    manifest = "".join(f"{sums[k]}  {k}\n" for k in sorted(sums)).encode()
    return [(i, manifest if i.name == "manifest" else b) for i, b in members]


def _decompress(name: str, body: bytes) -> bytes:
    if name.endswith(".gz"):
        return gzip.decompress(body)
    if name.endswith(".xz"):
        return lzma.decompress(body)
    return body


def edit_header(data: bytes, edit: Callable[[dict[str, bytes]], None]) -> bytes:
    """The artifact with its header's files edited by ``edit`` (name → bytes, in
    place) and the manifest's checksums recomputed."""
    members = tar_members(data)
    out = []
    for info, body in members:
        if info.name == "header.tar.gz":
            files = {i.name: b for i, b in tar_members(gzip.decompress(body))}
            edit(files)
            new = gzip.compress(pack([entry(n, b) for n, b in files.items()]), mtime=0)
            out.append((info, new))
        else:
            out.append((info, body))
    return pack(with_manifest(out))


def edit_json(data: bytes, member: str, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The artifact with one JSON file of its header edited."""

    def change(files: dict[str, bytes]) -> None:
        doc = json.loads(files[member])
        edit(doc)
        files[member] = json.dumps(doc).encode()

    return edit_header(data, change)


def edit_payload(
    data: bytes, files: list[tuple[tarfile.TarInfo, bytes]], name: str = "data/0000.tar.gz"
) -> bytes:
    """The artifact with ``files`` as its payload (under ``name``), manifest recomputed."""
    body = pack(files)
    body = gzip.compress(body, mtime=0) if name.endswith(".gz") else body
    out = [(i, b) for i, b in tar_members(data) if not i.name.startswith("data/")]
    out.append(entry(name, body))
    return pack(with_manifest(out))
