"""Flow versions: uploads checked whole (fields, every file's bytes as an agent would
load them, the desired entry), then stored by content and recorded."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, BinaryIO

from pydantic import ValidationError
from sqlalchemy.orm import Session

from agent.server.context import ServerContext
from agent.server.db import artifacts as artifacts_repo
from agent.server.db import flow_versions as repo
from agent.server.db.models import Application, FlowVersion
from agent.server.errors import Conflict, TooLarge, Validation
from agent.server.text import text_problem, tree_problem
from agent.wire.bundle import BundleError, read_bundle
from agent.wire.protocol import ID_RULE, FlowSpec, is_valid_id

KINDS = ("wasm", "eea", "bundle")
MANIFEST_KEYS = ("triggers", "permissions", "config", "retries", "health")
#: Largest ``deviceTypes`` or ``manifest`` field (JSON text).
MAX_JSON_FIELD = 256 * 1024


def check_flow_id(flow_id: str) -> str:
    if not is_valid_id(flow_id):
        raise Validation(f"flowId: {ID_RULE}")
    return flow_id


def _json(name: str, raw: str | None) -> Any:
    if raw is None or raw == "":
        return None
    if len(raw) > MAX_JSON_FIELD:
        raise Validation(f"{name}: over {MAX_JSON_FIELD // 1024} KiB")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Validation(f"{name}: not JSON ({str(exc)[:100]})") from None
    problem = tree_problem(doc)
    if problem is not None:
        raise Validation(f"{name}: {problem}"[:300])
    return doc


def _device_types(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > 64:
        raise Validation(f"{name}: a list of 1 to 64 device types")
    if not all(isinstance(t, str) and 0 < len(t) <= 64 for t in value):
        raise Validation(f"{name}: device types are strings of 1 to 64 characters")
    return list(value)


def read_upload(fh: BinaryIO, limit: int) -> bytes:
    """The whole upload (in memory, to be validated before anything is stored)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    if size > limit:
        raise TooLarge(f"artifact larger than {limit} bytes")
    if size == 0:
        raise Validation("artifact: the file is empty")
    fh.seek(0)
    return fh.read(limit + 1)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or ["invalid"])[0][:200]


