"""Flow versions: uploads checked and stored by content, then recorded."""

from __future__ import annotations

import json
from typing import Any, BinaryIO

from pydantic import ValidationError

from agent.server.context import ServerContext
from agent.server.db import flow_versions as repo
from agent.server.db.models import Application, FlowVersion
from agent.server.errors import Validation
from agent.wire.protocol import FlowSpec, is_valid_id

KINDS = ("wasm", "eea", "bundle")
_MAGIC = {"wasm": b"\0asm", "eea": b"\0asm", "bundle": b"\x1f\x8b"}
MANIFEST_KEYS = ("triggers", "permissions", "config", "retries", "health")


def _json(name: str, raw: str | None) -> Any:
    if raw is None or raw == "":
        return None
    if len(raw) > 256 * 1024:
        raise Validation(f"{name}: over 256 KiB")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise Validation(f"{name}: not JSON ({exc})") from None


def _device_types(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > 64:
        raise Validation(f"{name}: a list of 1 to 64 device types")
    if not all(isinstance(t, str) and 0 < len(t) <= 64 for t in value):
        raise Validation(f"{name}: device types are strings of 1 to 64 characters")
    return list(value)


def create(
    ctx: ServerContext,
    app: Application,
    flow_id: str,
    *,
    version: str,
    kind: str,
    files: list[BinaryIO],
    device_types: str | None,
    manifest: str | None,
    notes: str,
    per_type: bool,
) -> FlowVersion:
    if not is_valid_id(flow_id):
        raise Validation("flowId: [A-Za-z0-9._-], 1 to 64 characters")
    if not version or len(version) > 128 or any(ord(c) < 32 for c in version):
        raise Validation("version: 1 to 128 printable characters")
    if kind not in KINDS:
        raise Validation(f"kind: one of {', '.join(KINDS)}")
    if not files:
        raise Validation("artifact: a file is required (or artifacts with deviceTypes)")
    types_doc = _json("deviceTypes", device_types)
    man = _json("manifest", manifest)
    if man is not None and (not isinstance(man, dict) or not set(man) <= set(MANIFEST_KEYS)):
        raise Validation(f"manifest: an object with {', '.join(MANIFEST_KEYS)}")
    if per_type:
        if not isinstance(types_doc, list) or len(types_doc) != len(files):
            raise Validation("deviceTypes: one list of device types per file of artifacts")
        type_lists: list[list[str] | None] = [
            _device_types(f"deviceTypes[{i}]", t) for i, t in enumerate(types_doc)
        ]
    else:
        if len(files) != 1:
            raise Validation("artifact: one file (use artifacts for one per device type)")
        type_lists = [_device_types("deviceTypes", types_doc) if types_doc is not None else None]
    items: list[dict[str, Any]] = []
    for fh, types in zip(files, type_lists, strict=True):
        head = fh.read(4)
        if not head.startswith(_MAGIC[kind]):
            raise Validation(f"artifact: not a {kind} artifact (its first bytes do not match)")
        fh.seek(0)
        stored = ctx.store.put(fh, ctx.cfg.max_upload)
        item: dict[str, Any] = {"sha256": stored.sha256, "size": stored.size}
        if types:
            item["deviceTypes"] = types
        items.append(item)
    _check_entry(version, kind, items, man)
    with ctx.db.transaction() as s:
        return repo.create(s, app.id, flow_id, version, kind, items, man, notes[:4096])


def _check_entry(
    version: str, kind: str, items: list[dict[str, Any]], manifest: dict[str, Any] | None
) -> None:
    """The desired entry a release will write must be one the agent accepts."""
    fake = "http://server.invalid/a"
    entry: dict[str, Any] = {"version": version, **(manifest or {})}
    typed = [i for i in items if i.get("deviceTypes")]
    untyped = [i for i in items if not i.get("deviceTypes")]
    if untyped:
        entry["artifact"] = {"url": fake, "sha256": untyped[0]["sha256"], "kind": kind}
    if typed:
        entry["artifacts"] = [
            {"url": fake, "sha256": i["sha256"], "kind": kind, "deviceTypes": i["deviceTypes"]}
            for i in typed
        ]
    try:
        FlowSpec.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise Validation(f"manifest: {where}: {err['msg']}") from None


def view(fv: FlowVersion) -> dict[str, Any]:
    return {
        "id": fv.id,
        "applicationId": fv.application_id,
        "flowId": fv.flow_id,
        "version": fv.version,
        "kind": fv.kind,
        "artifacts": fv.artifacts,
        "sha256": fv.artifacts[0]["sha256"],
        "size": fv.artifacts[0]["size"],
        "manifest": fv.manifest,
        "notes": fv.notes,
        "creationDate": fv.created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
