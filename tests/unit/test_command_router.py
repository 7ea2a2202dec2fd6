"""The command router against a fake device (its narrow CommandDevice interface):
no broker, no agent, no wasmtime."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from common import wait_until

from agent.device.commands import CommandRouter
from agent.device.deploy.state import FlowRecord, Installed
from agent.device.mqtt import Message
from agent.wire.protocol import Status


class FakeFlows:
    def __init__(self) -> None:
        self.running: dict[str, Any] = {"f1": object()}
        self.commands: list[tuple[str, bytes]] = []

    def info(self, flow_id: str) -> dict[str, Any] | None:
        return {"health": "running", "restarts": 1, "lastError": None} if flow_id == "f1" else None

    def command(self, name: str, payload: bytes, replies: dict[str, Any]) -> list[str]:
        self.commands.append((name, payload))
        return []

    def route(self, topic: str, payload: bytes) -> list[str]:
        return []

    def is_eea(self, flow_id: str) -> bool:
        return False

    def direct_trigger(self, flow_id: str, trigger_id: str, payload: bytes) -> bool:
        return False


class FakeDevice:
    device_id = "dev1"
    response_topic = "edge/dev1/command/response"

    def __init__(self) -> None:
        self.flows = FakeFlows()
        self.records: Mapping[str, FlowRecord] = {
            "f1": FlowRecord(
                status=Status.SUCCESS,
                desired_version="v1",
                installed=Installed(version="v1", sha256="a" * 64),
            )
        }
        self.sent: list[dict[str, Any]] = []
        self.reconciled = 0
        self.restart_delay = 0.0
        #: The artifact store: sha256 -> bytes.
        self.stored: dict[str, bytes] = {"a" * 64: bytes(range(256)) * 5}

    def send(self, topic: str, payload: bytes, *, correlation: bytes | None) -> None:
        self.sent.append({"topic": topic, "correlation": correlation, **json.loads(payload)})

    def publish_state_now(self) -> None:
        pass

    def reconcile(self) -> None:
        self.reconciled += 1

    async def artifact_range(self, sha256: str, offset: int, length: int) -> tuple[int, bytes]:
        from agent.errors import ArtifactError

        if sha256 not in self.stored:
            raise ArtifactError(f"artifact {sha256[:12]} is not in the store")
        data = self.stored[sha256]
        return len(data), data[offset : offset + length]

    async def restart_flow(self, flow_id: str) -> Any:
        await asyncio.sleep(self.restart_delay)
        return type("Runner", (), {"version": "v1", "health_info": lambda _s: {"health": "ok"}})()


def msg(
    doc: dict[str, Any] | bytes, correlation: bytes | None = None, reply_to: str | None = None
) -> Message:
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return Message(
        topic="edge/dev1/command",
        payload=payload,
        response_topic=reply_to if reply_to is not None else ("replies/x" if correlation else None),
        correlation_data=correlation,
    )


async def answer(router: CommandRouter, device: FakeDevice, doc: Any, **kw: Any) -> dict[str, Any]:
    await router.handle(msg(doc, **kw))
    return device.sent[-1]


def router_for(device: FakeDevice) -> CommandRouter:
    return CommandRouter(device, max_age_s=60, flow_timeout_s=1.0)


async def test_builtins_through_the_narrow_interface() -> None:
    device = FakeDevice()
    router = router_for(device)
    pong = await answer(router, device, {"name": "agent.ping", "id": 7})
    assert (pong["id"], pong["ok"], pong["result"]["pong"]) == (7, True, True)
    flows = await answer(router, device, {"name": "agent.flows", "id": "f"})
    assert flows["result"]["flows"][0]["currentVersion"] == "v1"
    assert flows["result"]["flows"][0]["restarts"] == 1
    await answer(router, device, {"name": "agent.reconcile"})
    assert device.reconciled == 1
    reply = await answer(router, device, {"name": "agent.logs", "payload": {"flowId": "nope"}})
    assert reply["ok"] is False


async def test_malformed_stale_unknown_and_the_mqtt5_reply_topic() -> None:
    device = FakeDevice()
    router = router_for(device)
    bad = await answer(router, device, b'{"name": "x", "time": NaN}')
    assert bad["error"].startswith("malformed command: ")
    old = int((time.time() - 120) * 1000)
    stale = await answer(router, device, {"name": "agent.ping", "time": {"$date": old}})
    assert stale["error"].startswith("stale: issued 120 s ago")
    unknown = await answer(router, device, {"name": "counter.get"})
    assert "no flow has a trigger for it" in unknown["error"]
    assert device.flows.commands == [("counter.get", b"null")]
    replied = await answer(router, device, {"name": "agent.ping"}, correlation=b"c-1")
    assert (replied["topic"], replied["correlation"]) == ("replies/x", b"c-1")


async def test_work_past_the_answer_bound_is_answered_once() -> None:
    device = FakeDevice()
    router = router_for(device)
    router.answer_within_s = 0.05
    device.restart_delay = 0.2
    reply = await answer(
        router, device, {"name": "agent.restart-flow", "payload": {"flowId": "f1"}}
    )
    assert reply["ok"] is False
    assert "no result within 0.05 s" in reply["error"]
    await wait_until(lambda: not router._unfinished, 5, "the restart to finish")
    assert len(device.sent) == 1


async def test_correlation_data_comes_back_without_a_response_topic() -> None:
    """An MQTT 5 request with correlation data but no response topic, that is not even
    JSON (so it has no id): the answer on command/response carries the correlation
    data, the only way to match it (found by bench/fuzz.py)."""
    device = FakeDevice()
    router = router_for(device)
    reply = await answer(
        router, device, b'{"name": "x", "payflow", "id": "r1"}', correlation=b"C-9", reply_to=""
    )
    assert reply["topic"] == "edge/dev1/command/response"
    assert reply["correlation"] == b"C-9"
    assert reply["id"] is None
    assert reply["error"].startswith("malformed command: ")


async def test_the_installed_artifact_comes_back_whole_or_a_range_at_a_time() -> None:
    import base64

    device = FakeDevice()
    router = router_for(device)
    whole = await answer(router, device, {"name": "agent.artifact", "payload": {"flowId": "f1"}})
    assert whole["ok"] is True, whole
    r = whole["result"]
    assert (r["version"], r["sha256"], r["size"], r["more"]) == ("v1", "a" * 64, 1280, False)
    assert base64.b64decode(r["data"]) == device.stored["a" * 64]

    got, offset = b"", 0
    while True:
        page = await answer(
            router,
            device,
            {
                "name": "agent.artifact",
                "payload": {"flowId": "f1", "offset": offset, "length": 500},
            },
        )
        chunk = base64.b64decode(page["result"]["data"])
        got, offset = got + chunk, offset + len(chunk)
        if not page["result"]["more"]:
            break
    assert got == device.stored["a" * 64]
    assert offset == 1280


async def test_artifact_command_errors() -> None:
    device = FakeDevice()
    router = router_for(device)
    cases = [
        ({"flowId": "ghost"}, "flow 'ghost' not found"),
        ({"flowId": "f1", "which": "previous"}, "has no previous version"),
        ({"flowId": "f1", "offset": 5000}, "past the artifact's 1280 bytes"),
        ({"flowId": "f1", "length": 0}, "bad payload: length"),
        ({"flowId": "f1", "which": "next"}, "bad payload: which"),
    ]
    for payload, error in cases:
        reply = await answer(router, device, {"name": "agent.artifact", "payload": payload})
        assert reply["ok"] is False
        assert error in reply["error"], (payload, reply["error"])
    device.stored = {}
    reply = await answer(router, device, {"name": "agent.artifact", "payload": {"flowId": "f1"}})
    assert "not in the store" in reply["error"]
