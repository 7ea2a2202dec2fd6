"""Hostile input, without I/O: bounded JSON, ids, paths, redaction, and properties.

The property tests say, for any JSON value (and any bytes): parsing a desired
document or a command yields a valid model or a clean rejection, never another
exception; and whatever is accepted can be persisted and read back unchanged.
The end-to-end scenarios (real Mosquitto, the agent as a process) are in
test_hostile_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from common import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.device._fsutil import child_path
from agent.device.artifacts import ArtifactStore
from agent.device.commands import Command, MalformedCommand, parse_command
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.state import FlowRecord, Installed, PersistedState, StateStore, serialise
from agent.errors import ArtifactError, ProtocolError, UnsafePath
from agent.wire._boundedjson import MAX_DEPTH, load
from agent.wire.bundle import BundleError, read_bundle
from agent.wire.protocol import (
    MAX_GENERATION,
    Event,
    Status,
    dump,
    is_valid_id,
    parse_desired,
)
from agent.wire.redact import redact_text, redact_url

SHA = "a" * 64
SECRET = "SECRET"


def doc(generation: Any = 1, **flows: Any) -> bytes:
    return json.dumps({"generation": generation, "flows": flows}).encode()


def entry(**over: Any) -> dict[str, Any]:
    return {"version": "v1", "artifact": {"url": "http://h/f.wasm", "sha256": SHA}, **over}


# ------------------------------------------------------------------ bounded JSON
def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"[" * 100_000, "nested deeper than 32"),
        (nested(MAX_DEPTH + 1).encode(), "nested deeper than 32"),
        (b"1" * 4301, "integer of 4301 digits"),
        (b"-" + b"9" * 21, "integer of 21 digits"),
        (b"1" * 5000, "integer of 5000 digits"),
        (b"NaN", "NaN is not JSON"),
        (b"Infinity", "Infinity is not JSON"),
        (b"[-Infinity]", "-Infinity is not JSON"),
        (b"1e400", "out of range"),
        (b"0." + b"1" * 80, "number literal of 82 characters"),
        (b'"\\udfff"', "lone UTF-16 surrogate"),
        (b'{"\\ud800": 1}', "object key holds a lone UTF-16 surrogate"),
        (b'["ok", {"a": ["\\udc00x"]}]', "lone UTF-16 surrogate"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
        ('{"a": 1}'.encode("utf-16-le"), "not valid JSON"),  # NULs between the ASCII
        ('{"a": 1}'.encode("utf-32"), "not UTF-8"),
        (b"\xc3\x28", "not UTF-8"),
        (b"x" * 2000, "over the 1024 limit"),
    ],
)
def test_bounded_json_refuses_cleanly(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=r"^thing ") as info:
        load(payload, what="thing", max_bytes=1024 if len(payload) == 2000 else 1 << 20)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        nested(MAX_DEPTH).encode(),
        b"9" * 20,
        b"-" + b"9" * 20,
        b"1.5e300",
        b'"\\ud83d\\ude00"',
        "\ufeff{}".encode(),
        b'"\\u0000"',
    ],
)
def test_bounded_json_accepts_the_edges(payload: bytes) -> None:
    value = load(payload, what="thing", max_bytes=1 << 20)
    json.dumps(value).encode()  # and it can be written out again


# ------------------------------------------------------------------ the five defects, parsed
def test_lone_surrogate_or_deep_config_rejects_the_document() -> None:
    with pytest.raises(ProtocolError, match="surrogate"):
        parse_desired(
            b'{"generation": 1, "flows": {"f": {"version": "v1", "artifact": '
            b'{"url": "http://h/f", "sha256": "' + SHA.encode() + b'"}, '
            b'"config": {"k": "\\udfff"}}}}'
        )
    deep: Any = 1
    for _ in range(900):
        deep = {"d": deep}
    with pytest.raises(ProtocolError, match="nested deeper"):
        parse_desired(doc(f=entry(config=deep)))


@pytest.mark.parametrize("flow_id", [".", "..", "...", "a/b", "", "x" * 65, "é", "a\x00"])
def test_ids_that_could_be_paths_reject_the_document(flow_id: str) -> None:
    assert not is_valid_id(flow_id)
    with pytest.raises(ProtocolError, match="is not an id"):
        parse_desired(json.dumps({"generation": 1, "flows": {flow_id: None}}).encode())


@pytest.mark.parametrize("flow_id", ["a", ".hidden", "a..b", "v1.2", "-", "_", "x" * 64])
def test_ordinary_ids_still_pass(flow_id: str) -> None:
    assert is_valid_id(flow_id)
    assert flow_id in parse_desired(doc(**{flow_id: entry()})).flows


@pytest.mark.parametrize("deployment_id", [".", "..", "....."])
def test_dot_deployment_ids_fail_the_flow(deployment_id: str) -> None:
    desired = parse_desired(doc(f=entry(deploymentId=deployment_id)))
    assert "deploymentId" in desired.invalid["f"]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://h/a b.wasm", "white space or a control character"),
        ("mqtt:edge/a\x00b", "white space or a control character"),
        ("http://h/x\r\nHost: evil", "white space or a control character"),
        ("http://h/x\x85", "white space or a control character"),
        ("mqtt:edge/#", "no + or # wildcards"),
        ("mqtt:edge/+/x", "no + or # wildcards"),
    ],
)
def test_artifact_urls_that_cannot_be_fetched_fail_the_flow(url: str, needle: str) -> None:
    desired = parse_desired(doc(f=entry(artifact={"url": url, "sha256": SHA})))
    assert needle in desired.invalid["f"]


@pytest.mark.parametrize(
    ("literal", "ok"),
    [
        ("0", True),
        (str(MAX_GENERATION), True),
        (str(MAX_GENERATION + 1), False),
        (str(2**64), False),
        ("-1", False),
        ("1" + "0" * 4299, False),
        ("1" + "0" * 4300, False),
        ("9" * 5000, False),
        ("1.0", False),
        ("1e3", False),
    ],
    ids=lambda v: v if isinstance(v, bool) else f"{len(v)}-chars",
)
def test_generation_bounds(literal: str, ok: bool) -> None:
    payload = b'{"generation": ' + literal.encode() + b"}"
    if ok:
        assert parse_desired(payload).generation == int(literal)
    else:
        with pytest.raises(ProtocolError, match=r"generation|integer of"):
            parse_desired(payload)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b'{"name": "x", "time": NaN}', "NaN is not JSON"),
        (b'{"name": "x", "time": Infinity}', "Infinity is not JSON"),
        (b'{"name": "x", "time": 1e999}', "out of range"),
        ('{"name": "agent.ping"}'.encode("utf-16"), "not UTF-8"),
        (b'{"name": "x", "payload": ' + nested(100_000).encode() + b"}", "nested deeper"),
        (b'{"name": "x", "id": ' + b"9" * 5000 + b"}", "integer of 5000 digits"),
        (b'{"name": "\\udfff"}', "surrogate"),
        (b"[]", "command: Input should be"),
        (b'{"name": ""}', "name:"),
    ],
)
def test_malformed_commands(payload: bytes, needle: str) -> None:
    with pytest.raises(MalformedCommand, match=r"^malformed command: ") as info:
        parse_command(payload)
    assert needle in str(info.value)


def test_malformed_command_echoes_a_bounded_id() -> None:
    with pytest.raises(MalformedCommand) as info:
        parse_command(json.dumps({"id": "r" * 1000, "name": 5}).encode())
    assert info.value.echo == {"id": "r" * 256, "name": 5}


# ------------------------------------------------------------------ paths
@pytest.mark.parametrize("name", ["", ".", "..", "...", "a/b", "../x", "a\\b", "a\x00b", "x" * 256])
def test_child_path_refuses(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePath):
        child_path(tmp_path, name)


def test_child_path_refuses_a_symlink_and_allows_a_plain_name(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(UnsafePath, match="symlink"):
        child_path(tmp_path, "link")
    assert child_path(tmp_path, "flow.1") == tmp_path / "flow.1"


def test_every_path_from_input_goes_through_the_check(tmp_path: Path) -> None:
    """Each place the agent derives a path from input refuses a name that would leave
    its directory: flow directories (storage, /data, EEA storage), artifact digests,
    bundle members. Deployment ids never become paths (only topic levels)."""
    from agent.device.runtime.flows import FlowHost

    host = FlowHost.__new__(FlowHost)  # only the path rule is exercised
    host.flows_dir = tmp_path / "flows"
    host.flows_dir.mkdir()
    for bad in (".", "..", "../x", "a/b"):
        with pytest.raises(UnsafePath):
            host._flow_dir(bad)
    (host.flows_dir / "evil").symlink_to(tmp_path)
    with pytest.raises(UnsafePath):
        host._flow_dir("evil")  # a /data or storage dir through a planted symlink

    store = ArtifactStore(tmp_path / "artifacts")
    for bad in ("../" + SHA[3:], "..", SHA[:63] + "/"):
        with pytest.raises(ArtifactError):
            store.path(bad)
        with pytest.raises(ArtifactError):
            store.partial_path(bad)

    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.wasm")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\0asm"))
    with pytest.raises(BundleError, match="unsafe path"):
        read_bundle(raw.getvalue())

    # And no other join: every `a / b` in agent/ whose right side is not a literal is
    # one of these (reviewed), so a new path built from input fails here until it
    # goes through child_path.
    import ast

    reviewed = {
        ("_fsutil.py", "parent / name"),  # child_path itself
        ("state.py", "state_dir / STATE_FILE"),
        ("sandbox.py", "self.cache_dir / f'{key}.{tag}.cwasm'"),  # key: digests
        ("sim.py", "self.root / device_id(index)"),  # generated ids
        # `edge-agent bundle build DIR`: the operator's own files, on their machine
        ("bundle.py", "src / str(mod.get('file', ''))"),
        ("bundle.py", "src / n"),
        ("bundle.py", "src / mod.file"),
        # arithmetic
        ("sim.py", "(rss_bytes() - self.rss_before) / max(1, len(self.agents))"),
        ("runner.py", "(loop.time() - start) / period"),
        ("bundle.py", "total / len(data)"),
        ("outbox.py", "len(batch) / lim.drain_rate"),
    }
    for source in (REPO / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Div)
                and not isinstance(node.right, ast.Constant)
            ):
                text = ast.unparse(node)
                if any(c.isalpha() for c in ast.unparse(node.right)):
                    assert (source.name, text) in reviewed, (
                        f"{source.name}:{node.lineno}: {text}: build paths from input "
                        "with agent.device._fsutil.child_path"
                    )


def test_state_from_an_older_agent_with_dot_ids_is_dropped_not_touched() -> None:
    state = PersistedState(
        flows={"..": FlowRecord(), ".": FlowRecord(), "ok": FlowRecord()},
        generation=10**4200,
        desired_raw='{"generation": 1}',
    )
    notes = FlowRecords(state).recover()
    assert set(state.flows) == {"ok"}
    assert state.generation is None
    assert state.desired_raw is None
    assert any("out of bounds" in n for n in notes)


# ------------------------------------------------------------------ redaction
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"http://user:{SECRET}@host/x.wasm?token={SECRET}", "http://host/x.wasm?…"),
        (f"https://host/x#{SECRET}", "https://host/x?…"),
        (f"http://u:{SECRET[:2]}/{SECRET[2:]}@h/x", "http://h/x"),
        (f"http://{SECRET}@[::1]:80/p", "http://[::1]:80/p"),
        ("http://host:8080/a/b.wasm", "http://host:8080/a/b.wasm"),
        ("mqtt:edge/artifacts/x", "mqtt:edge/artifacts/x"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_and_wire_messages() -> None:
    text = f"Client error '404' for url 'http://u:{SECRET}@h/x?sig={SECRET}' (GET)"
    assert SECRET not in redact_text(text)
    event = Event(flowId="f", status=Status.FAILURE, error=text, time="t")
    wire = dump(event)
    assert SECRET.encode() not in wire
    assert json.loads(wire)["error"].startswith("Client error '404' for url 'http://h/x?…'")
    clean = Event(flowId="f", status=Status.SUCCESS, time="t")
    assert dump(clean) == clean.model_dump_json(by_alias=True).encode()  # fast path intact


@given(st.text(), st.text(alphabet="abc:/@?#", max_size=30))
def test_redact_never_raises_and_drops_userinfo(prefix: str, tail: str) -> None:
    url = f"https://user:{SECRET}@host/{tail}"
    out = redact_text(f"{prefix} {url}")
    assert f":{SECRET}@" not in out


# ------------------------------------------------------------------ properties
# Text with lone surrogates and every other code point: what JSON can carry.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
json_scalars = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**30), max_value=10**30)
    | any_text
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)


json_values = st.recursive(json_scalars, _containers, max_leaves=30)
ids = st.sampled_from([".", "..", "...", "f", "a.b", "x" * 65, "a/b", "", "ok-1"]) | any_text
hostile_urls = st.sampled_from(
    [
        f"http://u:{SECRET}@h/x.wasm?t={SECRET}",
        "http://h/x.wasm",
        "mqtt:edge/a",
        "ftp://x",
        "file:///tmp/a.wasm",
        "mqtt:",
        "http://h/x\udfff",
    ]
)
entries = (
    st.fixed_dictionaries(
        {},
        optional={
            "version": st.one_of(any_text, st.none(), st.integers()),
            "artifact": st.fixed_dictionaries(
                {"url": hostile_urls, "sha256": st.sampled_from([SHA, "xyz", SHA.upper()])},
                optional={
                    "size": st.integers(-2, 2**70),
                    "kind": st.sampled_from(["wasm", "eea", "bundle", "elf"]),
                },
            ),
            "config": json_values,
            "retries": st.integers(-5, 200),
            "deploymentId": st.sampled_from(["d1", "..", "a/b", "x" * 200]) | any_text,
            "deviceTypes": st.lists(any_text, max_size=3),
        },
    )
    | json_values
)
documents = st.fixed_dictionaries(
    {"generation": st.integers(-5, 2**70) | json_scalars},
    optional={"flows": st.dictionaries(ids, entries, max_size=4) | json_values},
)


def _encodings(value: Any) -> list[bytes]:
    try:
        text = json.dumps(value)  # NaN/Infinity become the non-JSON literals on purpose
    except (ValueError, RecursionError):
        return []
    return [text.encode(), json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")]


def _persist_and_reload(tmp: Path, payload: bytes) -> None:
    desired = parse_desired(payload)
    state = PersistedState(desired_raw=payload.decode("utf-8-sig"), generation=desired.generation)
    for flow_id, spec in desired.flows.items():
        installed = None
        if spec.artifact is not None:
            installed = Installed(
                version=spec.version or "",
                sha256=spec.artifact.sha256,
                config=spec.config,
                deployment_id=spec.deployment_id,
            )
        state.flows[flow_id] = FlowRecord(
            installed=installed, desired_version=spec.version, deployment_id=spec.deployment_id
        )
    for flow_id, reason in desired.invalid.items():
        state.flows[flow_id] = FlowRecord(status=Status.FAILURE, error=reason)
    store = StateStore(tmp)
    store.save(state)
    again = store.load()
    assert again == state
    assert parse_desired(again.desired_raw.encode()) == desired  # type: ignore[union-attr]


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(documents)
def test_any_desired_document_parses_or_is_rejected_and_persists(
    tmp_path: Path, value: dict[str, Any]
) -> None:
    for payload in _encodings(value):
        try:
            parse_desired(payload)
        except ProtocolError as exc:
            reason = str(exc)
        else:
            _persist_and_reload(tmp_path, payload)
            continue
        assert "\n" not in reason


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_as_desired_or_command(value: Any) -> None:
    for payload in _encodings(value):
        with contextlib.suppress(ProtocolError):
            parse_desired(payload)
        try:
            cmd = parse_command(payload)
        except MalformedCommand:
            continue
        assert isinstance(cmd, Command)
        json.dumps({"id": cmd.id, "name": cmd.name, "result": cmd.payload}).encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_desired(payload)
    with contextlib.suppress(MalformedCommand):
        parse_command(payload)


def test_a_state_that_cannot_be_serialised_is_a_state_error(tmp_path: Path) -> None:
    """The last line: the file keeps the last good state, the caller gets StateError."""
    from agent.errors import StateError

    store = StateStore(tmp_path)
    good = PersistedState(generation=1)
    store.save(good)
    bad = PersistedState(generation=2, flows={"f": FlowRecord(error="\udfff")})
    with pytest.raises(StateError, match="cannot serialise the state"):
        serialise(bad)
    with pytest.raises(StateError):
        store.save(bad)
    assert store.load() == good
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
