"""Safer deployments (issue 13) end to end: real Mosquitto, real HTTP artifact server,
real wasmtime.

A version that breaks within its health window goes back to the previous one; one
that survives it becomes healthy; an entry carries artifacts per device type; an
abort entry stops or rolls back a deployment; a flow's defer request and the
maintenance window hold installs back (bounded); ``agent.artifact`` exports what runs.

Every flow here answers the command ``f1.version`` with its own version (see
:func:`wat.versioned_flow`), so "which version runs" is asked of the device itself.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import wat
from artifact_server import ArtifactServer
from broker import Broker, Operator
from common import MakeConfig, wait_until
from scenario import DESIRED, EVENTS, STATE, ask, flow, flow_state, statuses

from agent.device.daemon import Agent

VERSION_CMD = "f1.version"
ASK_VERSION = {"type": "command", "command": VERSION_CMD}
EVERY_100MS = {"type": "interval", "ms": 100}
STARTUP = {"type": "startup"}
#: Restarts after a trap come quickly; the call deadline stays the suite's usual one.
SANDBOX = {"call_deadline_ms": 1000, "restart_backoff_initial": 0.05}

_ids = itertools.count()


@pytest.fixture
def op(operator: Operator) -> Operator:
    operator.subscribe("edge/#")
    return operator


def entry(server: ArtifactServer, version: str, data: bytes, **extra: Any) -> dict[str, Any]:
    """A flow entry for ``f1`` (answers ``f1.version``, plus ``extra`` triggers)."""
    triggers = [ASK_VERSION, *extra.pop("triggers", [])]
    return flow(server, version, data, triggers=triggers, **extra)


async def running_version(op: Operator, device: str = "dev1") -> str:
    """Ask the device which version of f1 answers (the flow's own ``edge.respond``)."""
    rid = f"ask-{next(_ids)}"
    if device == "dev1":
        reply = await ask(op, {"name": VERSION_CMD}, rid)
    else:
        op.publish(f"edge/{device}/command", {"name": VERSION_CMD, "id": rid}, retain=False)
        found = await op.wait_messages(
            f"edge/{device}/command/response", lambda ds: any(d.get("id") == rid for d in ds)
        )
        reply = next(d for d in found if d.get("id") == rid)
    assert reply["ok"] is True, reply
    answer: str = reply["result"]["flows"]["f1"]["result"]
    return answer


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def events_since(op: Operator, start: int, flow_id: str = "f1") -> list[dict[str, Any]]:
    return [e for e in map(json.loads, op.messages(EVENTS)[start:]) if e.get("flowId") == flow_id]


def marker(server: ArtifactServer, tag: str) -> dict[str, Any]:
    """An unrelated flow deployed in the same document: once it is ``success``, the
    reconcile run that planned the whole document (f1 included) has happened."""
    return flow(server, "m", wat.reactor(tag))


# --------------------------------------------------------------------- health window


async def test_a_version_that_traps_in_its_window_is_reverted(
    broker: Broker,
    op: Operator,
    artifact_server: ArtifactServer,
    running_agent: Any,
    make_config: MakeConfig,
) -> None:
    agent: Agent = await running_agent(make_config(sandbox=SANDBOX))
    v1, v2 = wat.versioned_flow("v1"), wat.versioned_flow("v2", trap_from_tick=20)
    op.publish(
        DESIRED,
        {"generation": 1, "flows": {"f1": entry(artifact_server, "v1", v1, deploymentId="d1")}},
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    assert await running_version(op) == "v1"

    bad = entry(
        artifact_server,
        "v2",
        v2,
        triggers=[EVERY_100MS],
        deploymentId="d2",
        health={"window": 10},
    )
    op.publish(DESIRED, {"generation": 2, "flows": {"f1": bad}})
    state = await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v2"))
    activated = time.monotonic()
    assert state["flows"]["f1"]["health"]["state"] == "probation"
    assert await running_version(op) == "v2"

    # (the verdict may be reported while v2 still runs: v1 once it does)
    state = await op.wait_for(
        STATE, flow_state("f1", status="failure", reverted=True, currentVersion="v1")
    )
    took = time.monotonic() - activated
    assert 1.0 < took < 10.0, f"trapped ~2 s in, reverted within the window: {took:.2f} s"
    f1 = state["flows"]["f1"]
    assert f1["currentVersion"] == "v1"
    assert f1["desiredVersion"] == "v2"
    assert f1["deploymentId"] == "d2"
    assert f1["previousVersion"] == "v2"
    assert f1["sha256"] == wat.sha256(v1)
    assert f1["previousSha256"] == wat.sha256(v2)
    assert "health window" in f1["error"]
    assert "unreachable" in f1["error"]
    assert "reverted to version v1" in f1["error"]
    # (the state reads reverted as soon as the revert is recorded: v1 may still be starting)
    await wait_until(lambda: agent.host.running["f1"].version == "v1", what="v1 to run again")
    assert await running_version(op) == "v1"  # the old version serves commands again

    log = await op.wait_for("edge/dev1/deployments/d2/log", lambda d: d["flowId"] == "f1")
    assert (log["deploymentId"], log["version"]) == ("d2", "v2")
    text = "\n".join(m["message"] for m in log["messages"])
    assert "reverting to the previous version" in text
    assert "unreachable" in text
    late = Operator(broker).connect()  # retained: a client that comes later gets it too
    try:
        late.subscribe("edge/dev1/deployments/#")
        await late.wait_for("edge/dev1/deployments/d2/log", lambda d: d == log)
    finally:
        late.close()

    # The same entry under a higher generation is not retried ...
    mark = len(op.messages(EVENTS))
    op.publish(
        DESIRED,
        {"generation": 3, "flows": {"f1": bad, "m": marker(artifact_server, "gen3")}},
    )
    state = await op.wait_for(STATE, flow_state("m", status="success"))
    assert state["generation"] == 3
    assert state["flows"]["f1"]["status"] == "failure"
    assert state["flows"]["f1"]["reverted"] is True
    assert state["flows"]["f1"]["currentVersion"] == "v1"
    assert events_since(op, mark) == []
    assert agent.host.running["f1"].version == "v1"

    # ... a new deploymentId is.
    op.publish(
        DESIRED,
        {
            "generation": 4,
            "flows": {"f1": {**bad, "deploymentId": "d3"}, "m": marker(artifact_server, "gen3")},
        },
    )
    state = await op.wait_for(
        STATE, flow_state("f1", status="success", currentVersion="v2", deploymentId="d3")
    )
    assert state["flows"]["f1"]["reverted"] is False
    assert state["flows"]["f1"]["previousVersion"] == "v1"


async def test_a_version_that_survives_its_window_becomes_healthy(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    await running_agent(make_config(sandbox=SANDBOX))
    data = wat.versioned_flow("v1")
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "f1": entry(
                    artifact_server, "v1", data, triggers=[EVERY_100MS], health={"window": 1.5}
                )
            },
        },
    )
    state = await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    seen = time.time()
    f1 = state["flows"]["f1"]
    assert f1["health"]["state"] == "probation"
    until = epoch(f1["health"]["until"])
    assert 0.5 < until - seen <= 1.6
    assert f1["sha256"] == wat.sha256(data)
    assert f1["previousVersion"] is None
    assert f1["previousSha256"] is None

    state = await op.wait_for(STATE, lambda d: d["flows"]["f1"]["health"]["state"] == "healthy")
    assert time.time() >= until - 0.05
    f1 = state["flows"]["f1"]
    assert f1["health"].get("until") is None
    assert f1["status"] == "success"
    assert f1["reverted"] is False
    assert f1["error"] is None
    assert statuses(op, "f1")[-1] == "success"


