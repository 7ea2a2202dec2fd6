"""Hostile input end to end: the five defects of the fuzz campaign as scenarios, each
against a real Mosquitto, a real HTTP artifact server and real wasmtime.

1. a poison desired document (lone surrogate, 900-deep config): no crash, and no
   crash loop after a restart with the same retained document;
2. flow ids ``.`` and ``..``: nothing outside a flow's own directory is touched;
3. secrets in artifact URLs: never in a log line, an event, the state or a
   deployment log;
4. malformed documents and commands: a clean rejection, never a traceback;
5. generations: a documented bound, and no lockout.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wat
from artifact_server import ArtifactServer
from broker import Broker, Operator
from common import MakeConfig, wait_until
from scenario import (
    COMMAND,
    DESIRED,
    RESPONSE,
    STATE,
    AgentProcess,
    ask,
    flow,
    flow_state,
    write_config,
)

from agent.device._logging import configure_logging
from agent.device.daemon import Agent
from agent.wire.protocol import MAX_GENERATION

pytestmark = pytest.mark.slow

SECRET = "S3CR3T-token"


@pytest.fixture
def op(operator: Operator) -> Operator:
    operator.subscribe("edge/dev1/#")
    return operator


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line of the in-process agent, as JSON lines (the real processor chain)."""
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    try:
        yield buf
    finally:
        configure_logging("info")


def no_tracebacks(text: str) -> None:
    assert "Traceback" not in text
    assert "internal error" not in text
    for line in text.splitlines():
        assert "exception" not in json.loads(line), line


def rejected_with(needle: str) -> Any:
    return lambda d: needle in ((d.get("rejected") or {}).get("reason") or "")


def poison_surrogate(server: ArtifactServer) -> bytes:
    entry = flow(server, "v1", wat.reactor("poison"), retries=1)
    body = json.dumps({"generation": 1, "flows": {"poison": {**entry, "config": {"k": "X"}}}})
    return body.replace('"X"', '"\\udfff"').encode()  # valid JSON, not Unicode text


# ------------------------------------------------------------------ 1. poison documents
async def test_poison_document_no_crash_no_crash_loop(
    tmp_path: Path, op: Operator, artifact_server: ArtifactServer, broker: Broker
) -> None:
    agent = AgentProcess(write_config(tmp_path, broker.url), tmp_path / "agent.log")
    agent.start()
    try:
        op.publish(DESIRED, poison_surrogate(artifact_server))
        await op.wait_for(STATE, rejected_with("lone UTF-16 surrogate"))
        deep: Any = "leaf"
        for _ in range(900):
            deep = {"d": deep}
        op.publish(
            DESIRED,
            {
                "generation": 2,
                "flows": {"deep": flow(artifact_server, "v1", wat.reactor("deep"), config=deep)},
            },
        )
        await op.wait_for(STATE, rejected_with("nested deeper than 32 levels"))
        op.publish(DESIRED, poison_surrogate(artifact_server))  # retained again
        await op.wait_for(STATE, lambda d: (d.get("rejected") or {}).get("generation") is None)
        assert agent.proc is not None
        assert agent.proc.poll() is None

        # Restart (Restart=on-failure would do the same): the retained poison document
        # comes back first, and is rejected again instead of crashing the agent again.
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
        op.latest.pop(STATE, None)
        agent.start()
        await op.wait_for(STATE, rejected_with("lone UTF-16 surrogate"))
        await op.wait_for("edge/dev1/status", lambda d: d["online"] is True)
        op.publish(
            DESIRED,
            {"generation": 3, "flows": {"good": flow(artifact_server, "v1", wat.reactor("good"))}},
        )
        state = await op.wait_for(STATE, flow_state("good", status="success"))
        assert "poison" not in state["flows"]
        assert agent.proc.poll() is None
    finally:
        agent.signal(signal.SIGTERM)
        code = agent.wait()
    assert code == 0
    text = agent.log_path.read_text()
    assert "Traceback" not in text
    assert "internal error" not in text


