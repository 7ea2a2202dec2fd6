"""Wire protocol v1 models: parsing desired documents, schemas, serialisation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.errors import ProtocolError
from agent.wire.protocol import ID_PATTERN, DeviceStatus, Status, dump, is_valid_id, parse_desired

SHA = "ab" * 32


def doc(**flows: object) -> bytes:
    return json.dumps({"generation": 3, "flows": flows}).encode()


def entry(**over: object) -> dict[str, object]:
    e: dict[str, object] = {"version": "v1", "artifact": {"url": "http://h/f.wasm", "sha256": SHA}}
    e.update(over)
    return e


def test_full_document_parses() -> None:
    d = parse_desired(
        doc(
            f1=entry(
                deviceTypes=["rpi4"],
                config={"k": [1]},
                retries=4,
                deploymentId="dep-1",
                artifact={
                    "url": "mqtt:edge/artifacts/x",
                    "sha256": SHA.upper(),
                    "size": 10,
                    "kind": "wasm",
                },
            )
        )
    )
    f = d.flows["f1"]
    assert d.generation == 3
    assert f.version == "v1"
    assert f.artifact is not None
    assert f.artifact.sha256 == SHA  # normalised to lower case
    assert (f.device_types, f.config, f.retries, f.deployment_id) == (
        ["rpi4"],
        {"k": [1]},
        4,
        "dep-1",
    )


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ('{"generation": 1}'.encode("utf-16"), "not UTF-8"),
        ('{"generation": 1}'.encode("utf-32"), "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"flows": {}}', "generation: Field required"),
        (b'{"generation": "7"}', "generation: Input should be a valid integer"),
        (b'{"generation": 1.5}', "generation"),
        (b'{"generation": -1}', "generation"),
        (b'{"generation": 1, "flows": []}', "flows"),
        (b'{"generation": 1, "flows": {"bad id!": {}}}', "flow id 'bad id!'"),
        (b'{"generation": 1, "flows": {"' + b"x" * 65 + b'": {}}}', "is not an id"),
    ],
)
def test_whole_document_rejections(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_desired(payload)
    assert needle in str(info.value)


def test_oversized_document_rejected() -> None:
    with pytest.raises(ProtocolError, match="over the 1024 limit"):
        parse_desired(b" " * 2000, max_bytes=1024)


@pytest.mark.parametrize(
    ("flow", "needle"),
    [
        (entry(artifact={"url": "http://h/f", "sha256": "xyz"}), "artifact.sha256"),
        (entry(artifact={"url": "ftp://h/f", "sha256": SHA}), "unsupported URL scheme"),
        (entry(artifact={"url": "mqtt:", "sha256": SHA}), "needs a topic"),
        (entry(artifact={"url": "http://h/f", "sha256": SHA, "kind": "elf"}), "artifact.kind"),
        (entry(artifact={"url": "http://h/f", "sha256": SHA, "size": 0}), "artifact.size"),
        ({"version": "v1"}, "needs an artifact"),
        (entry(retries=-1), "retries"),
        (entry(retries="many"), "retries"),
        (entry(unknown=1), "unknown"),
        (entry(deploymentId="rel/1"), "deploymentId"),
        (entry(deploymentId="rel+#"), "deploymentId"),
        ("a string", "invalid flow entry"),
        (entry(health={"window": -1}), "health.window"),
        (entry(health={"window": 86_401}), "health.window"),
        (entry(health={"window": 5, "after": 1}), "health.after"),
        (entry(health={"revert": "yes"}), "health.revert"),
        (entry(abort=True), "deploymentId is required"),
        (entry(deploymentId="d", abort="true"), "abort"),
        (entry(deploymentId="d", revert=True), "revert goes with abort"),
        (
            {"version": "v1", "artifacts": [{"url": "http://h/f", "sha256": SHA}]},
            "artifacts.0.deviceTypes",
        ),
        (
            {
                "version": "v1",
                "artifacts": [{"deviceTypes": [], "url": "http://h/f", "sha256": SHA}],
            },
            "artifacts.0.deviceTypes",
        ),
        ({"version": "v1", "artifacts": []}, "needs an artifact"),
    ],
)
def test_flow_entry_rejections_are_per_flow(flow: object, needle: str) -> None:
    d = parse_desired(doc(bad=flow, good=entry()))
    assert "good" in d.flows
    assert "bad" not in d.flows
    assert needle in d.invalid["bad"]


@pytest.mark.parametrize("flow", [None, {"version": None}, {"version": ""}, {}])
def test_removal_forms(flow: object) -> None:
    d = parse_desired(doc(f=flow))
    assert d.flows["f"].is_removal


def test_ids() -> None:
    assert is_valid_id("sim-0001.a_b")
    assert not is_valid_id("")
    assert not is_valid_id("a/b")
    assert not is_valid_id("a" * 65)


def test_status_vocabulary_matches_mender_plus_removed() -> None:
    assert {s.value for s in Status} == {
        "pending",
        "downloading",
        "installing",
        "success",
        "failure",
        "already-installed",
        "noartifact",
        "aborted",
        "removed",
    }


def test_offline_status_is_minimal() -> None:
    assert json.loads(dump(DeviceStatus(online=False), exclude_none=True)) == {"online": False}


def test_schema_command_prints_every_wire_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "schema"], capture_output=True, check=True, text=True
    ).stdout
    schemas = json.loads(out)
    assert set(schemas) == {"desired", "state", "event", "status", "deployment-log"}
    assert "generation" in schemas["desired"]["properties"]
    assert "deviceId" in schemas["state"]["properties"]
    assert "flowId" in schemas["event"]["properties"]


def test_desired_schema_matches_the_parser() -> None:
    from agent.wire.protocol import json_schemas

    schema = json_schemas()["desired"]
    assert set(schema["properties"]) == {"generation", "flows"}
    assert schema.get("additionalProperties") is not False  # unknown keys are ignored
    # a null entry (removal) is allowed by the schema as by the parser
    flows = schema["properties"]["flows"]["patternProperties"]
    assert list(flows) == [ID_PATTERN]  # flow ids are validated too
    assert {"type": "null"} in flows[ID_PATTERN]["anyOf"]
    assert (
        parse_desired(b'{"generation": 1, "extra": true, "flows": {"f": null}}')
        .flows["f"]
        .is_removal
    )


def test_utf8_bom_is_tolerated() -> None:
    assert parse_desired(b'\xef\xbb\xbf{"generation": 3}').generation == 3


def test_typed_artifacts_health_and_abort_parse() -> None:
    doc = parse_desired(
        json.dumps(
            {
                "generation": 1,
                "flows": {
                    "f": {
                        "version": "v2",
                        "artifacts": [
                            {"deviceTypes": ["gw-a"], "url": "http://h/a", "sha256": SHA},
                            {"deviceTypes": ["gw-b"], "url": "http://h/b", "sha256": "b" * 64},
                        ],
                        "health": {"window": 2.5},
                        "deploymentId": "d2",
                        "abort": True,
                        "revert": True,
                    }
                },
            }
        ).encode()
    )
    spec = doc.flows["f"]
    assert spec.health is not None
    assert (spec.health.window, spec.health.revert) == (2.5, None)
    assert (spec.abort, spec.revert) == (True, True)
    assert spec.artifact_for("gw-b") is not None
    assert spec.artifact_for("gw-b").url == "http://h/b"  # type: ignore[union-attr]
    assert spec.artifact_for("gw-c") is None
    assert [a.sha256 for a in spec.all_artifacts()] == [SHA, "b" * 64]