def _check_wasm(where: str, data: bytes) -> None:
    import wasmtime

    if not data.startswith(b"\0asm"):
        raise Validation(f"{where}: not a WebAssembly module (no \\0asm header)")
    try:
        # Default features, as the agent's engine. (A new Engine per upload costs
        # ~50 µs; one kept in a global would outlive
        # wasmtime's own teardown at interpreter exit.)
        wasmtime.Module.validate(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as exc:
        raise Validation(f"{where}: not a valid WebAssembly module: {_first_line(exc)}") from None


def check_artifact(kind: str, data: bytes, where: str = "artifact") -> None:
    """Validation unless ``data`` is an artifact of ``kind`` that an agent can load: a
    WebAssembly module wasmtime validates (wasm, eea), or a bundle whose layout,
    manifest, digests and modules check out."""
    if kind in ("wasm", "eea"):
        _check_wasm(where, data)
        return
    try:
        bundle = read_bundle(data)
    except BundleError as exc:
        raise Validation(f"{where}: not a valid bundle: {_first_line(exc)}") from None
    for name, module in bundle.modules.items():
        _check_wasm(f"{where}: module {name}", module)


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
    """Check everything (fields, every file's bytes, the desired entry a release
    will write, that the version is new), and only then store the files and the row:
    a refused upload leaves nothing behind."""
    check_flow_id(flow_id)
    check_version(version)
    if kind not in KINDS:
        raise Validation(f"kind: one of {', '.join(KINDS)}")
    if not files:
        raise Validation("artifact: a file is required (or artifacts with deviceTypes)")
    problem = text_problem(notes)
    if problem:
        raise Validation(f"notes: {problem}")
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
    with ctx.db.transaction() as s:
        if repo.get(s, app.id, flow_id, version) is not None:
            raise Conflict(f"flow {flow_id} has a version {version!r} already")
    blobs: list[bytes] = []
    items: list[dict[str, Any]] = []
    for i, (fh, types) in enumerate(zip(files, type_lists, strict=True)):
        data = read_upload(fh, ctx.cfg.max_upload)
        check_artifact(kind, data, f"artifacts[{i}]" if per_type else "artifact")
        item: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if types:
            item["deviceTypes"] = types
        blobs.append(data)
        items.append(item)
    check_entry(version, kind, items, man)
    for data in blobs:
        ctx.store.put_bytes(data, ctx.cfg.max_upload)
    for attempt in (1, 2):
        try:
            with ctx.db.transaction() as s:
                fv = repo.create(s, app.id, flow_id, version, kind, items, man, notes[:4096])
                artifacts_repo.add_for_flow_version(s, fv)
                return fv
        except Conflict:
            # The insert of an artifact's blob row can lose a race with another
            # upload of the same bytes (PostgreSQL): that is no conflict of versions.
            with ctx.db.transaction() as s:
                taken = repo.get(s, app.id, flow_id, version) is not None
            if taken or attempt == 2:
                raise
    raise AssertionError("unreachable")


def check_entry(
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


def check_version(version: str) -> str:
    if (
        not version
        or len(version) > 128
        or any(ord(c) < 32 or c == "\x7f" for c in version)
        or text_problem(version)
    ):
        raise Validation("version: 1 to 128 printable characters")
    return version


def _overlap(items: list[dict[str, Any]], device_types: list[str]) -> dict[str, Any] | None:
    wanted = set(device_types)
    for item in items:
        types = set(item.get("deviceTypes") or ())
        if not types or types & wanted:
            return item
    return None


def plan_item(
    s: Session,
    app_id: str,
    flow_id: str,
    version: str,
    kind: str,
    item: dict[str, Any],
    *,
    lock: bool = False,
) -> FlowVersion | None:
    """Check that a payload of ``kind`` for ``item["deviceTypes"]`` can become part of
    the version (a new version, or a new item of an existing one of the same kind
    that serves none of those device types yet); the existing version, if any
    (``lock``: its row locked, as :func:`add_item` needs)."""
    fv = repo.get(s, app_id, flow_id, version, lock=lock)
    items = [item]
    manifest = None
    if fv is not None:
        if fv.kind != kind:
            raise Conflict(
                f"version {version!r} of flow {flow_id} is of kind {fv.kind}, not {kind}"
            )
        taken = _overlap(list(fv.artifacts), list(item["deviceTypes"]))
        if taken is not None:
            served = ", ".join(taken.get("deviceTypes") or ["every device type"])
            raise Conflict(
                f"version {version!r} of flow {flow_id} has a payload for {served} already"
            )
        items = [*fv.artifacts, item]
        manifest = fv.manifest
    check_entry(version, kind, items, manifest)
    return fv


def add_item(
    s: Session,
    app_id: str,
    flow_id: str,
    version: str,
    kind: str,
    item: dict[str, Any],
    notes: str,
) -> FlowVersion:
    """Create the version with ``item``, or add ``item`` to the existing one
    (checked as :func:`plan_item` does), in the caller's transaction. The existing
    version's row is locked first and read afresh: two uploads extending one version
    at once (PostgreSQL) each add their item, neither writes over the other's. (Two
    creating it at once: one insert fails, a conflict the caller tries again.)"""
    fv = plan_item(s, app_id, flow_id, version, kind, item, lock=True)
    if fv is None:
        return repo.create(s, app_id, flow_id, version, kind, [item], None, notes[:4096])
    repo.set_artifacts(s, fv, [*fv.artifacts, item])
    return fv


def remove_item(s: Session, fv: FlowVersion, sha256: str, device_types: list[str]) -> str:
    """Take the item ``sha256`` for ``device_types`` out of the version (its row read
    with ``lock``, see :func:`add_item`): ``"removed"``,
    ``"deleted"`` (it was the last item: the version is gone too), ``"kept"`` (the
    last item of a version a deployment record still wants: both stay), or
    ``"absent"``."""
    items = list(fv.artifacts)
    rest = [
        i
        for i in items
        if not (
            i["sha256"] == sha256 and sorted(i.get("deviceTypes") or []) == sorted(device_types)
        )
    ]
    if len(rest) == len(items):
        return "absent"
    if rest:
        repo.set_artifacts(s, fv, rest)
        return "removed"
    if repo.is_desired(s, fv.application_id, fv.flow_id, fv.version):
        return "kept"
    repo.delete(s, fv)
    return "deleted"


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