async def test_a_state_write_that_fails_anyway_is_a_flow_failure(
    op: Operator,
    artifact_server: ArtifactServer,
    running_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth: if serialising the state fails, the flow fails with the reason,
    the file keeps the last good state, and the agent goes on."""
    from agent.device.deploy import reconciler as reconciler_mod
    from agent.errors import StateError

    agent: Agent = await running_agent()
    real = reconciler_mod.serialise
    failing = {"on": False}

    def flaky(state: Any) -> bytes:
        if (
            failing["on"]
            and state.flows.get("f", None) is not None
            and state.flows["f"].installed is not None
        ):
            raise StateError("cannot serialise the state: injected")
        return real(state)

    monkeypatch.setattr(reconciler_mod, "serialise", flaky)
    failing["on"] = True
    op.publish(
        DESIRED,
        {"generation": 1, "flows": {"f": flow(artifact_server, "v1", wat.reactor("f"), retries=0)}},
    )
    await op.wait_messages(
        "edge/dev1/events",
        lambda docs: any(
            d["status"] == "failure" and "injected" in (d.get("error") or "") for d in docs
        ),
    )
    log = await op.wait_for("edge/dev1/deployments/f/log", lambda d: bool(d["messages"]))
    assert log["flowId"] == "f"
    # The version did start: the state reports what runs, and the agent goes on.
    await op.wait_for(STATE, flow_state("f", currentVersion="v1"))
    failing["on"] = False
    op.publish(
        DESIRED, {"generation": 2, "flows": {"f": flow(artifact_server, "v2", wat.reactor("f2"))}}
    )
    await op.wait_for(STATE, flow_state("f", status="success", currentVersion="v2"))
    assert agent.reconciler.state.flows["f"].installed is not None


async def test_no_work_starts_from_a_document_whose_intent_is_not_saved(
    op: Operator,
    artifact_server: ArtifactServer,
    running_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a desired document is being saved, the loop may wake (a retry timer, a
    finished run): it must not plan from the new document before its intent is on
    disk, nor at all if saving fails. (Found as a flaky disk-full test.)"""
    import time

    from agent.device.deploy.state import StateStore
    from agent.errors import StateError

    agent: Agent = await running_agent()
    op.publish(
        DESIRED, {"generation": 1, "flows": {"f1": flow(artifact_server, "v1", wat.reactor("v1"))}}
    )
    await op.wait_for(STATE, flow_state("f1", status="success"))

    writing: list[bytes] = []

    def slow_full(self: StateStore, data: bytes) -> None:
        writing.append(data)
        time.sleep(0.5)
        raise StateError(f"cannot write {self.path}: No space left on device")

    monkeypatch.setattr(StateStore, "save_bytes", slow_full)
    op.publish(
        DESIRED, {"generation": 2, "flows": {"f1": flow(artifact_server, "v2", wat.reactor("v2"))}}
    )
    await wait_until(lambda: any(b'"v2"' in d for d in writing), what="the intent being written")
    agent.reconciler.trigger()  # the loop wakes while the intent is being written
    state = await op.wait_for(STATE, rejected_with("No space left on device"))
    assert state["flows"]["f1"]["status"] == "success"
    monkeypatch.undo()
    await agent.reconciler.persist()
    assert not [
        e
        for e in map(json.loads, op.messages("edge/dev1/events"))
        if e.get("version") == "v2"  # not even pending: a refused document has no effect
    ]
    assert agent.host.running["f1"].version == "v1"


# ------------------------------------------------------------------ 2. "." and ".."
def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith((".", "state.json", "outbox.sqlite3"))
    }


