"""Mender's artifact repository over the flow versions: one repository, two views.

An uploaded (or generated) ``.mender`` file is read and checked whole
(:mod:`agent.server.mender_artifact`), its payload is checked as a flow version
upload's file is (:func:`agent.server.service.flow_versions.check_artifact`), and
only then are the ``.mender`` file (for download links) and the payload (what
devices get) stored by content, and, in one transaction, the artifact row written
and the payload made an item of a flow version:

- flow id: the software name (the ``<x>.<name>.version`` key of the payload's
  ``artifact_provides``, as ``mender-artifact --software-name`` writes it);
  version: its value. Without one (or when the name is the payload type, what
  ``mender-artifact`` writes by default), the flow id is the payload file's stem and
  the version the artifact name.
- kind: by payload type, :data:`TYPE_KINDS`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from agent.server import mender_artifact
from agent.server.artifact_store import artifact_url
from agent.server.context import ServerContext
from agent.server.db import applications as apps_repo
from agent.server.db import artifacts as repo
from agent.server.db import blobs
from agent.server.db import flow_versions as fv_repo
from agent.server.db.models import Application, Artifact, utcnow
from agent.server.errors import Conflict, NotFound, TooLarge, Unprocessable, Validation
from agent.server.service import flow_versions
from agent.server.text import text_problem
from agent.wire.protocol import ID_RULE, is_valid_id

#: A payload type (the update module's name) and the kind of flow it carries.
TYPE_KINDS = {"wasm-flow": "wasm", "eea-flow": "eea", "flow-bundle": "bundle"}
MAX_DESCRIPTION = 4096
#: Where a Mender artifact is found (the ``Location`` of an upload).
LOCATION = "/api/management/v1/deployments/artifacts/{id}"


def check_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION:
        raise Validation(f"description: longer than {MAX_DESCRIPTION} characters")
    problem = text_problem(description)
    if problem:
        raise Validation(f"description: {problem}")
    return description


def kind_of(payload_type: str) -> str:
    kind = TYPE_KINDS.get(payload_type)
    if kind is None:
        raise Validation(
            f"payload type {payload_type[:64]!r} is not one this server deploys: "
            + ", ".join(f"{t} ({k})" for t, k in TYPE_KINDS.items())
        )
    return kind


def flow_of(art: mender_artifact.MenderArtifact) -> tuple[str, str]:
    """The flow id and version the artifact's payload becomes (see the module)."""
    named = {}
    for key, value in art.provides.items():
        _, sep, rest = key.partition(".")
        if sep and rest.endswith(".version") and len(rest) > len(".version"):
            name = rest[: -len(".version")]
            if name != art.payload_type:
                named[name] = value
    if len(named) > 1:
        raise Validation(
            "mender artifact: more than one software name in artifact_provides "
            f"({', '.join(sorted(named))[:200]}): give one"
        )
    if named:
        flow_id, version = next(iter(named.items()))
        if not is_valid_id(flow_id):
            raise Validation(f"software name {flow_id[:80]!r} is not a flow id: {ID_RULE}")
        where = "software version"
    else:
        flow_id = PurePosixPath(art.file.name).name.split(".")[0]
        if not is_valid_id(flow_id):
            raise Validation(
                f"payload file {art.file.name[:80]!r}: its stem is not a flow id ({ID_RULE}); "
                "give the artifact a software name (mender-artifact --software-name)"
            )
        version = art.name
        where = "artifact name (the version without a software version)"
    try:
        flow_versions.check_version(version)
    except Validation:
        raise Validation(f"{where}: 1 to 128 printable characters") from None
    return flow_id, version


@dataclass(frozen=True)
class _Plan:
    """A checked artifact, ready to be stored."""

    art: mender_artifact.MenderArtifact
    data: bytes
    description: str
    kind: str
    flow_id: str
    version: str

    @property
    def item(self) -> dict[str, Any]:
        f = self.art.file
        return {"sha256": f.sha256, "size": f.size, "deviceTypes": list(self.art.device_types)}


def upload(
    ctx: ServerContext, app: Application, fh: BinaryIO, *, description: str, size: str | None
) -> str:
    """Store an uploaded ``.mender`` file; its artifact id."""
    check_description(description)
    data = flow_versions.read_upload(fh, ctx.cfg.max_upload)
    if size is not None and size != "":
        if not size.isdigit() or len(size) > 20:
            raise Validation("size: a number of bytes")
        if int(size) != len(data):
            raise Validation(f"size: {size} bytes, but the artifact has {len(data)}")
    return store(ctx, app, data, description)


