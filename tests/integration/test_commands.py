"""Device commands end to end: every built-in, flows, errors, staleness, MQTT 5 replies."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import wat
from artifact_server import ArtifactServer
from broker import Operator
from common import wait_until
from scenario import COMMAND, DESIRED, RESPONSE, STATE, ask, flow, flow_state

from agent.device.daemon import Agent


@pytest.fixture
def op(operator: Operator) -> Operator:
    operator.subscribe("edge/dev1/#")
    operator.subscribe("losant/dev1/#")
    operator.subscribe("replies/#")
    return operator


@pytest.fixture
async def agent(op: Operator, artifact_server: ArtifactServer, make_config: Any) -> Any:
    cfg = make_config(
        sandbox={"call_deadline_ms": 1000, "restart_backoff_initial": 0.05, "max_failures": 3}
    )
    async with Agent(cfg) as a:
        op.publish(
            DESIRED,
            {
                "generation": 1,
                "flows": {
                    "echo": flow(
                        artifact_server,
                        "v1",
                        wat.echo_flow(),
                        triggers=[
                            {"type": "command", "command": "echo.say"},
                            {"type": "interval", "ms": 200},
                        ],
                    ),
                    "bad": flow(
                        artifact_server,
                        "v1",
                        wat.edge_flow(
                            "(if (i32.eq (local.get $kind) (i32.const 3)) (then unreachable))"
                        ),
                        triggers=[{"type": "command", "command": "bad.boom"}],
                    ),
                    "seven": flow(
                        artifact_server,
                        "v1",
                        wat.edge_flow("(return (i32.const 7))"),
                        triggers=[{"type": "command", "command": "seven.rc"}],
                    ),
                    "eea": flow(
                        artifact_server,
                        "b1",
                        wat.eea_bundle(),
                        config={"eea": {"loopIntervalMs": 20}},
                    ),
                },
            },
        )
        await op.wait_for(
            STATE,
            lambda d: (
                len(d["flows"]) == 4 and all(f["status"] == "success" for f in d["flows"].values())
            ),
        )
        yield a


async def test_ping_and_response_shape(op: Operator, agent: Agent) -> None:
    r = await ask(op, {"name": "agent.ping"}, "p1")
    assert r["ok"] is True
    assert r["name"] == "agent.ping"
    assert r["result"]["pong"] is True
    assert set(r) == {"id", "name", "ok", "result", "time"}


async def test_report_flows_logs_reconcile(op: Operator, agent: Agent) -> None:
    states = len(op.messages(STATE))
    assert (await ask(op, {"name": "agent.report"}, "r1"))["ok"]
    await wait_until(lambda: len(op.messages(STATE)) > states, what="a fresh state")

    flows = (await ask(op, {"name": "agent.flows"}, "f1"))["result"]["flows"]
    by_id = {f["flowId"]: f for f in flows}
    assert set(by_id) == {"echo", "bad", "eea", "seven"}
    assert by_id["echo"]["currentVersion"] == "v1"
    assert by_id["echo"]["health"] == "running"

    logs = await ask(op, {"name": "agent.logs", "payload": {"flowId": "echo", "lines": 3}}, "l1")
    assert logs["ok"] is True
    assert 1 <= len(logs["result"]["lines"]) <= 3
    assert all({"time", "level", "message"} <= set(line) for line in logs["result"]["lines"])

    assert (await ask(op, {"name": "agent.reconcile"}, "c1"))["result"] == {"triggered": True}


async def test_flow_command_success_and_trap(op: Operator, agent: Agent) -> None:
    ok = await ask(op, {"name": "echo.say", "payload": {"text": "hi"}}, "e1")
    assert ok["ok"] is True
    assert ok["result"]["flows"] == {"echo": {"ok": True, "rc": 0}}
    assert ok["result"]["eea"] == ["eea"]  # EEA bundles get every command, raw
    await wait_until(lambda: op.messages("edge/dev1/flows/echo/command"), what="the echo")
    assert op.messages("edge/dev1/flows/echo/command") == [b'echo.say{"text": "hi"}']

    trap = await ask(op, {"name": "bad.boom"}, "b1")
    assert trap["ok"] is False
    assert "unreachable" in trap["error"]
    assert trap["error"].startswith("command failed in flow(s) bad:")


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"name": "agent.nope"}, "unknown command 'agent.nope'"),
        ({"name": "agent.restart-flow", "payload": {}}, "bad payload: flowId"),
        ({"name": "agent.restart-flow", "payload": {"flowId": "ghost"}}, "not found"),
        ({"name": "agent.logs", "payload": {"flowId": "ghost"}}, "not found"),
        ({"name": "agent.logs", "payload": {"flowId": "echo", "lines": 0}}, "bad payload: lines"),
        (
            {"name": "agent.direct-trigger", "payload": {"flowId": "echo", "id": "x"}},
            "not an EEA bundle",
        ),
        ({"name": "x" * 256}, "malformed command: name"),
        ({"name": "agent.ping", "time": "yesterday"}, "bad time"),
    ],
)
async def test_errors_are_answered(
    op: Operator, agent: Agent, doc: dict[str, Any], needle: str
) -> None:
    r = await ask(op, doc, "err")
    assert r["ok"] is False
    assert needle in r["error"]


async def test_unknown_and_malformed_commands_still_get_one_answer(
    op: Operator, agent: Agent
) -> None:
    # "nothing.here" has no trigger anywhere, but EEA bundles take every command: so
    # ask an agent with no EEA bundle (removed here) for the unknown-command path.
    op.publish(DESIRED, {"generation": 2, "flows": {"eea": None}})
    await op.wait_for(STATE, flow_state("eea", status="removed"))
    r = await ask(op, {"name": "nothing.here"}, "u1")
    assert r == {
        **r,
        "ok": False,
        "error": "unknown command 'nothing.here': no flow has a trigger for it",
    }
    before = len(op.messages(RESPONSE))
    op.publish(COMMAND, b"{not json", retain=False)
    found = await op.wait_messages(RESPONSE, lambda d: len(d) > before)
    bad = found[-1]
    assert (bad["id"], bad["name"], bad["ok"]) == (None, None, False)
    assert bad["error"].startswith("malformed command")


async def test_stale_commands_are_refused(op: Operator, agent: Agent) -> None:
    old_ms = int((time.time() - 600) * 1000)
    stale = await ask(op, {"name": "agent.reconcile", "time": old_ms}, "s1")
    assert stale["ok"] is False
    assert "stale: issued 600 s ago" in stale["error"]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    assert "stale" in (await ask(op, {"name": "agent.ping", "time": iso}, "s2"))["error"]
    fresh = await ask(op, {"name": "agent.ping", "time": int(time.time() * 1000)}, "s3")
    assert fresh["ok"] is True


async def test_mqtt5_response_topic_and_correlation_data(op: Operator, agent: Agent) -> None:
    op.request(COMMAND, {"name": "agent.ping"}, "replies/op-1", b"corr-42")
    doc = await op.wait_for("replies/op-1", lambda d: d["name"] == "agent.ping")
    assert doc["ok"] is True
    assert op.correlation["replies/op-1"] == b"corr-42"
    assert not [
        d
        for d in map(json.loads, op.messages(RESPONSE))
        if d.get("name") == "agent.ping" and d.get("id") is None
    ]


async def test_restart_flow_clears_broken(
    op: Operator, artifact_server: ArtifactServer, agent: Agent
) -> None:
    op.publish(
        DESIRED,
        {
            "generation": 3,
            "flows": {
                "crash": flow(
                    artifact_server,
                    "v1",
                    wat.edge_flow("unreachable"),
                    triggers=[{"type": "interval", "ms": 30}],
                )
            },
        },
    )
    await op.wait_for(
        STATE,
        lambda d: ((d["flows"].get("crash") or {}).get("runtime") or {}).get("health") == "broken",
    )
    r = await ask(op, {"name": "agent.restart-flow", "payload": {"flowId": "crash"}}, "rs")
    assert r["ok"] is True
    assert r["result"]["flowId"] == "crash"
    assert agent.reconciler.state.flows["crash"].broken is False
    # it traps again and breaks again: supervision starts over after a restart
    await op.wait_for(STATE, lambda d: d["flows"]["crash"]["runtime"]["health"] == "broken")


async def test_direct_trigger_reaches_an_eea_bundle(op: Operator, agent: Agent) -> None:
    await wait_until(lambda: op.messages("losant/dev1/init"), what="the bundle's init")
    r = await ask(
        op,
        {
            "name": "agent.direct-trigger",
            "payload": {"flowId": "eea", "id": "wf-1", "payload": {"v": 1}},
        },
        "d1",
    )
    assert r["ok"] is True
    await wait_until(lambda: op.messages("losant/dev1/direct"), what="the direct trigger")
    assert op.messages("losant/dev1/direct") == [b'wf-1 {"v": 1}']


async def test_non_zero_result_is_an_error_and_the_flow_keeps_working(
    op: Operator, agent: Agent
) -> None:
    """A handler returning non-zero gives ok=false (it once ended the flow's event
    worker through a structlog keyword clash, so later commands got no answer)."""
    for i in range(3):
        r = await ask(op, {"name": "seven.rc"}, f"rc{i}")
        assert r["ok"] is False
        assert r["error"] == "command failed in flow(s) seven: edge_on_event returned 7"


async def test_times_as_digit_strings_and_naive_iso_are_read(op: Operator, agent: Agent) -> None:
    old_ms = str(int((time.time() - 900) * 1000))
    assert "stale" in (await ask(op, {"name": "agent.ping", "time": old_ms}, "t1"))["error"]
    naive = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 900))  # UTC, no Z
    assert "stale" in (await ask(op, {"name": "agent.ping", "time": naive}, "t2"))["error"]
    now = str(int(time.time() * 1000))
    assert (await ask(op, {"name": "agent.ping", "time": now}, "t3"))["ok"] is True


async def test_losant_extended_json_times(op: Operator, agent: Agent) -> None:
    """Losant sends `time` as {"$date": ISO-8601} or {"$date": epoch ms}."""
    old_iso = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 900))
    reply = await ask(op, {"name": "agent.ping", "time": {"$date": old_iso}}, "d1")
    assert reply["error"].startswith("stale: issued 90")  # 900 s, or 901 after rounding
    old_ms = int((time.time() - 900) * 1000)
    assert (
        "stale" in (await ask(op, {"name": "agent.ping", "time": {"$date": old_ms}}, "d2"))["error"]
    )
    fresh = {"$date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    assert (await ask(op, {"name": "agent.ping", "time": fresh}, "d3"))["ok"] is True
    bad = await ask(op, {"name": "agent.ping", "time": {"$when": 1}}, "d4")
    assert bad["ok"] is False
    assert 'expected ISO-8601, epoch ms or {"$date": ...}' in bad["error"]


async def test_a_flow_answers_a_command_with_edge_respond(
    op: Operator, artifact_server: ArtifactServer, agent: Agent
) -> None:
    """``edge.respond`` puts the handler's answer in the response: JSON as JSON. Outside
    a command it is refused (EDGE_ERR_INVALID), and over 64 KiB too large."""
    op.publish(
        DESIRED,
        {
            "generation": 2,
            "flows": {
                "answer": flow(
                    artifact_server,
                    "v1",
                    wat.edge_flow("(drop (call $respond (local.get $pp) (local.get $pl)))"),
                    triggers=[{"type": "command", "command": "answer.echo"}],
                ),
                "probe": flow(
                    artifact_server,
                    "v1",
                    wat.rc_flow(
                        "(call $respond (i32.const 0) (select (i32.const 70000) (i32.const 4)"
                        " (i32.eq (local.get $kind) (i32.const 3))))"
                    ),
                    triggers=[{"type": "startup"}, {"type": "command", "command": "probe.big"}],
                ),
            },
        },
    )
    await op.wait_for(
        STATE,
        lambda d: (
            d["generation"] == 2
            and all(
                f["status"] == "success" for f in d["flows"].values() if f.get("desiredVersion")
            )
        ),
    )
    r = await ask(op, {"name": "answer.echo", "payload": {"temp": 21.5, "ok": [1, 2]}}, "a1")
    assert r["ok"] is True
    assert r["result"]["flows"]["answer"] == {
        "ok": True,
        "rc": 0,
        "result": {"temp": 21.5, "ok": [1, 2]},
    }
    r = await ask(op, {"name": "answer.echo", "payload": "plain words"}, "a2")
    assert r["result"]["flows"]["answer"]["result"] == "plain words"

    # startup: not a command -> EDGE_ERR_INVALID (-8); a 70000-byte answer -> TOO_LARGE (-2)
    await wait_until(lambda: op.messages("edge/dev1/flows/probe/rc"), what="startup rc")
    assert int.from_bytes(op.messages("edge/dev1/flows/probe/rc")[0], "little", signed=True) == -8
    r = await ask(op, {"name": "probe.big"}, "p1")
    assert r["ok"] is True
    assert "result" not in r["result"]["flows"]["probe"]
    await wait_until(lambda: len(op.messages("edge/dev1/flows/probe/rc")) == 2, what="rc 2")
    assert int.from_bytes(op.messages("edge/dev1/flows/probe/rc")[1], "little", signed=True) == -2


async def test_a_command_whose_work_runs_long_is_still_answered(
    op: Operator, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly one response, always: work that outlasts the answer bound (a restart
    behind a spinning flow's deadline; a delay injected here) is answered ok: false,
    and goes on to completion (found by bench/fuzz.py: a restart-flow unanswered)."""
    import asyncio

    import structlog

    agent.commands.answer_within_s = 0.3
    real = agent.local.restart

    async def slow(flow_id: str) -> Any:
        await asyncio.sleep(1.0)
        return await real(flow_id)

    monkeypatch.setattr(agent.local, "restart", slow)
    with structlog.testing.capture_logs() as logs:
        reply = await ask(
            op, {"name": "agent.restart-flow", "payload": {"flowId": "echo"}}, "slow-1"
        )
        assert reply["ok"] is False
        assert "no result within 0.3 s; the command goes on" in reply["error"]
        late = await wait_until(
            lambda: [e for e in logs if e["event"] == "command finished after its answer"],
            what="the restart to finish",
        )
    assert late[0]["command"] == "agent.restart-flow"
    responses = [json.loads(p) for p in op.messages(RESPONSE)]
    assert [r["id"] for r in responses].count("slow-1") == 1