async def test_revert_off_keeps_the_failing_version(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    agent: Agent = await running_agent(make_config(sandbox=SANDBOX))
    v2 = wat.versioned_flow("v2", trap_from_tick=20)
    op.publish(
        DESIRED,
        {"generation": 1, "flows": {"f1": entry(artifact_server, "v1", wat.versioned_flow("v1"))}},
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    op.publish(
        DESIRED,
        {
            "generation": 2,
            "flows": {
                "f1": entry(
                    artifact_server,
                    "v2",
                    v2,
                    triggers=[EVERY_100MS],
                    deploymentId="d2",
                    health={"window": 10, "revert": False},
                )
            },
        },
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v2"))
    state = await op.wait_for(STATE, flow_state("f1", status="failure"))
    f1 = state["flows"]["f1"]
    assert f1["reverted"] is False
    assert f1["currentVersion"] == "v2"
    assert f1["sha256"] == wat.sha256(v2)
    assert f1["previousVersion"] == "v1"
    assert "health window" in f1["error"]
    assert "revert is off" in f1["error"]
    assert agent.host.running["f1"].version == "v2"


async def test_a_health_failure_without_revert_publishes_a_deployment_log(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    """docs/protocol.md: "After every failed attempt the agent publishes ... the
    deployment log". A version failing its window with revert off (or with nothing
    to go back to) is reported ``failure`` too, and deserves its log like a revert."""
    await running_agent(make_config(sandbox=SANDBOX))
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "f1": entry(
                    artifact_server,
                    "v1",
                    wat.versioned_flow("v1", trap_from_tick=5),
                    triggers=[EVERY_100MS],
                    deploymentId="lonely",
                    health={"window": 10},
                )
            },
        },
    )
    state = await op.wait_for(STATE, flow_state("f1", status="failure"))
    assert "no previous version" in state["flows"]["f1"]["error"]
    log = await op.wait_for("edge/dev1/deployments/lonely/log", lambda d: True, timeout=3)
    assert "health window" in "\n".join(m["message"] for m in log["messages"])


# --------------------------------------------------------------------- device types


async def test_one_entry_gives_each_device_type_its_own_artifact(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    await running_agent(make_config("dev1", device_type="gw-a"))
    await running_agent(make_config("dev2", device_type="gw-b"))
    await running_agent(make_config("dev3", device_type="gw-c"))
    for_a, for_b = wat.versioned_flow("built-for-a"), wat.versioned_flow("built-for-b")
    a = flow(artifact_server, "v1a", for_a)["artifact"]
    b = flow(artifact_server, "v1b", for_b)["artifact"]
    doc = {
        "generation": 1,
        "flows": {
            "f1": {
                "version": "v1",
                "deploymentId": "multi",
                "artifacts": [
                    {"deviceTypes": ["gw-a", "gw-x"], **a},
                    {"deviceTypes": ["gw-b"], **b},
                ],
                "triggers": [ASK_VERSION],
            }
        },
    }
    for device in ("dev1", "dev2", "dev3"):
        op.publish(f"edge/{device}/desired", doc)

    on_a = await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    on_b = await op.wait_for(
        "edge/dev2/state", flow_state("f1", status="success", currentVersion="v1")
    )
    on_c = await op.wait_for("edge/dev3/state", flow_state("f1", status="noartifact"))
    assert on_a["flows"]["f1"]["sha256"] == wat.sha256(for_a)
    assert on_b["flows"]["f1"]["sha256"] == wat.sha256(for_b)
    assert await running_version(op, "dev1") == "built-for-a"
    assert await running_version(op, "dev2") == "built-for-b"
    c = on_c["flows"]["f1"]
    assert "gw-c" in c["error"]
    assert c["currentVersion"] is None
    assert c["sha256"] is None
    fetched = sorted({r.path for r in artifact_server.requests})
    assert fetched == sorted(
        "/" + art["url"].split("/", 3)[3] for art in (a, b)
    )  # gw-c downloaded nothing


# --------------------------------------------------------------------- abort


async def test_a_new_device_type_on_reload_installs_its_own_artifact(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    """A reload that changes the device type picks the other build of the entry (it
    used to raise IllegalTransition: success -> downloading, without pending)."""
    cfg = make_config("dev1", device_type="gw-a")
    agent: Agent = await running_agent(cfg)
    for_a, for_b = wat.versioned_flow("built-for-a"), wat.versioned_flow("built-for-b")
    a = flow(artifact_server, "v1a", for_a)["artifact"]
    b = flow(artifact_server, "v1b", for_b)["artifact"]
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "f1": {
                    "version": "v1",
                    "artifacts": [{"deviceTypes": ["gw-a"], **a}, {"deviceTypes": ["gw-b"], **b}],
                    "triggers": [ASK_VERSION],
                }
            },
        },
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    assert await running_version(op) == "built-for-a"
    start = len(op.messages("edge/dev1/events"))
    await agent.reload(cfg.model_copy(update={"device_type": "gw-b"}))
    state = await op.wait_for(
        STATE,
        lambda d: (
            flow_state("f1", status="success")(d)
            and d["flows"]["f1"]["sha256"] == wat.sha256(for_b)
        ),
    )
    assert state["flows"]["f1"]["previousSha256"] == wat.sha256(for_a)
    assert await running_version(op) == "built-for-b"
    statuses = [e["status"] for e in events_since(op, start)]
    assert "failure" not in statuses, statuses
    assert statuses[0] == "pending", statuses


async def test_abort_before_activation_keeps_the_old_version(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    agent: Agent = await running_agent(make_config(sandbox=SANDBOX))
    op.publish(
        DESIRED,
        {"generation": 1, "flows": {"f1": entry(artifact_server, "v1", wat.versioned_flow("v1"))}},
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))

    v2 = entry(artifact_server, "v2", wat.versioned_flow("v2"), deploymentId="d2")
    path = "/" + v2["artifact"]["url"].split("/", 3)[3]
    artifact_server.set_fault(path, header_delay=60)  # the download hangs until aborted
    op.publish(DESIRED, {"generation": 2, "flows": {"f1": v2}})
    await op.wait_for(STATE, flow_state("f1", status="downloading", deploymentId="d2"))

    op.publish(DESIRED, {"generation": 3, "flows": {"f1": {**v2, "abort": True}}})
    # (first "superseded by generation 3", as any newer document; then the abort's verdict)
    state = await op.wait_for(
        STATE,
        lambda d: (
            flow_state("f1", status="aborted")(d) and "aborted" in (d["flows"]["f1"]["error"] or "")
        ),
    )
    f1 = state["flows"]["f1"]
    assert f1["currentVersion"] == "v1"
    assert f1["deploymentId"] == "d2"
    assert f1["reverted"] is False
    assert "d2" in f1["error"]
    assert "before it activated" in f1["error"]
    assert agent.host.running["f1"].version == "v1"
    assert await running_version(op) == "v1"
    assert not (agent.reconciler.artifacts.root / "sha256" / v2["artifact"]["sha256"]).exists()

    # An attempt held back by a closed maintenance window is aborted the same way.
    now = datetime.now(UTC)
    closed = f"{_hhmm(now + timedelta(hours=2))}-{_hhmm(now + timedelta(hours=3))}"
    await agent.reload(make_config(sandbox=SANDBOX, updates={"maintenance_window": closed}))
    v3 = entry(artifact_server, "v3", wat.versioned_flow("v3"), deploymentId="d3")
    op.publish(DESIRED, {"generation": 4, "flows": {"f1": v3}})
    await op.wait_for(
        STATE,
        lambda d: (
            flow_state("f1", status="pending", deploymentId="d3")(d)
            and d["flows"]["f1"]["deferredUntil"]
        ),
    )
    op.publish(DESIRED, {"generation": 5, "flows": {"f1": {**v3, "abort": True}}})
    state = await op.wait_for(STATE, flow_state("f1", status="aborted", deploymentId="d3"))
    f1 = state["flows"]["f1"]
    assert "before it activated" in f1["error"]
    assert (f1["currentVersion"], f1["deferredUntil"]) == ("v1", None)
    assert await running_version(op) == "v1"


async def test_abort_after_activation_reverts_only_when_asked(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    agent: Agent = await running_agent(make_config(sandbox=SANDBOX))
    v1 = wat.versioned_flow("v1")
    op.publish(
        DESIRED,
        {"generation": 1, "flows": {"f1": entry(artifact_server, "v1", v1, deploymentId="d1")}},
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    v2 = entry(artifact_server, "v2", wat.versioned_flow("v2"), deploymentId="d2")
    op.publish(DESIRED, {"generation": 2, "flows": {"f1": v2}})
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v2"))

    # With revert: the previous version runs again, the deployment reads aborted.
    op.publish(DESIRED, {"generation": 3, "flows": {"f1": {**v2, "abort": True, "revert": True}}})
    # (a first report may say "aborted" while v2 still runs: v1 is reported once it does)
    state = await op.wait_for(STATE, flow_state("f1", status="aborted", currentVersion="v1"))
    f1 = state["flows"]["f1"]
    assert f1["reverted"] is True
    assert f1["sha256"] == wat.sha256(v1)
    assert f1["previousVersion"] == "v2"
    assert f1["deploymentId"] == "d2"
    assert agent.host.running["f1"].version == "v1"
    assert await running_version(op) == "v1"

    # Without revert: an activated deployment stays as it is.
    v3 = entry(artifact_server, "v3", wat.versioned_flow("v3"), deploymentId="d3")
    op.publish(DESIRED, {"generation": 4, "flows": {"f1": v3}})
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v3"))
    mark = len(op.messages(EVENTS))
    op.publish(
        DESIRED,
        {
            "generation": 5,
            "flows": {"f1": {**v3, "abort": True}, "m": marker(artifact_server, "a")},
        },
    )
    state = await op.wait_for(STATE, flow_state("m", status="success"))
    f1 = state["flows"]["f1"]
    assert (f1["status"], f1["currentVersion"], f1["reverted"]) == ("success", "v3", False)
    assert events_since(op, mark) == []
    assert await running_version(op) == "v3"


# --------------------------------------------------------------------- defer


async def test_a_defer_request_postpones_the_install_then_it_completes(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    agent: Agent = await running_agent(make_config(sandbox=SANDBOX))
    busy = entry(
        artifact_server, "v1", wat.versioned_flow("v1", defer_on_startup=2), triggers=[STARTUP]
    )
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": busy}})
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))

    published = time.time()
    v2 = entry(artifact_server, "v2", wat.versioned_flow("v2"), deploymentId="d2")
    op.publish(DESIRED, {"generation": 2, "flows": {"f1": v2}})
    state = await op.wait_for(
        STATE, lambda d: flow_state("f1", status="pending")(d) and d["flows"]["f1"]["deferredUntil"]
    )
    f1 = state["flows"]["f1"]
    assert "defer" in f1["error"]
    assert f1["currentVersion"] == "v1"
    assert f1["desiredVersion"] == "v2"
    until = epoch(f1["deferredUntil"])
    assert published < until <= published + 2.1
    assert await running_version(op) == "v1"  # v1 keeps running meanwhile

    state = await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v2"))
    done = time.time()
    assert until - 0.05 <= done <= until + 3.0, f"installed {done - until:+.2f} s after the end"
    assert state["flows"]["f1"]["deferredUntil"] is None
    assert state["flows"]["f1"]["error"] is None
    assert agent.host.running["f1"].version == "v2"


async def test_defer_requests_are_bounded_by_max_defer(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    await running_agent(make_config(sandbox=SANDBOX, updates={"max_defer_s": 1}))
    forever = wat.versioned_flow("v1", defer_on_startup=3600, defer_on_tick=3600)
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {"f1": entry(artifact_server, "v1", forever, triggers=[STARTUP, EVERY_100MS])},
        },
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))

    published = time.time()
    op.publish(
        DESIRED,
        {"generation": 2, "flows": {"f1": entry(artifact_server, "v2", wat.versioned_flow("v2"))}},
    )
    state = await op.wait_for(
        STATE, lambda d: flow_state("f1", status="pending")(d) and d["flows"]["f1"]["deferredUntil"]
    )
    until = epoch(state["flows"]["f1"]["deferredUntil"])
    assert published < until <= published + 1.2  # max_defer_s, not the asked 3600 s
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v2"), timeout=5)
    took = time.time() - published
    assert 0.9 <= took <= 4.0, f"installed {took:.2f} s after the deployment"
    assert await running_version(op) == "v2"