def store(ctx: ServerContext, app: Application, data: bytes, description: str) -> str:
    """Check a whole ``.mender`` file, then store it (see the module); its id."""
    art = mender_artifact.read(data, max_payload=ctx.cfg.max_upload)
    kind = kind_of(art.payload_type)
    flow_versions.check_artifact(kind, art.file.data, f"payload {art.file.name[:80]}")
    flow_id, version = flow_of(art)
    plan = _Plan(art, data, description, kind, flow_id, version)
    with ctx.db.transaction() as s:
        _check(ctx, s, app, plan)
    # Everything checked: only now do the bytes go to the store.
    limit = ctx.cfg.max_upload
    ctx.store.put_bytes(data, len(data))
    ctx.store.put_bytes(art.file.data, limit)
    for attempt in (1, 2):
        try:
            with ctx.db.transaction() as s:
                # Checked again, and written, with the application's uploads
                # serialized (the name rule and the storage limit are checks of
                # other rows, which a concurrent upload could add in between).
                apps_repo.lock(s, app.id)
                _check(ctx, s, app, plan, lock=True)
                return _write(s, app, plan).id
        except Conflict:
            # (A blob row's insert can lose a race with another upload of the same
            # bytes on PostgreSQL: that is no conflict, and the retry sees it.)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _check(
    ctx: ServerContext, s: Session, app: Application, plan: _Plan, *, lock: bool = False
) -> None:
    art = plan.art
    taken = repo.sharing_a_type(s, app.id, art.name, art.device_types)
    if taken is not None:
        raise Conflict(
            f"an artifact named {art.name[:80]!r} for "
            f"{', '.join(taken.device_types or ['every device type'])[:200]} exists already "
            f"({taken.id})"
        )
    limit = ctx.cfg.storage_limit
    if limit:
        usage = repo.usage(s, app.id)
        if usage + len(plan.data) > limit:
            raise TooLarge(
                f"storage limit: {len(plan.data)} more bytes would exceed {limit} (in use: {usage})"
            )
    flow_versions.plan_item(s, app.id, plan.flow_id, plan.version, plan.kind, plan.item, lock=lock)


def _write(s: Session, app: Application, plan: _Plan) -> Artifact:
    art = plan.art
    flow_versions.add_item(
        s, app.id, plan.flow_id, plan.version, plan.kind, plan.item, plan.description
    )
    mender_sha = hashlib.sha256(plan.data).hexdigest()
    blobs.ensure_blob(s, mender_sha, len(plan.data))
    now = utcnow()
    return repo.create(
        s,
        application_id=app.id,
        name=art.name,
        description=plan.description,
        device_types=list(art.device_types),
        signed=art.signed,
        size=len(plan.data),
        info={"format": mender_artifact.FORMAT, "version": mender_artifact.VERSION},
        updates=[
            {
                "type_info": {"type": art.payload_type},
                "files": [
                    {
                        "name": art.file.name,
                        "checksum": art.file.sha256,
                        "size": art.file.size,
                        "date": _iso(art.file.modified or now),
                    }
                ],
                "meta_data": art.meta_data,
            }
        ],
        provides={**art.artifact_provides, **art.provides},
        flow_id=plan.flow_id,
        version=plan.version,
        payload_sha256=art.file.sha256,
        mender_sha256=mender_sha,
        source="mender",
        created=now,
        modified=now,
    )


# ---------------------------------------------------------------- generate

GENERATE_ARGS = ("software_name", "software_version")


def generate(
    ctx: ServerContext,
    app: Application,
    fh: BinaryIO,
    *,
    file_name: str | None,
    name: str,
    type_: str,
    device_types: list[str],
    description: str,
    args: str | None,
) -> str:
    """Write a Mender artifact v3 of a raw file, then store it as an upload."""
    if type_ == "single_file":
        raise Validation(
            "type: single_file (Mender's single-file update module) installs a file on a "
            "device's filesystem, which this server's devices do not do; generate one of "
            + ", ".join(TYPE_KINDS)
        )
    kind_of(type_)
    check_description(description)
    try:
        name = mender_artifact.label("name", name, mender_artifact.MAX_NAME)
    except mender_artifact.ArtifactError:
        raise Validation(f"name: a printable string of 1 to {mender_artifact.MAX_NAME}") from None
    if not device_types:
        raise Validation("device_types_compatible: at least one device type")
    if len(device_types) > mender_artifact.MAX_DEVICE_TYPES or len(set(device_types)) != len(
        device_types
    ):
        raise Validation(
            f"device_types_compatible: 1 to {mender_artifact.MAX_DEVICE_TYPES} distinct types"
        )
    for t in device_types:
        if not 0 < len(t) <= 64 or not t.isprintable() or t != t.strip():
            raise Validation("device_types_compatible: printable types of 1 to 64 characters")
    base = (file_name or "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    if not mender_artifact.FILE_NAME.fullmatch(base):
        raise Validation(
            f"file: its name {base[:80]!r} is not one mender-artifact takes: "
            f"{mender_artifact.FILE_NAME_RULE} (rename the file)"
        )
    options = _generate_args(args)
    software = options.get("software_name")
    provides = (
        {f"rootfs-image.{software}.version": options.get("software_version") or name}
        if software
        else {f"rootfs-image.{type_}.version": name}
    )
    clears = [f"rootfs-image.{software or type_}.*"]
    payload = flow_versions.read_upload(fh, ctx.cfg.max_upload)
    data = mender_artifact.write(
        payload,
        name=name,
        device_types=device_types,
        payload_type=type_,
        file_name=base,
        provides=provides,
        clears_provides=clears,
        mtime=int(time.time()),
    )
    return store(ctx, app, data, description)


def _generate_args(raw: str | None) -> dict[str, str]:
    if raw is None or raw.strip() == "":
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise Validation("args: not JSON") from None
    if not isinstance(doc, dict):
        raise Validation("args: a JSON object")
    unknown = sorted(set(doc) - set(GENERATE_ARGS))
    if unknown:
        raise Validation(
            f"args: unknown key {unknown[0][:64]!r}; accepted: {', '.join(GENERATE_ARGS)}"
        )
    out: dict[str, str] = {}
    for key, value in doc.items():
        if value is None:
            continue
        if not isinstance(value, str) or not 0 < len(value) <= 128 or not value.isprintable():
            raise Validation(f"args.{key}: a printable string of 1 to 128 characters")
        out[key] = value
    if "software_name" in out and not is_valid_id(out["software_name"]):
        raise Validation(f"args.software_name: a flow id: {ID_RULE}")
    if "software_version" in out and "software_name" not in out:
        raise Validation("args.software_version: goes with software_name")
    return out


# ---------------------------------------------------------------- reads and changes


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def view(row: Artifact) -> dict[str, Any]:
    """An artifact as Mender's API shows it (plus ``artifact_provides`` and
    ``artifact_depends``, as Mender's own server adds them)."""
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "device_types_compatible": list(row.device_types or []),
        "signed": row.signed,
        "modified": _iso(row.modified),
        "size": row.size,
        "info": dict(row.info or {}),
        "updates": [
            {k: v for k, v in u.items() if k != "meta_data" or v} for u in row.updates or []
        ],
        "artifact_provides": {k: str(v) for k, v in (row.provides or {}).items()},
        "artifact_depends": {"device_type": list(row.device_types or [])},
    }