async def test_dot_flow_ids_touch_nothing(
    tmp_path: Path,
    op: Operator,
    artifact_server: ArtifactServer,
    make_config: MakeConfig,
    running_agent: Any,
) -> None:
    cfg = make_config()
    agent: Agent = await running_agent(cfg)
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "good": flow(
                    artifact_server, "v1", wat.reactor("good"), permissions={"dataDir": True}
                )
            },
        },
    )
    await op.wait_for(STATE, flow_state("good", status="success"))
    state_dir = cfg.state_dir
    (state_dir / "flows" / "good" / "data" / "keep.txt").write_text("flow data")
    (state_dir / "SENTINEL").write_text("state dir")
    (tmp_path / "OUTSIDE").write_text("next to the state dir")
    before_state, before_outside = snapshot(state_dir), snapshot(tmp_path)
    assert (state_dir / "outbox.sqlite3").exists()

    for n, flow_id in enumerate(["..", ".", "...", "../x"], start=2):
        op.publish(
            DESIRED,
            {
                "generation": n,
                "flows": {
                    "good": flow(
                        artifact_server, "v1", wat.reactor("good"), permissions={"dataDir": True}
                    ),
                    flow_id: flow(
                        artifact_server, "v1", wat.reactor("dots"), permissions={"dataDir": True}
                    ),
                },
            },
        )
        await op.wait_for(STATE, rejected_with(f"flow id {flow_id!r} is not an id"))
        op.publish(DESIRED, {"generation": n, "flows": {flow_id: None}})  # "remove" it
        await op.wait_for(
            STATE,
            lambda d, f=flow_id: (
                f"flow id {f!r}" in ((d.get("rejected") or {}).get("reason") or "")
                and "good" in d["flows"]
            ),
        )

    op.publish(
        DESIRED,
        {
            "generation": 9,
            "flows": {
                "good": flow(
                    artifact_server, "v1", wat.reactor("good"), permissions={"dataDir": True}
                )
            },
        },
    )
    await op.wait_for(STATE, lambda d: d.get("generation") == 9 and d.get("rejected") is None)
    assert snapshot(state_dir) == before_state
    assert snapshot(tmp_path) == before_outside
    assert (state_dir / "outbox.sqlite3").exists()
    assert set(agent.host.running) == {"good"}


# ------------------------------------------------------------------ 3. secrets in URLs
async def test_secrets_in_artifact_urls_never_leave_the_agent(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, logs: io.StringIO
) -> None:
    await running_agent()
    data = wat.reactor("s")
    artifact_server.add("/ok.wasm", data)
    base = artifact_server.base_url.replace("http://", f"http://user:{SECRET}@")
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "ok": {
                    "version": "v1",
                    "deploymentId": "d-ok",
                    "artifact": {
                        "url": f"{base}/ok.wasm?token={SECRET}",
                        "sha256": wat.sha256(data),
                    },
                },
                "missing": {
                    "version": "v1",
                    "deploymentId": "d-missing",
                    "retries": 0,
                    "artifact": {
                        "url": f"{base}/missing.wasm?token={SECRET}#{SECRET}",
                        "sha256": wat.sha256(data),
                    },
                },
            },
        },
    )
    state = await op.wait_for(
        STATE,
        lambda d: (
            d["flows"].get("ok", {}).get("status") == "success"
            and d["flows"].get("missing", {}).get("status") == "failure"
        ),
    )
    assert "/missing.wasm?…" in state["flows"]["missing"]["error"]
    deployment_log = await op.wait_for(
        "edge/dev1/deployments/d-missing/log", lambda d: bool(d["messages"])
    )
    assert any("downloading" in m["message"] for m in deployment_log["messages"])
    reply = await ask(op, {"name": "agent.logs", "payload": {"flowId": "missing"}}, "r1")
    assert reply["ok"] is True

    # All four outputs: log lines, events, the state, the deployment log (and the
    # command response), none holds the secret.
    assert all(
        r.target.endswith(f"?token={SECRET}") for r in artifact_server.requests_for("/ok.wasm")
    )
    text = logs.getvalue()
    assert "downloading" in text
    assert SECRET not in text
    topics = {t for t, _ in op.history}
    assert {"edge/dev1/events", STATE, "edge/dev1/deployments/d-missing/log", RESPONSE} <= topics
    for topic, payload in op.history:
        if topic != DESIRED:  # the operator's own document
            assert SECRET.encode() not in payload, topic


