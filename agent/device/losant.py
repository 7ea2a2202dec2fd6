"""The Losant MQTT profile: the agent as a Losant Embedded Edge Agent device.

On Losant's broker (MQTT 3.1.1, no retained messages, no persistent sessions,
256 KB messages, 30 messages / 15 s per topic and 300 per connection) the agent
speaks only Losant's topics:

- ``losant/{id}/toAgent/flows`` brings a bundle: raw WASM, or gzip-compressed.
  It is validated, stored content-addressed, and deployed as the EEA flow
  ``losant`` through the ordinary pipeline (an internal desired document): the
  old bundle runs until the new one has passed ``eea_init``, the new one is
  persisted and started again at boot.
- ``losant/{id}/command`` and ``losant/{id}/toAgent/virtualButton`` go to the bundle
  through ``eea_message_received``; what the bundle sends goes out as-is, paced.
- ``losant/{id}/fromAgent/hello`` announces the host after every connect and every
  bundle load.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import zlib
from typing import Any, Protocol

import structlog

from agent.device.artifacts import ArtifactStore
from agent.device.config import LosantConfig
from agent.device.runtime.eea import EEARunner
from agent.device.runtime.eea_identity import INTERFACE_VERSION, static_identity
from agent.device.runtime.runner import FlowRunner
from agent.errors import AgentError
from agent.wire._boundedjson import load as load_json
from agent.wire.protocol import Status
from agent.wire.timevalue import issued_at

log = structlog.get_logger("agent.device.losant")

FLOW_ID = "losant"
MAX_MESSAGE = 256 * 1024


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress gzip without ever holding more than ``limit`` bytes."""
    out = bytearray()
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        chunk = decomp.decompress(data, limit + 1)
        out += chunk
        while decomp.unconsumed_tail and len(out) <= limit:
            out += decomp.decompress(decomp.unconsumed_tail, limit + 1 - len(out))
    except zlib.error as exc:
        raise AgentError(f"bundle is not valid gzip: {exc}") from None
    if len(out) > limit:
        raise AgentError(f"bundle expands to more than {limit} bytes")
    return bytes(out)


class LosantDevice(Protocol):
    """What the Losant profile needs of the agent, and nothing more."""

    device_id: str

    @property
    def losant(self) -> LosantConfig:
        """The ``[losant]`` settings in force (they change on reload)."""

    @property
    def command_max_age_s(self) -> float: ...
    @property
    def artifacts(self) -> ArtifactStore: ...
    @property
    def applied_generation(self) -> int | None: ...
    def installed_version(self, flow_id: str) -> str | None: ...
    def running(self, flow_id: str) -> FlowRunner | None: ...
    async def validate_module(self, data: bytes) -> None: ...
    async def offer_desired(self, payload: bytes) -> bool: ...
    def publish(self, topic: str, payload: bytes, qos: int) -> None: ...


class LosantProfile:
    def __init__(self, device: LosantDevice) -> None:
        self.device = device
        device_id = device.device_id
        self.base = f"losant/{device_id}"
        self.flows_topic = f"{self.base}/toAgent/flows"
        self.hello_topic = f"{self.base}/fromAgent/hello"
        self.command_topic = f"{self.base}/command"
        self.bundles = 0
        self.stale_commands = 0

    def subscriptions(self) -> list[str]:
        return [f"{self.base}/toAgent/#", self.command_topic]

    def fresh_command(self, payload: bytes) -> bool:
        """Whether a Losant command may go to the bundle: one whose ``time`` (ISO-8601,
        epoch ms or ``{"$date": …}``) is older than ``commands.max_age_s`` is dropped,
        as in the edge profile. Anything the agent cannot read goes to the bundle as
        it is (the bundle judges its own input)."""
        try:
            doc = load_json(payload, what="command", max_bytes=MAX_MESSAGE)
            when = doc.get("time") if isinstance(doc, dict) else None
            age = time.time() - issued_at(when) if when is not None else 0.0
        except (AgentError, ValueError, OverflowError, OSError):
            return True
        max_age = self.device.command_max_age_s
        if age <= max_age:
            return True
        self.stale_commands += 1
        log.warning(
            "stale Losant command not delivered",
            age_s=round(age),
            max_age_s=max_age,
            name=str(doc.get("name"))[:80],
        )
        return False

    # ------------------------------------------------------------ bundles in
    async def on_bundle(self, payload: bytes) -> None:
        cfg = self.device.losant
        try:
            data = payload
            if data[:2] == b"\x1f\x8b":
                data = gunzip_bounded(data, cfg.max_bundle_bytes)
            if len(data) > cfg.max_bundle_bytes:
                raise AgentError(f"bundle of {len(data)} bytes is over {cfg.max_bundle_bytes}")
            await self.device.validate_module(data)
        except AgentError as exc:
            log.error("Losant bundle refused", error=str(exc), bytes=len(payload))
            return
        sha = hashlib.sha256(data).hexdigest()
        artifacts = self.device.artifacts
        await asyncio.to_thread(artifacts.put_bytes, data, sha)
        ident = static_identity(data).identifier
        doc = {
            "generation": (self.device.applied_generation or 0) + 1,
            "flows": {
                FLOW_ID: {
                    "version": ident or f"nullVersion-{sha[:12]}",
                    "artifact": {
                        "url": artifacts.path(sha).as_uri(),
                        "sha256": sha,
                        "size": len(data),
                        "kind": "eea",
                    },
                    "retries": 0,
                    "deploymentId": f"losant-{sha[:12]}",
                    "config": {"eea": {"traceLevel": cfg.trace_level}},
                    "triggers": [
                        {"type": "mqtt", "topic": f"{self.base}/command"},
                        {"type": "mqtt", "topic": f"{self.base}/toAgent/virtualButton"},
                    ],
                },
            },
        }
        self.bundles += 1
        log.info(
            "Losant bundle received",
            sha256=sha,
            bytes=len(data),
            bundle=ident or "nullVersion",
            gzip=payload[:2] == b"\x1f\x8b",
        )
        await self.device.offer_desired(json.dumps(doc).encode())

    def on_status(self, flow_id: str, status: Status) -> None:
        """Hello again once a bundle is loaded (and after a failed load: the old one runs)."""
        if flow_id == FLOW_ID and status in (
            Status.SUCCESS,
            Status.ALREADY_INSTALLED,
            Status.FAILURE,
        ):
            self.hello()

    # ------------------------------------------------------------ hello
    def current_bundle(self) -> str:
        """The running bundle's identifier (read from the bundle itself), or the
        version it was installed under (its identifier when it arrived), or
        ``nullVersion``: what Losant compares to decide whether to send a bundle."""
        runner = self.device.running(FLOW_ID)
        if isinstance(runner, EEARunner) and runner.eea.identity.identifier:
            return runner.eea.identity.identifier
        version = self.device.installed_version(FLOW_ID)
        if version is None or version.startswith("nullVersion"):
            return "nullVersion"
        return version

    def hello_payload(self) -> dict[str, Any]:
        return {
            "service": "embeddedWorkflowAgent",
            "version": INTERFACE_VERSION,
            "bundle": self.current_bundle(),
            "compilerOptions": {
                "exportMemory": False,  # both work; imported memory is the default
                "traceLevel": self.device.losant.trace_level,
                "gzip": True,
            },
        }

    def hello(self) -> None:
        payload = json.dumps(self.hello_payload()).encode()
        self.device.publish(self.hello_topic, payload, 1)