def get(ctx: ServerContext, app: Application, artifact_id: str) -> dict[str, Any]:
    with ctx.db.transaction() as s:
        return view(_row(s, app, artifact_id))


def _row(s: Session, app: Application, artifact_id: str) -> Artifact:
    row = repo.get(s, app.id, artifact_id) if _is_uuid(artifact_id) else None
    if row is None:
        raise NotFound("Artifact not found")
    return row


def _is_uuid(value: str) -> bool:
    return len(value) == 36 and all(c in "0123456789abcdef-" for c in value)


def list_all(ctx: ServerContext, app: Application, name: str | None = None) -> list[dict[str, Any]]:
    with ctx.db.transaction() as s:
        rows = repo.by_name(s, app.id, name) if name is not None else repo.all_of(s, app.id)
        return [view(r) for r in rows]


def releases(ctx: ServerContext, app: Application, name: str | None) -> list[dict[str, Any]]:
    """Artifacts grouped by name (Mender's releases), by name."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in list_all(ctx, app, name):
        groups.setdefault(item["name"], []).append(item)
    return [{"name": n, "artifacts": groups[n]} for n in sorted(groups)]


def set_description(
    ctx: ServerContext, app: Application, artifact_id: str, description: str
) -> None:
    check_description(description)
    with ctx.db.transaction() as s:
        row = _row(s, app, artifact_id)
        if repo.rollouts_naming(s, app.id, row.name, active_only=False):
            raise Unprocessable(
                f"artifact {row.name[:80]!r} is used by a deployment: it cannot be edited"
            )
        repo.set_description(s, row, description)


def delete(ctx: ServerContext, app: Application, artifact_id: str) -> str:
    """Delete the artifact and its payload's item of the flow version; what became
    of the flow version (see :func:`flow_versions.remove_item`)."""
    with ctx.db.transaction() as s:
        row = _row(s, app, artifact_id)
        if repo.rollouts_naming(s, app.id, row.name, active_only=True):
            raise Conflict(f"artifact {row.name[:80]!r} is used by an active deployment")
        outcome = "absent"
        fv = fv_repo.get(s, app.id, row.flow_id, row.version, lock=True)
        shared = [
            r
            for r in repo.of_flow_version(s, app.id, row.flow_id, row.version)
            if r.id != row.id
            and r.payload_sha256 == row.payload_sha256
            and sorted(r.device_types or []) == sorted(row.device_types or [])
        ]
        if fv is not None and not shared:
            outcome = flow_versions.remove_item(
                s, fv, row.payload_sha256, list(row.device_types or [])
            )
        repo.delete(s, row)
        return outcome


def download_link(ctx: ServerContext, app: Application, artifact_id: str) -> dict[str, str]:
    """A signed link to the ``.mender`` file (the payload, for an artifact made from
    a flow version uploaded through Losant's API), valid ``download_link_s``."""
    with ctx.db.transaction() as s:
        row = _row(s, app, artifact_id)
        sha = row.mender_sha256 or row.payload_sha256
    expires = int(time.time()) + ctx.cfg.download_link_s
    return {
        "uri": artifact_url(ctx.cfg.base_url, app.url_key, app.id, sha, expires),
        "expire": _iso(datetime.fromtimestamp(expires, UTC)),
    }


def storage(ctx: ServerContext, app: Application) -> dict[str, int]:
    with ctx.db.transaction() as s:
        return {"limit": ctx.cfg.storage_limit, "usage": repo.usage(s, app.id)}