# ------------------------------------------------------------------ 4. malformed input
async def test_malformed_documents_and_commands_get_clean_rejections(
    op: Operator, running_agent: Any, logs: io.StringIO
) -> None:
    await running_agent()
    for payload, needle in [
        (b"[" * 100_000, "nested deeper than 32 levels"),
        (
            b'{"generation": 1, "flows": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            "nested deeper than 32 levels",
        ),
        (b'{"generation": 1, "x": ' + b"7" * 5000 + b"}", "integer of 5000 digits"),
        (b'{"generation": 1, "x": ' + b"7" * 4301 + b"}", "integer of 4301 digits"),
        (b'{"generation": NaN}', "NaN is not JSON"),
        ('{"generation": 1}'.encode("utf-16"), "not UTF-8"),
    ]:
        op.publish(DESIRED, payload)
        await op.wait_for(STATE, rejected_with(needle))

    for payload, needle in [
        (
            b'{"id": "c0", "name": "agent.ping", "payload": ' + b"[" * 100_000 + b"}",
            "malformed command: command refused: nested deeper",
        ),
        (b'{"id": "c1", "name": "agent.ping", "time": NaN}', "NaN is not JSON"),
        (b'{"id": "c2", "name": "agent.ping", "time": Infinity}', "Infinity is not JSON"),
        (b'{"id": "c3", "name": "agent.ping", "time": -1e999}', "out of range"),
        (b'{"id": "c4", "name": "agent.ping", "id2": ' + b"1" * 5000 + b"}", "5000 digits"),
    ]:
        op.publish(COMMAND, payload, retain=False)
        # (a request that is not JSON has no id the agent could echo)
        found = await op.wait_messages(
            RESPONSE, lambda docs, n=needle: any(n in d.get("error", "") for d in docs)
        )
        reply = next(d for d in found if needle in d.get("error", ""))
        assert reply["ok"] is False
        assert reply["error"].startswith("malformed command: ")
    op.publish(COMMAND, '{"id": "u16", "name": "agent.ping"}'.encode("utf-16"), retain=False)
    await wait_until(
        lambda: any(b"not UTF-8" in p for t, p in op.history if t == RESPONSE),
        what="the UTF-16 command refused",
    )
    assert (await ask(op, {"name": "agent.ping"}, "alive"))["ok"] is True
    no_tracebacks(logs.getvalue())


# ------------------------------------------------------------------ 5. generations
async def test_generations_are_bounded_and_never_lock_the_device_out(
    op: Operator, artifact_server: ArtifactServer, make_config: MakeConfig, running_agent: Any
) -> None:
    cfg = make_config()
    async with Agent(cfg) as agent:
        await generations_refused_then_the_bound_applies(op, artifact_server, agent)
    # A state saved by an older agent that took a 4,300-digit generation: reset at
    # start, so the device takes the next document instead of refusing all forever.
    path = cfg.state_dir / "state.json"
    saved = json.loads(path.read_text())
    saved["generation"] = int("9" * 4200)
    saved["desired_raw"] = '{"generation": ' + "9" * 4200 + "}"
    saved["flows"][".."] = {"status": "success"}
    path.write_text(json.dumps(saved))
    op.publish(DESIRED, b"")  # clear the retained document: the next one is generation 1
    await running_agent(cfg)
    op.publish(
        DESIRED, {"generation": 1, "flows": {"g": flow(artifact_server, "v2", wat.reactor("g2"))}}
    )
    state = await op.wait_for(STATE, flow_state("g", status="success", currentVersion="v2"))
    assert state["generation"] == 1
    assert ".." not in state["flows"]


async def generations_refused_then_the_bound_applies(
    op: Operator, artifact_server: ArtifactServer, agent: Agent
) -> None:
    entry = flow(artifact_server, "v1", wat.reactor("g"))
    for literal, needle in [
        ("1" + "0" * 4299, "integer of 4300 digits"),
        ("1" + "0" * 4300, "integer of 4301 digits"),
        (str(MAX_GENERATION + 1), "less than or equal to"),
        ("-1", "greater than or equal to 0"),
    ]:
        op.publish(
            DESIRED,
            b'{"generation": '
            + literal.encode()
            + b', "flows": {"g": '
            + json.dumps(entry).encode()
            + b"}}",
        )
        await op.wait_for(STATE, rejected_with(needle))
        assert agent.reconciler.state.generation is None
    op.publish(DESIRED, {"generation": MAX_GENERATION, "flows": {"g": entry}})
    await op.wait_for(STATE, flow_state("g", status="success"))


async def test_an_mqtt_artifact_on_the_command_topic_steals_no_command(
    op: Operator, running_agent: Any
) -> None:
    """A desired entry whose artifact is `mqtt:` + the device's own command topic: the
    download waits on that topic, and a command published meanwhile is still
    handled (the fetch used to take it, and the command got no response)."""
    await running_agent()
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "thief": {
                    "version": "v1",
                    "retries": 0,
                    "artifact": {"url": f"mqtt:{COMMAND}", "sha256": "a" * 64},
                }
            },
        },
    )
    await op.wait_for(STATE, flow_state("thief", status="downloading"))
    reply = await ask(op, {"name": "agent.ping"}, "after-theft")
    assert reply["ok"] is True
    state = await op.wait_for(STATE, flow_state("thief", status="failure"))
    assert "mismatch" in state["flows"]["thief"]["error"]