# --------------------------------------------------------------------- maintenance window


def _hhmm(t: datetime) -> str:
    return t.strftime("%H:%M")


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu"])  # (+05:45: minutes count)
async def test_a_closed_maintenance_window_holds_installs_but_not_removals(
    op: Operator,
    artifact_server: ArtifactServer,
    running_agent: Any,
    make_config: MakeConfig,
    zone: str,
) -> None:
    now = datetime.now(ZoneInfo(zone)).replace(second=0, microsecond=0)
    opens = now + timedelta(hours=2)
    closed = f"{_hhmm(opens)}-{_hhmm(now + timedelta(hours=3))}"
    is_open = f"{_hhmm(now - timedelta(hours=1))}-{_hhmm(now + timedelta(hours=1))}"

    def updates(window: str) -> dict[str, Any]:
        return {"maintenance_window": window, "timezone": zone}

    agent: Agent = await running_agent(make_config(sandbox=SANDBOX, updates=updates(closed)))
    data = wat.versioned_flow("v1")
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": entry(artifact_server, "v1", data)}})
    state = await op.wait_for(
        STATE, lambda d: flow_state("f1", status="pending")(d) and d["flows"]["f1"]["deferredUntil"]
    )
    f1 = state["flows"]["f1"]
    assert epoch(f1["deferredUntil"]) == opens.timestamp()
    assert "maintenance window" in f1["error"]
    assert f"{closed} {zone}" in f1["error"]
    assert f1["currentVersion"] is None
    assert artifact_server.requests == []  # not even downloaded

    await agent.reload(make_config(sandbox=SANDBOX, updates=updates(is_open)))
    state = await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    assert state["flows"]["f1"]["deferredUntil"] is None
    assert await running_version(op) == "v1"

    await agent.reload(make_config(sandbox=SANDBOX, updates=updates(closed)))
    op.publish(DESIRED, {"generation": 2, "flows": {"f1": {"version": ""}}})
    await op.wait_for(STATE, flow_state("f1", status="removed", currentVersion=None))
    assert "f1" not in agent.host.running


