"""End to end, in process: real Mosquitto, real HTTP artifact server, real wasmtime.

The operator side is a separate paho client that publishes retained desired
documents and watches the agent's retained state, events and status.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import wat
from artifact_server import ArtifactServer
from broker import Broker, Operator
from common import wait_until
from scenario import DESIRED, EVENTS, STATE, STATUS, flow, flow_state, statuses

from agent.device.daemon import Agent


@pytest.fixture
def op(operator: Operator) -> Operator:
    operator.subscribe("edge/dev1/#")
    return operator


async def test_deploy_upgrade_remove(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    agent: Agent = await running_agent()
    status = await op.wait_for(STATUS, lambda d: d["online"] is True)
    assert status["deviceType"] == "rpi4"
    assert status["runtime"].startswith("wasmtime ")

    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {"f1": flow(artifact_server, "v1", wat.reactor("v1"), deploymentId="d1")},
        },
    )
    state = await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))
    assert state["generation"] == 1
    assert state["flows"]["f1"]["deploymentId"] == "d1"
    assert statuses(op, "f1")[0] == "pending"
    assert [s for s in statuses(op, "f1") if s != "downloading"] == [
        "pending",
        "installing",
        "success",
    ]
    assert agent.host.running["f1"].version == "v1"

    # Upgrade: blue/green, the state reports the new version.
    op.publish(
        DESIRED,
        {
            "generation": 2,
            "flows": {"f1": flow(artifact_server, "v2", wat.reactor("v2"), deploymentId="d2")},
        },
    )
    await op.wait_for(
        STATE, flow_state("f1", status="success", currentVersion="v2", deploymentId="d2")
    )
    assert agent.host.running["f1"].version == "v2"

    # Remove with a blank version.
    op.publish(DESIRED, {"generation": 3, "flows": {"f1": {"version": ""}}})
    await op.wait_for(STATE, flow_state("f1", status="removed", currentVersion=None))
    assert "f1" not in agent.host.running


async def test_wrong_sha_fails_keeps_v1_and_publishes_log(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    agent: Agent = await running_agent()
    op.subscribe("edge/dev1/deployments/#")
    op.publish(
        DESIRED, {"generation": 1, "flows": {"f1": flow(artifact_server, "v1", wat.reactor("v1"))}}
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v1"))

    bad = flow(artifact_server, "v2", wat.reactor("v2"), retries=1, deploymentId="dep-bad")
    bad["artifact"]["sha256"] = "0" * 64
    del bad["artifact"]["size"]
    op.publish(DESIRED, {"generation": 2, "flows": {"f1": bad}})
    state = await op.wait_for(STATE, flow_state("f1", status="failure", attempts=2))
    f1 = state["flows"]["f1"]
    assert "sha256 mismatch" in f1["error"]
    assert f1["currentVersion"] == "v1"
    assert f1["desiredVersion"] == "v2"
    assert agent.host.running["f1"].version == "v1"  # the old version kept running

    log = await op.wait_for("edge/dev1/deployments/dep-bad/log", lambda d: d["attempts"] == 2)
    text = "\n".join(m["message"] for m in log["messages"])
    assert "downloading" in text
    assert "sha256 mismatch" in text
    assert log["flowId"] == "f1"
    assert log["version"] == "v2"


async def test_generation_rules_and_already_installed(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    await running_agent()
    v1 = flow(artifact_server, "v1", wat.reactor("v1"))
    op.publish(DESIRED, {"generation": 5, "flows": {"f1": v1}})
    await op.wait_for(STATE, flow_state("f1", status="success"))

    op.publish(DESIRED, {"generation": 4, "flows": {}})
    state = await op.wait_for(STATE, lambda d: d["rejected"] is not None)
    assert state["rejected"]["generation"] == 4
    assert "older than the applied 5" in state["rejected"]["reason"]
    assert state["flows"]["f1"]["status"] == "success"

    op.publish(DESIRED, {"generation": 6, "flows": {"f1": {**v1, "deploymentId": "again"}}})
    state = await op.wait_for(STATE, flow_state("f1", status="already-installed"))
    assert state["rejected"] is None
    assert state["generation"] == 6


async def test_bad_input_keeps_agent_running(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    agent: Agent = await running_agent()
    for payload, needle in [
        (b"{nope", "not valid JSON"),
        (b'{"generation": "x"}', "generation"),
        (b'{"generation": 1, "flows": {"a/b": {}}}', "flow id"),
        (b"x" * 300_000, "over the"),
    ]:
        op.publish(DESIRED, payload)
        state = await op.wait_for(
            STATE, lambda d, n=needle: n in ((d.get("rejected") or {}).get("reason") or "")
        )
        assert state["flows"] == {}

    not_wasm = flow(artifact_server, "v1", b"this is not wasm at all")
    bad_kind = flow(artifact_server, "v1", wat.reactor("k"))
    bad_kind["artifact"]["kind"] = "docker"
    hostile = flow(artifact_server, "v1", wat.forbidden_import())
    spin = flow(artifact_server, "v1", wat.spin_on_start())
    op.publish(
        DESIRED,
        {
            "generation": 2,
            "flows": {
                "notwasm": {**not_wasm, "retries": 0},
                "kind": bad_kind,
                "imports": {**hostile, "retries": 0},
                "spin": {**spin, "retries": 0},
                "good": flow(artifact_server, "v1", wat.reactor("g")),
            },
        },
    )
    state = await op.wait_for(
        STATE,
        lambda d: (
            len(d["flows"]) == 5
            and all(f["status"] in ("success", "failure") for f in d["flows"].values())
        ),
    )
    flows = state["flows"]
    assert flows["good"]["status"] == "success"
    assert "not a WebAssembly module" in flows["notwasm"]["error"]
    assert "artifact.kind" in flows["kind"]["error"]
    assert "env.socket_connect" in flows["imports"]["error"]
    assert "deadline" in flows["spin"]["error"] or "out of fuel" in flows["spin"]["error"]
    assert set(agent.host.running) == {"good"}


async def test_device_type_mismatch_is_noartifact_without_download(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    await running_agent()
    f = flow(artifact_server, "v1", wat.reactor("x"), deviceTypes=["x86-gw"])
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": f}})
    state = await op.wait_for(STATE, flow_state("f1", status="noartifact"))
    assert "rpi4" in state["flows"]["f1"]["error"]
    assert artifact_server.requests == []


async def test_newer_document_aborts_download_in_flight(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    await running_agent()
    slow = flow(artifact_server, "v2", wat.reactor("v2", pad=200_000))
    artifact_server.set_fault(
        slow["artifact"]["url"].split("/", 3)[3].join(["/", ""]), chunk_delay=0.3
    )
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": slow}})
    await op.wait_for(STATE, flow_state("f1", status="downloading"))
    op.publish(
        DESIRED, {"generation": 2, "flows": {"f1": flow(artifact_server, "v3", wat.reactor("v3"))}}
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v3"))
    events = [json.loads(p) for p in op.messages(EVENTS)]
    aborted = [e for e in events if e["status"] == "aborted"]
    assert len(aborted) == 1
    assert aborted[0]["version"] == "v2"
    assert "superseded by generation 2" in aborted[0]["error"]


async def test_mqtt_artifact(op: Operator, running_agent: Any) -> None:
    await running_agent()
    data = wat.reactor("over-mqtt")
    sha = wat.sha256(data)
    op.publish(f"edge/artifacts/{sha}", data)
    op.publish(
        DESIRED,
        {
            "generation": 1,
            "flows": {
                "f1": {
                    "version": "m1",
                    "artifact": {"url": f"mqtt:edge/artifacts/{sha}", "sha256": sha},
                }
            },
        },
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="m1"))


async def test_restart_starts_flows_from_local_store_without_broker(
    broker: Broker, op: Operator, artifact_server: ArtifactServer, make_config: Any
) -> None:
    cfg = make_config()
    async with Agent(cfg):
        op.publish(
            DESIRED,
            {"generation": 1, "flows": {"f1": flow(artifact_server, "v1", wat.reactor("v1"))}},
        )
        await op.wait_for(STATE, flow_state("f1", status="success"))
    broker.stop()
    artifact_server.stop()
    async with Agent(cfg) as again:
        assert again.host.running["f1"].version == "v1"
        assert not again.session.connected.is_set()


async def test_broker_restart_mid_deployment_converges(
    broker: Broker, op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    agent: Agent = await running_agent()
    slow = flow(artifact_server, "v1", wat.reactor("v1", pad=150_000))
    path = "/" + slow["artifact"]["url"].split("/", 3)[3]
    artifact_server.set_fault(path, chunk_delay=0.2)
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": slow}})
    await op.wait_for(STATE, flow_state("f1", status="downloading"))
    connects = agent.session.connects
    broker.restart()
    op.client.reconnect()
    op.subscribe("edge/dev1/#")
    state = await op.wait_for(
        STATE, flow_state("f1", status="success", currentVersion="v1"), timeout=30
    )
    assert state["generation"] == 1
    assert agent.session.connects > connects
    online = await op.wait_for(STATUS, lambda d: d["online"] is True)
    assert online["online"] is True


async def test_unreachable_broker_then_broker_appears(
    tmp_path: Any, make_config: Any, artifact_server: ArtifactServer
) -> None:
    late = Broker(tmp_path / "late")
    cfg = make_config(mqtt={"broker": late.url})
    async with Agent(cfg) as agent:
        assert not agent.session.connected.is_set()
        await wait_until(lambda: agent.session.last_error, what="a connect error")
        assert "cannot connect" in (agent.session.last_error or "")
        late.start()
        try:
            op = Operator(late).connect()
            op.subscribe("edge/dev1/#")
            op.publish(
                DESIRED,
                {"generation": 1, "flows": {"f1": flow(artifact_server, "v1", wat.reactor("v1"))}},
            )
            await op.wait_for(STATE, flow_state("f1", status="success"), timeout=30)
            op.close()
        finally:
            late.stop()


async def test_back_to_back_releases_never_abort_a_completed_version(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, make_config: Any
) -> None:
    """Each release is published the moment the previous one reports success: the
    completed version must not be reported ``aborted`` (a race seen in the benchmark).
    With no coalescing the success report leaves while the activation still persists."""
    await running_agent(make_config(reconcile={"state_coalesce_ms": 0}))
    for i in range(12):
        op.publish(
            DESIRED,
            {
                "generation": i + 1,
                "flows": {"f1": flow(artifact_server, f"v{i}", wat.reactor(f"v{i}"))},
            },
        )
        await op.wait_for(STATE, flow_state("f1", status="success", currentVersion=f"v{i}"))
    events = [json.loads(p) for p in op.messages(EVENTS)]
    assert [e for e in events if e["status"] == "aborted"] == []
    assert [e["version"] for e in events if e["status"] == "success"] == [
        f"v{i}" for i in range(12)
    ]


async def test_state_disk_full_rejects_new_intent_and_keeps_running(
    op: Operator,
    artifact_server: ArtifactServer,
    running_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A state write that fails (disk full: injected, it cannot be caused portably)
    leaves the running flows alone, reports why, and nothing is half-applied."""
    from agent.device.deploy.state import StateStore
    from agent.errors import StateError

    agent: Agent = await running_agent()
    op.publish(
        DESIRED, {"generation": 1, "flows": {"f1": flow(artifact_server, "v1", wat.reactor("v1"))}}
    )
    await op.wait_for(STATE, flow_state("f1", status="success"))

    def full(self: StateStore, data: bytes) -> None:
        raise StateError(f"cannot write {self.path}: No space left on device")

    monkeypatch.setattr(StateStore, "save_bytes", full)
    op.publish(
        DESIRED, {"generation": 2, "flows": {"f1": flow(artifact_server, "v2", wat.reactor("v2"))}}
    )
    state = await op.wait_for(STATE, lambda d: d["rejected"] is not None)
    assert "No space left on device" in state["rejected"]["reason"]
    assert state["generation"] == 1
    assert state["flows"]["f1"]["currentVersion"] == "v1"
    assert state["flows"]["f1"]["status"] == "success"
    assert agent.host.running["f1"].version == "v1"

    monkeypatch.undo()  # space freed: the next document applies
    op.publish(
        DESIRED, {"generation": 3, "flows": {"f1": flow(artifact_server, "v3", wat.reactor("v3"))}}
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v3"))


async def test_state_write_failing_mid_deployment_is_a_flow_failure(
    op: Operator,
    artifact_server: ArtifactServer,
    running_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.device.deploy.state import StateStore
    from agent.errors import StateError

    agent: Agent = await running_agent()
    op.publish(
        DESIRED, {"generation": 1, "flows": {"f1": flow(artifact_server, "v1", wat.reactor("v1"))}}
    )
    await op.wait_for(STATE, flow_state("f1", status="success"))
    real = StateStore.save_bytes

    def full_after_intent(self: StateStore, data: bytes) -> None:
        """The desired document's writes succeed; from the attempt's start on, v2's fail."""
        if b'"v2"' in data and b'"downloading"' in data:
            raise StateError(f"cannot write {self.path}: No space left on device")
        real(self, data)

    monkeypatch.setattr(StateStore, "save_bytes", full_after_intent)
    op.publish(
        DESIRED,
        {
            "generation": 2,
            "flows": {"f1": flow(artifact_server, "v2", wat.reactor("v2"), retries=0)},
        },
    )
    state = await op.wait_for(STATE, flow_state("f1", status="failure"))
    assert "No space left on device" in state["flows"]["f1"]["error"]
    assert agent.host.running["f1"].version == "v1"
    monkeypatch.undo()  # the agent is still alive and applies the next document
    op.publish(
        DESIRED, {"generation": 3, "flows": {"f1": flow(artifact_server, "v3", wat.reactor("v3"))}}
    )
    await op.wait_for(STATE, flow_state("f1", status="success", currentVersion="v3"))


async def test_internal_error_on_one_message_does_not_stop_the_agent(
    op: Operator,
    artifact_server: ArtifactServer,
    running_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug triggered by one message (injected) is logged; the next message works."""
    from agent.device.deploy import intake

    agent: Agent = await running_agent()
    real = intake.parse_desired
    calls = 0

    def buggy_once(payload: bytes, max_bytes: int = 0) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("injected bug")
        return real(payload, max_bytes)

    monkeypatch.setattr(intake, "parse_desired", buggy_once)
    op.publish(DESIRED, {"generation": 1, "flows": {}})
    await wait_until(lambda: calls >= 1, what="the buggy call")
    op.publish(
        DESIRED, {"generation": 2, "flows": {"f1": flow(artifact_server, "v1", wat.reactor("v1"))}}
    )
    await op.wait_for(STATE, flow_state("f1", status="success"))
    assert agent.host.running["f1"].version == "v1"


async def test_slow_download_reports_bounded_progress_with_one_final_event(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    await running_agent()
    slow = flow(artifact_server, "v1", wat.reactor("v1", pad=160_000))
    artifact_server.set_fault("/" + slow["artifact"]["url"].split("/", 3)[3], chunk_delay=0.25)
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": slow}})
    await op.wait_for(STATE, flow_state("f1", status="success"), timeout=30)
    progress = [e["progress"] for e in map(json.loads, op.messages(EVENTS)) if e["progress"]]
    size = slow["artifact"]["size"]
    assert len(progress) >= 2  # at least one while downloading, and the final one
    assert [p["bytes"] for p in progress] == sorted(p["bytes"] for p in progress)
    assert sum(p["bytes"] == size for p in progress) == 1
    assert all(p["total"] == size for p in progress)


async def test_newer_document_does_not_cost_an_unchanged_install_an_attempt(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    """A document that only adds flow B arrives while flow A is installing: A's
    install is interrupted and redone, but it is not counted as a second attempt."""
    await running_agent()
    a = flow(artifact_server, "a1", wat.busy_on_start(400, "a"))
    op.publish(DESIRED, {"generation": 1, "flows": {"A": a}})
    await op.wait_for(STATE, flow_state("A", status="installing"))
    op.publish(
        DESIRED,
        {"generation": 2, "flows": {"A": a, "B": flow(artifact_server, "b1", wat.reactor("b"))}},
    )
    state = await op.wait_for(
        STATE,
        lambda d: all(d["flows"].get(f, {}).get("status") == "success" for f in ("A", "B")),
        timeout=30,
    )
    assert state["flows"]["A"]["attempts"] == 1
    assert "aborted" not in statuses(op, "A")


async def test_flow_triggers_over_mqtt(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any
) -> None:
    """Interval, command and mqtt triggers end to end, through the real broker."""
    await running_agent()  # (op already subscribes to edge/dev1/#: no overlapping filter)
    f = flow(
        artifact_server,
        "v1",
        wat.echo_flow(),
        triggers=[
            {"type": "interval", "name": "tick", "ms": 100},
            {"type": "command", "command": "ping"},
            {"type": "mqtt", "topic": "sensors/+/temp"},
        ],
    )
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": f}})
    state = await op.wait_for(STATE, flow_state("f1", status="success"))
    assert state["flows"]["f1"]["runtime"] == {
        "health": "running",
        "restarts": 0,
        "lastError": None,
    }
    await wait_until(lambda: len(op.messages("edge/dev1/flows/f1/count")) >= 3, what="ticks")
    counts = [int.from_bytes(p, "little") for p in op.messages("edge/dev1/flows/f1/count")]
    assert counts[:3] == [1, 2, 3]

    op.publish("edge/dev1/command", {"name": "ping", "payload": {"a": 1}}, retain=False)
    await wait_until(lambda: op.messages("edge/dev1/flows/f1/command"), what="command echo")
    assert op.messages("edge/dev1/flows/f1/command") == [b'ping{"a": 1}']

    op.publish("sensors/kitchen/temp", b"21.5", retain=False)
    await wait_until(lambda: op.messages("edge/dev1/flows/f1/mqtt"), what="mqtt echo")
    assert op.messages("edge/dev1/flows/f1/mqtt") == [b"sensors/kitchen/temp21.5"]


async def test_broken_flow_is_reported_and_stays_stopped_until_redeployed(
    op: Operator, artifact_server: ArtifactServer, make_config: Any
) -> None:
    cfg = make_config(
        sandbox={"call_deadline_ms": 1000, "restart_backoff_initial": 0.05, "max_failures": 3}
    )
    trig = [{"type": "interval", "ms": 30}]
    async with Agent(cfg):
        op.publish(
            DESIRED,
            {
                "generation": 1,
                "flows": {
                    "f1": flow(artifact_server, "v1", wat.edge_flow("unreachable"), triggers=trig)
                },
            },
        )
        state = await op.wait_for(
            STATE,
            lambda d: (d["flows"].get("f1", {}).get("runtime") or {}).get("health") == "broken",
        )
    f1 = state["flows"]["f1"]
    # It broke within its health window (60 s by default): the deployment failed, and
    # with no version before it there is nothing to go back to.
    assert f1["status"] == "failure"
    assert "failed within its health window" in f1["error"]
    assert "no previous version" in f1["error"]
    assert (f1["reverted"], f1["retryAt"]) == (False, None)
    assert f1["runtime"]["restarts"] == 2
    assert "unreachable" in f1["runtime"]["lastError"]

    async with Agent(cfg) as again:  # a restart does not resurrect a broken flow
        assert "f1" not in again.host.running
        await op.wait_for(STATE, lambda d: d["flows"]["f1"]["runtime"]["health"] == "broken")
        op.publish(
            DESIRED,
            {
                "generation": 2,
                "flows": {"f1": flow(artifact_server, "v2", wat.echo_flow(), triggers=trig)},
            },
        )
        await op.wait_for(
            STATE,
            lambda d: (
                d["flows"]["f1"]["currentVersion"] == "v2"
                and d["flows"]["f1"]["runtime"]["health"] == "running"
            ),
        )
        assert again.host.running["f1"].version == "v2"


@pytest.mark.parametrize("kind", ["eea", "wasm"])  # "wasm": detected from its imports
async def test_eea_bundle_deployed_and_driven_over_mqtt(
    operator: Operator, artifact_server: ArtifactServer, running_agent: Any, kind: str
) -> None:
    op = operator
    op.subscribe("edge/dev1/#")
    op.subscribe("losant/dev1/#")
    agent: Agent = await running_agent()
    f = flow(artifact_server, "b1", wat.eea_bundle(), config={"eea": {"loopIntervalMs": 20}})
    f["artifact"]["kind"] = kind
    op.publish(DESIRED, {"generation": 1, "flows": {"f1": f}})
    await op.wait_for(STATE, flow_state("f1", status="success"))
    await wait_until(lambda: op.messages("losant/dev1/init"), what="eea_init's message")
    await wait_until(lambda: op.messages("losant/dev1/conn") == [b"1"], what="connected")
    op.publish("edge/dev1/command", {"name": "blink"}, retain=False)
    await wait_until(lambda: op.messages("losant/dev1/echo"), what="the bundle's echo")
    assert op.messages("losant/dev1/echo") == [b'edge/dev1/command {"name": "blink"}']
    assert type(agent.host.running["f1"]).__name__ == "EEARunner"


async def test_workflow_bundle_deployed_over_mqtt(
    op: Operator, artifact_server: ArtifactServer, running_agent: Any, tmp_path: Any
) -> None:
    from agent.wire.bundle import build_bundle

    await running_agent()
    src = tmp_path / "bundle"
    src.mkdir()
    (src / "ticker.wasm").write_bytes(wat.echo_flow())
    (src / "manifest.json").write_text(
        json.dumps(
            {
                "name": "demo",
                "version": "1.0.0",
                "modules": [
                    {
                        "name": "ticker",
                        "file": "ticker.wasm",
                        "triggers": [{"type": "command", "command": "hello"}],
                    }
                ],
            }
        )
    )
    build_bundle(src, tmp_path / "demo.tar.gz")
    data = (tmp_path / "demo.tar.gz").read_bytes()
    f = flow(artifact_server, "1.0.0", data)
    f["artifact"]["kind"] = "bundle"
    op.publish(DESIRED, {"generation": 1, "flows": {"gh": f}})
    await op.wait_for(STATE, flow_state("gh", status="success", currentVersion="1.0.0"))
    op.publish("edge/dev1/command", {"name": "hello", "payload": 1}, retain=False)
    await wait_until(lambda: op.messages("edge/dev1/flows/gh/command"), what="the echo")
    assert op.messages("edge/dev1/flows/gh/command") == [b"hello1"]

    # a bundle whose module does not match its manifest fails; the running one stays
    import gzip
    import io
    import tarfile

    raw = gzip.decompress(data)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    members["ticker.wasm"] = wat.reactor("tampered")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as t:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    bad = flow(artifact_server, "1.0.1", buf.getvalue(), retries=0)
    bad["artifact"]["kind"] = "bundle"
    op.publish(DESIRED, {"generation": 2, "flows": {"gh": bad}})
    state = await op.wait_for(STATE, flow_state("gh", status="failure"))
    assert "sha256 mismatch" in state["flows"]["gh"]["error"]
    assert state["flows"]["gh"]["currentVersion"] == "1.0.0"
