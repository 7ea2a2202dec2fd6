"""The Losant profile against a fake device (its narrow LosantDevice interface)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import wat
from wat_eea import platform_bundle

from agent.device.artifacts import ArtifactStore
from agent.device.config import LosantConfig
from agent.device.losant import LosantProfile
from agent.device.runtime.runner import FlowRunner
from agent.errors import InvalidModule


class FakeLosantDevice:
    device_id = "dev1"
    command_max_age_s = 60.0

    def __init__(self, tmp_path: Path) -> None:
        self.losant = LosantConfig.model_validate({"max_bundle_bytes": 1 << 20})
        self.artifacts = ArtifactStore(tmp_path / "artifacts")
        self.applied_generation: int | None = 4
        self.version: str | None = None
        self.offered: list[dict[str, Any]] = []
        self.published: list[tuple[str, dict[str, Any]]] = []

    def installed_version(self, flow_id: str) -> str | None:
        return self.version

    def running(self, flow_id: str) -> FlowRunner | None:
        return None

    async def validate_module(self, data: bytes) -> None:
        import wasmtime

        try:
            wasmtime.Module.validate(wasmtime.Engine(), data)
        except wasmtime.WasmtimeError as exc:  # as the runtime translates it
            raise InvalidModule(str(exc).splitlines()[0]) from None

    async def offer_desired(self, payload: bytes) -> bool:
        self.offered.append(json.loads(payload))
        return True

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self.published.append((topic, json.loads(payload)))


async def test_a_bundle_becomes_a_desired_document_named_by_its_identity(
    tmp_path: Path,
) -> None:
    device = FakeLosantDevice(tmp_path)
    profile = LosantProfile(device)
    data = platform_bundle(identifier="1635302774192")
    await profile.on_bundle(gzip.compress(data))
    (doc,) = device.offered
    entry = doc["flows"]["losant"]
    assert doc["generation"] == 5
    assert entry["version"] == "1635302774192"
    assert entry["artifact"]["sha256"] == wat.sha256(data)
    assert device.artifacts.has(wat.sha256(data))
    await profile.on_bundle(b"\x1f\x8b not gzip")
    await profile.on_bundle(b"not wasm")
    assert len(device.offered) == 1  # refused, nothing offered


def test_hello_names_the_installed_bundle_or_null_version(tmp_path: Path) -> None:
    device = FakeLosantDevice(tmp_path)
    profile = LosantProfile(device)
    profile.hello()
    device.version = "nullVersion-0123456789ab"
    profile.hello()
    device.version = "bundle-7"
    profile.hello()
    assert [hello["bundle"] for _, hello in device.published] == [
        "nullVersion",
        "nullVersion",
        "bundle-7",
    ]
    assert device.published[0][0] == "losant/dev1/fromAgent/hello"


def test_stale_commands_in_every_time_form(tmp_path: Path) -> None:
    profile = LosantProfile(FakeLosantDevice(tmp_path))
    old_ms = int((time.time() - 120) * 1000)
    old_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))
    for when in (old_ms, old_iso, {"$date": old_iso}, {"$date": old_ms}):
        assert profile.fresh_command(json.dumps({"name": "x", "time": when}).encode()) is False
    assert profile.fresh_command(json.dumps({"name": "x", "time": time.time() * 1000}).encode())
    assert profile.fresh_command(b"not json")  # the bundle judges what it cannot read
    assert profile.stale_commands == 4
