"""Table-driven tests of the pure planner: no I/O, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from agent.device.deploy.planner import (
    Activate,
    Download,
    Forget,
    Hold,
    Install,
    Remove,
    SetStatus,
    Verify,
    Wait,
    plan,
)
from agent.device.deploy.state import FlowRecord, Installed, target_key
from agent.wire.protocol import FlowSpec, Status, parse_desired

SHA1 = "1" * 64
SHA2 = "2" * 64
NOW = 1_000_000.0


def spec(version: str | None = "v1", sha: str = SHA1, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": version, **extra}
    if version:
        doc["artifact"] = {"url": "http://h/a.wasm", "sha256": sha}
    return doc


def desired(gen: int = 5, **flows: Any) -> Any:
    import json

    return parse_desired(json.dumps({"generation": gen, "flows": flows}).encode())


def key(version: str = "v1", sha: str = SHA1, **extra: Any) -> str:
    entry = FlowSpec.model_validate(spec(version, sha, **extra))
    return target_key(entry, entry.artifact)


def installed(version: str = "v1", sha: str = SHA1) -> Installed:
    return Installed(version=version, sha256=sha)


def typed(*device_types: list[str]) -> dict[str, Any]:
    """An entry with one artifact per list of device types (and no plain artifact)."""
    return {
        "version": "v1",
        "artifacts": [
            {"deviceTypes": types, "url": f"http://h/{i}.wasm", "sha256": f"{i:x}" * 64}
            for i, types in enumerate(device_types, start=1)
        ],
    }


def activated_d2() -> FlowRecord:
    """v2 of deployment d2 runs; v1 before it."""
    return FlowRecord(
        installed=Installed(version="v2", sha256=SHA2, deployment_id="d2"),
        previous=installed(),
        status=Status.SUCCESS,
        target=key("v2", SHA2, deploymentId="d2"),
        deployment_id="d2",
    )


def kinds(steps: list[Any]) -> list[str]:
    return [type(s).__name__ for s in steps]


CHAIN = ["Download", "Verify", "Install", "Activate"]

CASES: list[tuple[str, dict[str, Any], dict[str, FlowRecord], list[str]]] = [
    ("new flow installs", {"f": spec()}, {}, CHAIN),
    (
        "same version running, new target -> already-installed",
        {"f": spec(deploymentId="d2")},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())},
        ["SetStatus"],
    ),
    (
        "same version running and reported -> nothing",
        {"f": spec()},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())},
        [],
    ),
    (
        "upgrade v1 -> v2 is blue/green chain",
        {"f": spec("v2", SHA2)},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())},
        CHAIN,
    ),
    (
        "same version, different bytes reinstalls",
        {"f": spec("v1", SHA2)},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())},
        CHAIN,
    ),
    (
        "config change reinstalls",
        {"f": spec(config={"rate": 5})},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())},
        CHAIN,
    ),
    (
        "absent flow that is installed is removed",
        {},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())},
        ["Remove"],
    ),
    (
        "blank version removes",
        {"f": spec("")},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS)},
        ["Remove"],
    ),
    (
        "null version removes",
        {"f": spec(None)},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS)},
        ["Remove"],
    ),
    ("removal of a flow never seen: nothing", {"f": spec("")}, {}, []),
    (
        "removal of a failed, not installed flow is marked removed",
        {"f": spec("")},
        {"f": FlowRecord(status=Status.FAILURE, target=key())},
        ["SetStatus"],
    ),
    (
        "removed flow still listed blank: nothing",
        {"f": spec("")},
        {"f": FlowRecord(status=Status.REMOVED, target="remove", generation=5)},
        [],
    ),
    (
        "removed flow absent from a later generation is forgotten",
        {},
        {"f": FlowRecord(status=Status.REMOVED, target="remove", generation=4)},
        ["Forget"],
    ),
    (
        "removed flow absent in the same generation is kept",
        {},
        {"f": FlowRecord(status=Status.REMOVED, target="remove", generation=5)},
        [],
    ),
    ("device type mismatch -> noartifact", {"f": spec(deviceTypes=["x86"])}, {}, ["SetStatus"]),
    (
        "device type mismatch already reported -> nothing",
        {"f": spec(deviceTypes=["x86"])},
        {"f": FlowRecord(status=Status.NOARTIFACT, target=key(deviceTypes=["x86"]))},
        [],
    ),
    ("device type match installs", {"f": spec(deviceTypes=["x86", "rpi4"])}, {}, CHAIN),
    (
        "failed, retry due -> chain",
        {"f": spec(retries=2)},
        {
            "f": FlowRecord(
                status=Status.FAILURE, target=key(retries=2), attempts=1, next_retry_at=NOW - 1
            )
        },
        CHAIN,
    ),
    (
        "failed, backoff running -> wait",
        {"f": spec(retries=2)},
        {
            "f": FlowRecord(
                status=Status.FAILURE, target=key(retries=2), attempts=1, next_retry_at=NOW + 10
            )
        },
        ["Wait"],
    ),
    (
        "failed, retries spent -> nothing",
        {"f": spec(retries=2)},
        {
            "f": FlowRecord(
                status=Status.FAILURE, target=key(retries=2), attempts=3, next_retry_at=NOW - 1
            )
        },
        [],
    ),
    (
        "failed for an old target, new target -> chain",
        {"f": spec("v2", SHA2)},
        {"f": FlowRecord(status=Status.FAILURE, target=key(), attempts=9)},
        CHAIN,
    ),
    (
        "interrupted download (downloading) -> chain again",
        {"f": spec()},
        {"f": FlowRecord(status=Status.DOWNLOADING, target=key(), attempts=1, inflight="download")},
        CHAIN,
    ),
    (
        "broken flow, same version in a new deployment -> reinstall (fresh start)",
        {"f": spec(deploymentId="d2")},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key(), broken=True)},
        CHAIN,
    ),
    (
        "broken flow, same deployment again -> nothing (it stays broken)",
        {"f": spec()},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key(), broken=True)},
        [],
    ),
    (
        "aborted target that is desired again -> chain",
        {"f": spec()},
        {"f": FlowRecord(status=Status.ABORTED, target=key(), attempts=1)},
        CHAIN,
    ),
    # ------------------------------------------------------------ revert (issue 13)
    (
        "reverted target, same deployment -> nothing (not retried)",
        {"f": spec("v2", SHA2, retries=5)},
        {
            "f": FlowRecord(
                installed=installed(),
                status=Status.FAILURE,
                target=key("v2", SHA2, retries=5),
                attempts=1,
                no_retry=True,
                reverted=True,
            )
        },
        [],
    ),
    (
        "reverted target, new deploymentId -> chain",
        {"f": spec("v2", SHA2, deploymentId="d3")},
        {
            "f": FlowRecord(
                installed=installed(),
                status=Status.FAILURE,
                target=key("v2", SHA2, deploymentId="d2"),
                no_retry=True,
                reverted=True,
            )
        },
        CHAIN,
    ),
    (
        "failed its health window and stays installed -> nothing (not already-installed)",
        {"f": spec("v2", SHA2)},
        {
            "f": FlowRecord(
                installed=installed("v2", SHA2),
                status=Status.FAILURE,
                target=key("v2", SHA2),
                no_retry=True,
            )
        },
        [],
    ),
    # ------------------------------------------------------------ typed artifacts
    (
        "artifacts: one for this device type -> chain",
        {"f": typed(["gw-a"], ["rpi4"])},
        {},
        CHAIN,
    ),
    (
        "artifacts: none for this device type -> noartifact",
        {"f": typed(["gw-a"])},
        {},
        ["SetStatus"],
    ),
    # ------------------------------------------------------------ abort
    (
        "abort before the deployment reached the device -> aborted",
        {"f": spec("v2", SHA2, deploymentId="d2", abort=True)},
        {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())},
        ["SetStatus"],
    ),
    (
        "abort of an attempt that failed and waits to retry -> aborted",
        {"f": spec("v2", SHA2, deploymentId="d2", abort=True)},
        {
            "f": FlowRecord(
                status=Status.FAILURE,
                target=key("v2", SHA2, deploymentId="d2"),
                deployment_id="d2",
                next_retry_at=NOW + 5,
            )
        },
        ["SetStatus"],
    ),
    (
        "abort after activation without revert -> nothing (it stays)",
        {"f": spec("v2", SHA2, deploymentId="d2", abort=True)},
        {"f": activated_d2()},
        [],
    ),
    (
        "abort + revert after activation -> revert",
        {"f": spec("v2", SHA2, deploymentId="d2", abort=True, revert=True)},
        {"f": activated_d2()},
        ["Revert"],
    ),
    (
        "abort already carried out -> nothing",
        {"f": spec("v2", SHA2, deploymentId="d2", abort=True, revert=True)},
        {"f": FlowRecord(installed=installed(), status=Status.ABORTED, target="abort:d2:revert")},
        [],
    ),
]


@pytest.mark.parametrize(
    ("flows", "current", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan_table(
    flows: dict[str, Any], current: dict[str, FlowRecord], expected: list[str]
) -> None:
    steps = plan(desired(**flows), current, device_type="rpi4", now=NOW)
    assert kinds(steps) == expected


def test_plan_does_not_mutate_inputs() -> None:
    current = {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())}
    before = current["f"].model_dump()
    plan(desired(f=spec("v2", SHA2)), current, device_type="rpi4", now=NOW)
    assert current["f"].model_dump() == before


def test_chain_carries_the_target() -> None:
    steps = plan(
        desired(7, f=spec("v2", SHA2, deploymentId="dep-9", config={"a": 1})),
        {},
        device_type="rpi4",
        now=NOW,
    )
    assert [type(s) for s in steps] == [Download, Verify, Install, Activate]
    for step in steps:
        t = step.target  # type: ignore[union-attr]
        assert (t.flow_id, t.version, t.artifact.sha256, t.deployment_id, t.generation) == (
            "f",
            "v2",
            SHA2,
            "dep-9",
            7,
        )
        assert t.config == {"a": 1}


def test_invalid_entry_fails_that_flow_only_and_keeps_running_version() -> None:
    doc = parse_desired(
        b'{"generation": 2, "flows": {"bad": {"version": "v2", "artifact": '
        b'{"url": "http://h/x", "sha256": "nothex"}}, "good": {"version": "v1", "artifact": '
        b'{"url": "http://h/y", "sha256": "' + SHA1.encode() + b'"}}}}'
    )
    current = {"bad": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())}
    steps = plan(doc, current, device_type="rpi4", now=NOW)
    bad = [s for s in steps if getattr(s, "flow_id", None) == "bad"]
    assert len(bad) == 1
    assert isinstance(bad[0], SetStatus)
    assert bad[0].status == Status.FAILURE
    assert "sha256" in (bad[0].error or "")
    assert [type(s) for s in steps if not isinstance(s, SetStatus)] == [
        Download,
        Verify,
        Install,
        Activate,
    ]
    # Reported once: the same invalid entry does not produce the step again.
    current["bad"].status = Status.FAILURE
    current["bad"].target = bad[0].target
    assert not [
        s
        for s in plan(doc, current, device_type="rpi4", now=NOW)
        if getattr(s, "flow_id", None) == "bad"
    ]


def test_noartifact_names_device_type() -> None:
    (step,) = plan(desired(f=spec(deviceTypes=["x86"])), {}, device_type="rpi4", now=NOW)
    assert isinstance(step, SetStatus)
    assert step.status == Status.NOARTIFACT
    assert "rpi4" in (step.error or "")


def test_wait_carries_retry_time() -> None:
    current = {
        "f": FlowRecord(status=Status.FAILURE, target=key(), attempts=1, next_retry_at=NOW + 42)
    }
    (step,) = plan(desired(f=spec()), current, device_type="rpi4", now=NOW)
    assert step == Wait("f", NOW + 42)


def test_flows_planned_in_id_order_and_removal_carries_deployment() -> None:
    current = {"a": FlowRecord(installed=installed(), status=Status.SUCCESS)}
    steps = plan(
        desired(a=spec("", deploymentId="rm-1"), b=spec()), current, device_type="rpi4", now=NOW
    )
    assert steps[0] == Remove("a", 5, "rm-1")
    assert isinstance(steps[1], Download)


def test_no_desired_no_steps() -> None:
    assert plan(None, {"f": FlowRecord(installed=installed())}, device_type="x", now=NOW) == []


def test_forget_step_type() -> None:
    current = {"f": FlowRecord(status=Status.REMOVED, target="remove", generation=1)}
    assert plan(desired(2), current, device_type="x", now=NOW) == [Forget("f")]


def test_typed_artifacts_pick_this_device_types_artifact() -> None:
    entry = typed(["gw-a"], ["gw-b", "rpi4"])
    entry["artifact"] = {"url": "http://h/any.wasm", "sha256": SHA1}
    for device_type, sha in (("gw-a", "1" * 64), ("rpi4", "2" * 64), ("other", SHA1)):
        steps = plan(desired(f=entry), {}, device_type=device_type, now=NOW)
        assert isinstance(steps[0], Download)
        assert steps[0].target.artifact.sha256 == sha, device_type


@pytest.mark.parametrize(
    ("held_before", "expected"),
    [(None, ["Defer", "Wait"]), (NOW + 30, ["Wait"]), (NOW + 99, ["Defer", "Wait"])],
    ids=["first hold", "same hold already recorded", "the hold moved"],
)
def test_a_hold_defers_the_install(held_before: float | None, expected: list[str]) -> None:
    def hold(flow_id: str, rec: FlowRecord | None, now: float) -> Hold | None:
        return Hold(NOW + 30, "busy")

    current = {}
    if held_before is not None:
        current["f"] = FlowRecord(
            status=Status.PENDING, target=key(), error="busy", deferred_until=held_before
        )
    steps = plan(desired(f=spec()), current, device_type="rpi4", now=NOW, hold=hold)
    assert kinds(steps) == expected
    assert steps[-1] == Wait("f", NOW + 30)


def test_a_hold_never_holds_a_removal() -> None:
    current = {"f": FlowRecord(installed=installed(), status=Status.SUCCESS, target=key())}
    steps = plan(
        desired(f=spec("")),
        current,
        device_type="rpi4",
        now=NOW,
        hold=lambda _f, _r, now: Hold(now + 60, "closed"),
    )
    assert kinds(steps) == ["Remove"]