# --------------------------------------------------------------------- agent.artifact


async def artifact(op: Operator, **payload: Any) -> dict[str, Any]:
    reply = await ask(op, {"name": "agent.artifact", "payload": payload}, f"art-{next(_ids)}")
    assert reply["ok"] is True, reply
    result: dict[str, Any] = reply["result"]
    return result


async def test_agent_artifact_exports_what_runs(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    await running_agent(make_config(sandbox=SANDBOX))
    v1 = wat.versioned_flow("v1")
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": entry(artifact_server, "v1", v1)}})
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))

    whole = await artifact(op, flowId="f1")
    data = base64.b64decode(whole["data"])
    assert data == v1
    assert hashlib.sha256(data).hexdigest() == whole["sha256"] == wat.sha256(v1)
    assert (whole["size"], whole["offset"], whole["length"]) == (len(v1), 0, len(v1))
    assert (whole["version"], whole["which"], whole["more"]) == ("v1", "installed", False)

    none = await ask(
        op, {"name": "agent.artifact", "payload": {"flowId": "f1", "which": "previous"}}, "np"
    )
    assert none["ok"] is False
    assert "no previous version" in none["error"]

    v2 = wat.reactor("v2", pad=5000)  # several pages of 1000 bytes
    op.publish(DESIRED, {"generation": 2, "flows": {"f1": flow(artifact_server, "v2", v2)}})
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v2"))
    pages: list[bytes] = []
    offset = 0
    while True:
        page = await artifact(op, flowId="f1", offset=offset, length=1000)
        assert page["offset"] == offset
        assert page["size"] == len(v2)
        chunk = base64.b64decode(page["data"])
        assert len(chunk) == page["length"] <= 1000
        pages.append(chunk)
        offset += len(chunk)
        if not page["more"]:
            break
        assert len(chunk) == 1000
        assert len(pages) < 20
    assert offset == len(v2)
    assert len(pages) == -(-len(v2) // 1000)
    assert b"".join(pages) == v2
    assert hashlib.sha256(b"".join(pages)).hexdigest() == page["sha256"] == wat.sha256(v2)

    previous = await artifact(op, flowId="f1", which="previous")
    assert (previous["version"], previous["which"]) == ("v1", "previous")
    assert base64.b64decode(previous["data"]) == v1
    assert previous["sha256"] == wat.sha256(v1)


# --------------------------------------------------------------------- bugs found


async def test_a_new_deployment_after_a_revert_is_not_reported_reverted(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    """``reverted`` says the deployment's version was rolled back. After a revert, a
    new deployment (new ``deploymentId``) of the version that runs is
    ``already-installed``: nothing of it was reverted, yet the flag stays true."""
    await running_agent(make_config(sandbox=SANDBOX))
    v1 = entry(artifact_server, "v1", wat.versioned_flow("v1"), deploymentId="d1")
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": v1}})
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    bad = entry(
        artifact_server,
        "v2",
        wat.versioned_flow("v2", trap_from_tick=3),
        triggers=[EVERY_100MS],
        deploymentId="d2",
        health={"window": 10},
    )
    op.publish(DESIRED, {"generation": 2, "flows": {"f1": bad}})
    await op.wait_for(STATE, flow_state("f1", status="failure", reverted=True))

    op.publish(DESIRED, {"generation": 3, "flows": {"f1": {**v1, "deploymentId": "d4"}}})
    state = await op.wait_for(STATE, flow_state("f1", deploymentId="d4"))
    f1 = state["flows"]["f1"]
    assert (f1["status"], f1["currentVersion"], f1["error"]) == ("already-installed", "v1", None)
    assert f1["reverted"] is False


async def test_a_maintenance_window_wait_does_not_use_up_the_defer_budget(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: MakeConfig
) -> None:
    """A deployment that waited for the maintenance window longer than ``max_defer_s``
    is installed the moment the window opens, over a flow that asks to defer: the
    window's wait was counted as deferral (``deferred_since`` is set by any hold)."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    closed = f"{_hhmm(now + timedelta(hours=2))}-{_hhmm(now + timedelta(hours=3))}"
    is_open = f"{_hhmm(now - timedelta(hours=1))}-{_hhmm(now + timedelta(hours=1))}"

    def config(window: str | None) -> Any:
        return make_config(
            sandbox=SANDBOX, updates={"max_defer_s": 1, "maintenance_window": window}
        )

    agent: Agent = await running_agent(config(None))
    busy = wat.versioned_flow("v1", defer_on_startup=3600, defer_on_tick=3600)
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {"f1": entry(artifact_server, "v1", busy, triggers=[STARTUP, EVERY_100MS])},
        },
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    await agent.reload(config(closed))
    op.publish(
        DESIRED,
        {"generation": 2, "flows": {"f1": entry(artifact_server, "v2", wat.versioned_flow("v2"))}},
    )
    state = await op.wait_for(
        STATE, lambda d: flow_state("f1", status="pending")(d) and d["flows"]["f1"]["deferredUntil"]
    )
    assert "maintenance window" in state["flows"]["f1"]["error"]
    held = time.time()
    await wait_until(lambda: time.time() > held + 1.5, what="a window wait over max_defer_s")

    mark = len(op.messages(STATE))
    opened = time.time()
    await agent.reload(config(is_open))
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v2"))
    took = time.time() - opened
    seen = [json.loads(p)["flows"]["f1"] for p in op.messages(STATE)[mark:]]
    assert any(f["status"] == "pending" and "defer" in (f["error"] or "") for f in seen), seen
    assert took >= 0.9, f"installed {took:.2f} s after the window opened, over the defer"
