"""Workflow bundles: safe reading, building, inspecting, and running two modules as one flow."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import wat
from common import wait_until
from hosts import BASE, Host, deploy_bundle, recording_host

from agent.device.runtime.runner import Health, Supervision
from agent.wire.bundle import BundleError, BundleLimits, build_bundle, describe, read_bundle


def tar_gz(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def manifest(*modules: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"name": "b", "version": "1", "modules": list(modules), **extra}).encode()


SENSOR = wat.echo_flow()
ALARM = wat.reactor("alarm")  # a different module, so a different digest


def mod(name: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "file": f"{name}.wasm",
        "sha256": hashlib.sha256(data).hexdigest(),
        **extra,
    }


def good() -> bytes:
    return tar_gz(
        [file("manifest.json", manifest(mod("sensor", SENSOR))), file("sensor.wasm", SENSOR)]
    )


def test_a_valid_bundle_reads() -> None:
    bundle = read_bundle(good())
    assert bundle.manifest.name == "b"
    assert bundle.modules == {"sensor": SENSOR}


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([file("/etc/passwd", b"x")], "unsafe path"),
        ([file("../evil", b"x")], "unsafe path"),
        ([file("a/../../evil", b"x")], "unsafe path"),
        ([special("link", tarfile.SYMTYPE, "/etc/passwd")], "not a regular file"),
        ([special("hard", tarfile.LNKTYPE, "manifest.json")], "not a regular file"),
        ([special("dev", tarfile.CHRTYPE)], "not a regular file"),
        ([special("fifo", tarfile.FIFOTYPE)], "not a regular file"),
        ([file("sensor.wasm", SENSOR)], "no manifest"),
        ([file("manifest.json", b"{not json")], "invalid manifest.json"),
        ([file("manifest.json", manifest())], "modules"),
        ([file("manifest.json", manifest(mod("sensor", SENSOR)))], "is not in the bundle"),
        (
            [
                file("manifest.json", manifest(mod("sensor", b"other bytes"))),
                file("sensor.wasm", SENSOR),
            ],
            "sha256 mismatch",
        ),
        (
            [
                file("manifest.json", manifest({"name": "sensor", "file": "sensor.wasm"})),
                file("sensor.wasm", SENSOR),
            ],
            "no sha256",
        ),
        (
            [
                file("manifest.json", manifest(mod("sensor", SENSOR), mod("sensor", SENSOR))),
                file("sensor.wasm", SENSOR),
            ],
            "appears twice",
        ),
        (
            [
                file("manifest.json", manifest(mod("s", SENSOR, triggers=[{"type": "bogus"}]))),
                file("s.wasm", SENSOR),
            ],
            "triggers",
        ),
    ],
)
def test_unsafe_or_invalid_bundles_are_refused(entries: list[Any], needle: str) -> None:
    with pytest.raises(BundleError) as info:
        read_bundle(tar_gz(entries))
    assert needle in str(info.value)


def test_limits_file_count_size_ratio_and_not_gzip() -> None:
    many = [file(f"f{i}", b"x") for i in range(10)]
    with pytest.raises(BundleError, match="more than 5 entries"):
        read_bundle(tar_gz(many), BundleLimits(max_files=5))
    bomb = tar_gz([file("zeros", b"\0" * (8 * 1024 * 1024))])  # 8 MiB of zeros, ~8 KiB
    with pytest.raises(BundleError, match="more than 1048576 bytes"):
        read_bundle(bomb, BundleLimits(max_bytes=1024 * 1024))
    with pytest.raises(BundleError, match="compression ratio"):
        read_bundle(bomb)
    with pytest.raises(BundleError, match=r"not a valid \.tar\.gz"):
        read_bundle(b"\0asm not a bundle")


def test_build_is_reproducible_and_inspect_describes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "sensor.wasm").write_bytes(SENSOR)
    (src / "alarm.wasm").write_bytes(ALARM)
    (src / "manifest.toml").write_text(
        'name = "greenhouse"\nversion = "1.2.0"\n[config]\nunits = "C"\n'
        '[[modules]]\nname = "sensor"\nfile = "sensor.wasm"\n'
        'triggers = [{type = "interval", ms = 1000}]\n'
        '[[modules]]\nname = "alarm"\nfile = "alarm.wasm"\n[modules.config]\nunits = "F"\n'
    )
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    build_bundle(src, a)
    build_bundle(src, b)
    assert a.read_bytes() == b.read_bytes()
    info = describe(a.read_bytes())
    assert (info["name"], info["version"]) == ("greenhouse", "1.2.0")
    assert [(m["name"], m["bytes"], m["config"]["units"]) for m in info["modules"]] == [
        ("sensor", len(SENSOR), "C"),
        ("alarm", len(ALARM), "F"),
    ]
    assert info["modules"][0]["sha256"] == hashlib.sha256(SENSOR).hexdigest()


def test_cli_build_inspect_and_a_bad_bundle(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.wasm").write_bytes(SENSOR)
    (src / "manifest.json").write_text(
        json.dumps({"name": "x", "version": "2", "modules": [{"name": "m", "file": "m.wasm"}]})
    )
    out = tmp_path / "x.tar.gz"
    run = [sys.executable, "-m", "agent", "bundle"]
    res = subprocess.run(
        [*run, "build", str(src), "-o", str(out)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "1 module(s)" in res.stdout
    res = subprocess.run([*run, "inspect", str(out)], capture_output=True, text=True, check=False)
    assert json.loads(res.stdout)["modules"][0]["name"] == "m"
    (tmp_path / "bad.tar.gz").write_bytes(tar_gz([file("../x", b"")]))
    res = subprocess.run(
        [*run, "inspect", str(tmp_path / "bad.tar.gz")], capture_output=True, text=True, check=False
    )
    assert res.returncode == 1
    assert "unsafe path" in res.stderr


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Host]:
    sup = Supervision(max_failures=2, failure_window=60, backoff_initial=0.05)
    async with recording_host(tmp_path, sup) as rec:
        yield rec


async def test_two_modules_run_as_one_flow(h: Host) -> None:
    alarm = wat.echo_flow()  # same code, its own triggers
    data = tar_gz(
        [
            file(
                "manifest.json",
                manifest(
                    mod("sensor", SENSOR, triggers=[{"type": "interval", "ms": 30}]),
                    {
                        **mod("alarm", alarm),
                        "file": "alarm.wasm",
                        "triggers": [{"type": "command", "command": "alarm"}],
                    },
                ),
            ),
            file("sensor.wasm", SENSOR),
            file("alarm.wasm", alarm),
        ]
    )
    runner = await deploy_bundle(h, data)
    await wait_until(lambda: len(h.on(f"{BASE}/flows/gh/count")) >= 2, what="sensor ticks")
    assert h.host.command("alarm", b'"on"') == ["gh"]
    await wait_until(lambda: h.on(f"{BASE}/flows/gh/command"), what="alarm")
    assert h.on(f"{BASE}/flows/gh/command") == [b'alarm"on"']
    assert runner.health_info() == {"health": "running", "restarts": 0, "lastError": None}
    assert [p.spec.module for p in runner.parts] == ["sensor", "alarm"]
    # the modules' digests are kept by the compiled-module cache GC
    assert h.host.module_digests() == {
        hashlib.sha256(SENSOR).hexdigest(),
        hashlib.sha256(alarm).hexdigest(),
    }


async def test_a_broken_module_breaks_the_bundle(h: Host) -> None:
    bad = wat.edge_flow("unreachable")
    data = tar_gz(
        [
            file(
                "manifest.json",
                manifest(
                    mod("ok", SENSOR), mod("bad", bad, triggers=[{"type": "interval", "ms": 20}])
                ),
            ),
            file("ok.wasm", SENSOR),
            file("bad.wasm", bad),
        ]
    )
    runner = await deploy_bundle(h, data)
    await wait_until(lambda: runner.broken, 10, "broken")
    info = runner.health_info()
    assert info["health"] == Health.BROKEN.value
    assert info["lastError"].startswith("bad: ")


async def test_a_module_that_fails_to_start_fails_the_whole_bundle(h: Host) -> None:
    data = tar_gz(
        [
            file("manifest.json", manifest(mod("ok", SENSOR), mod("bad", wat.command(3)))),
            file("ok.wasm", SENSOR),
            file("bad.wasm", wat.command(3)),
        ]
    )
    with pytest.raises(Exception, match="exited with code 3"):
        await deploy_bundle(h, data)
    assert "gh" not in h.host.running
