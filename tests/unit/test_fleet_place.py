"""How a release lands in a flow's desired entry (the fleet tool; pure)."""

from __future__ import annotations

from typing import Any

from agent.fleet.controller import place
from agent.wire.protocol import FlowSpec


def typed(version: str, types: list[str], sha: str) -> dict[str, Any]:
    return {
        "version": version,
        "deploymentId": f"d-{version}-{sha[0]}",
        "artifacts": [{"deviceTypes": types, "url": f"http://h/{sha[0]}", "sha256": sha}],
    }


def test_a_second_device_type_is_added_to_the_same_version() -> None:
    a = place(None, typed("2.0", ["gw-a"], "a" * 64))
    ab = place(a, typed("2.0", ["gw-b"], "b" * 64))
    spec = FlowSpec.model_validate(ab)
    assert spec.artifact_for("gw-a").sha256 == "a" * 64  # type: ignore[union-attr]
    assert spec.artifact_for("gw-b").sha256 == "b" * 64  # type: ignore[union-attr]
    assert spec.artifact_for("gw-c") is None


def test_the_same_type_again_replaces_its_item_only() -> None:
    ab = place(place(None, typed("2.0", ["gw-a"], "a" * 64)), typed("2.0", ["gw-b"], "b" * 64))
    ab2 = place(ab, typed("2.0", ["gw-b", "gw-c"], "c" * 64))
    assert [i["sha256"][0] for i in ab2["artifacts"]] == ["a", "c"]


def test_another_version_or_a_plain_release_replaces_the_entry() -> None:
    a = place(None, typed("2.0", ["gw-a"], "a" * 64))
    assert place(a, typed("2.1", ["gw-b"], "b" * 64)) == typed("2.1", ["gw-b"], "b" * 64)
    plain = {"version": "2.0", "artifact": {"url": "http://h/p", "sha256": "d" * 64}}
    assert place(a, plain) == plain
    assert place({"version": "2.0", "abort": True, "deploymentId": "x"}, a) == a


def test_an_item_for_several_types_keeps_the_types_not_released_again() -> None:
    ab = place(None, typed("2.0", ["gw-a", "gw-b"], "a" * 64))
    merged = place(ab, typed("2.0", ["gw-b"], "b" * 64))
    spec = FlowSpec.model_validate(merged)
    assert spec.artifact_for("gw-a").sha256 == "a" * 64  # type: ignore[union-attr]
    assert spec.artifact_for("gw-b").sha256 == "b" * 64  # type: ignore[union-attr]
    assert merged["deploymentId"] == ab["deploymentId"]  # gw-a devices see no change


def test_an_entry_with_top_level_device_types_becomes_an_item() -> None:
    old = {
        "version": "2.0",
        "deviceTypes": ["gw-a"],
        "artifact": {"url": "http://h/a", "sha256": "a" * 64},
        "deploymentId": "d1",
    }
    merged = place(old, typed("2.0", ["gw-b"], "b" * 64))
    assert "deviceTypes" not in merged
    assert "artifact" not in merged
    spec = FlowSpec.model_validate(merged)
    assert spec.artifact_for("gw-a").sha256 == "a" * 64  # type: ignore[union-attr]
    assert spec.artifact_for("gw-b").sha256 == "b" * 64  # type: ignore[union-attr]
