"""kill -9 in the middle of an automatic revert: the agent as a real process.

v1 takes ~1.5 s to start (its startup trigger computes), so going back to it takes
that long; v2 traps ~1 s after it starts, within its health window. The agent is
killed as soon as the revert is recorded on disk (in flight ``revert``) and while v1
is still starting; after a restart the device must converge on v1 with a consistent
state, and a second restart must change nothing.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wat
from artifact_server import ArtifactServer
from broker import Broker, Operator
from common import wait_until
from scenario import (
    DESIRED,
    EVENTS,
    STATE,
    AgentProcess,
    ask,
    flow,
    flow_state,
    write_config,
)

pytestmark = pytest.mark.slow

VERSION_CMD = "f1.version"
SANDBOX = "[sandbox]\ncall_deadline_ms = 3000\nrestart_backoff_initial = 0.05\n"


@pytest.fixture
def agent_proc(tmp_path: Path, broker: Broker) -> Iterator[AgentProcess]:
    ap = AgentProcess(write_config(tmp_path, broker.url, SANDBOX), tmp_path / "agent.log")
    yield ap
    if ap.proc is not None and ap.proc.poll() is None:
        ap.proc.kill()
        ap.wait()


def persisted(tmp_path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((tmp_path / "state" / "state.json").read_text())
    return doc


def recorded_f1(tmp_path: Path) -> dict[str, Any]:
    try:
        rec: dict[str, Any] = persisted(tmp_path)["flows"].get("f1") or {}
    except (OSError, ValueError):
        return {}
    return rec


async def fresh_state(
    op: Operator, since: int, check: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> dict[str, Any]:
    """The first state document published after the ``since``-th that passes ``check``
    (the retained one from before a restart does not count)."""
    docs = await op.wait_messages(
        STATE, lambda ds: any(check(d) for d in ds[since:]), timeout=timeout
    )
    return next(d for d in docs[since:] if check(d))


def running(version_state: dict[str, Any]) -> bool:
    f1 = version_state["flows"].get("f1") or {}
    return (f1.get("runtime") or {}).get("health") == "running"


async def version_answer(op: Operator, rid: str) -> str:
    reply = await ask(op, {"name": VERSION_CMD}, rid)
    assert reply["ok"] is True, reply
    answer: str = reply["result"]["flows"]["f1"]["result"]
    return answer


async def test_kill_9_during_a_revert_converges_on_the_previous_version(
    tmp_path: Path, operator: Operator, artifact_server: ArtifactServer, agent_proc: AgentProcess
) -> None:
    op = operator
    op.subscribe("edge/dev1/#")
    v1 = wat.versioned_flow("v1", spin_on_startup_ms=1500)
    v2 = wat.versioned_flow("v2", trap_from_tick=10)
    triggers_v1 = [{"type": "startup"}, {"type": "command", "command": VERSION_CMD}]
    triggers_v2 = [{"type": "interval", "ms": 100}, {"type": "command", "command": VERSION_CMD}]
    agent_proc.start()
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {"f1": flow(artifact_server, "v1", v1, triggers=triggers_v1)},
        },
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"), timeout=30)

    op.publish(
        DESIRED,
        {
            "generation": 2,
            "flows": {
                "f1": flow(
                    artifact_server,
                    "v2",
                    v2,
                    triggers=triggers_v2,
                    deploymentId="d2",
                    health={"window": 30},
                )
            },
        },
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v2"))
    await op.wait_for(STATE, flow_state("f1", status="failure", reverted=True))
    await wait_until(
        lambda: recorded_f1(tmp_path).get("inflight") == "revert",
        what="the revert recorded on disk",
    )
    agent_proc.signal(signal.SIGKILL)
    assert agent_proc.wait() == -signal.SIGKILL
    events = [e["event"] for e in agent_proc.log_lines()]
    assert "reverting to the previous version" in events
    assert "reverted" not in events  # killed mid-revert: v1 had not started yet
    rec = recorded_f1(tmp_path)
    assert rec["inflight"] == "revert"
    assert rec["installed"]["version"] == "v1"
    assert rec["previous"]["version"] == "v2"

    artifact_server.stop()  # the revert needs no network: v1 is in the local store
    since = len(op.messages(STATE))
    agent_proc.start()
    state = await fresh_state(op, since, running)
    f1 = state["flows"]["f1"]
    assert f1["status"] == "failure"
    assert f1["reverted"] is True
    assert f1["currentVersion"] == "v1"
    assert f1["sha256"] == wat.sha256(v1)
    assert f1["previousVersion"] == "v2"
    assert f1["previousSha256"] == wat.sha256(v2)
    assert f1["desiredVersion"] == "v2"
    assert f1["deploymentId"] == "d2"
    assert "health window" in f1["error"]
    assert (f1.get("health") or {}).get("state") != "probation"
    assert await version_answer(op, "after-1") == "v1"
    after_first = recorded_f1(tmp_path)
    assert after_first["inflight"] is None
    assert after_first["installed"]["version"] == "v1"

    # A second restart changes nothing.
    agent_proc.signal(signal.SIGTERM)
    assert agent_proc.wait() == 0
    events_before = len(op.messages(EVENTS))
    since = len(op.messages(STATE))
    agent_proc.start()
    again = (await fresh_state(op, since, running))["flows"]["f1"]
    assert await version_answer(op, "after-2") == "v1"
    volatile = {"lastUpdated", "runtime"}
    assert {k: v for k, v in again.items() if k not in volatile} == {
        k: v for k, v in f1.items() if k not in volatile
    }
    assert {k: v for k, v in recorded_f1(tmp_path).items() if k != "last_updated"} == {
        k: v for k, v in after_first.items() if k != "last_updated"
    }
    assert [json.loads(p) for p in op.messages(EVENTS)[events_before:]] == []
