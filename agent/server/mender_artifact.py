"""Mender artifacts, format version 3: read one as ``mender-artifact write
module-image`` makes it, checked whole, and write one the same way.

An artifact is a plain tar of, in this order::

    version                      {"format": "mender", "version": 3}
    manifest                     "<sha256>  <name>" for version, the header and each payload file
    manifest.sig                 optional: a signature of the manifest (not verified here)
    manifest-augment             optional: the checksum of the augmented header
    header.tar[.gz|.xz]          header-info, headers/0000/type-info, headers/0000/meta-data
    header-augment.tar[.gz|.xz]  optional: type-info fields that override the header's
    data/0000.tar[.gz|.xz]       the payload's files

Reading checks everything before anything is kept: member names (no absolute
names, no ``..``, no links, directories or devices, none twice), every checksum of
the manifest (and nothing it names missing or left over), sizes (the header's
members at most :data:`MAX_HEADER` decompressed, the payload at most the caller's
limit, members counted), exactly one payload with exactly one file, and non-empty
compatible device types. Any fault is an :class:`ArtifactError` (a 400), and only
ever that, whatever the bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from agent.server.errors import Validation
from agent.server.text import text_problem, tree_problem

FORMAT: Final = "mender"
VERSION: Final = 3
#: Largest header member (and the header tar, decompressed), version and manifest.
MAX_HEADER: Final = 1 << 20
MAX_OUTER_MEMBERS: Final = 16
MAX_HEADER_MEMBERS: Final = 16
MAX_MANIFEST_LINES: Final = 64
MAX_DEVICE_TYPES: Final = 64
MAX_PROVIDES: Final = 64
#: Longest artifact name (the database column's width).
MAX_NAME: Final = 256
#: What :data:`FILE_NAME` allows, in words.
FILE_NAME_RULE: Final = "1 to 100 of the letters A-Z a-z, the digits and . , _ -"
#: A compression by the suffix of the tar it packs.
COMPRESSIONS: Final = {".tar": "none", ".tar.gz": "gzip", ".tar.xz": "xz"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: A payload file name as ``mender-artifact write`` takes it ("Only letters, digits
#: and characters in the set ".,_-" are allowed": ASCII letters, it refuses ``flöw``
#: and spaces; at most 100: a plain tar name): so a manifest is ASCII, and what
#: :func:`write` writes reads back.
FILE_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9.,_-]{1,100}")
_DATA = re.compile(r"data/(\d{4})(\.tar(?:\.[a-z0-9]+)?)")


class ArtifactError(Validation):
    """The bytes are not a Mender artifact this server takes (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"mender artifact: {message}"[:500])


@dataclass(frozen=True)
class PayloadFile:
    name: str
    data: bytes
    sha256: str
    modified: datetime | None

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class MenderArtifact:
    """What a valid artifact says (one payload, one file)."""

    name: str
    device_types: list[str]
    payload_type: str
    #: The payload's ``artifact_provides`` (augmented ones override).
    provides: dict[str, str]
    depends: dict[str, Any]
    clears_provides: list[str]
    meta_data: dict[str, Any]
    file: PayloadFile
    signed: bool
    compression: str
    #: Every ``artifact_provides`` of the header-info (``artifact_name`` included).
    artifact_provides: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- tar members


@dataclass(frozen=True)
class _Member:
    name: str
    data: bytes
    mtime: float


def _check_name(where: str, name: str) -> None:
    if not name or len(name) > 255 or text_problem(name) or not name.isprintable():
        raise ArtifactError(f"{where}: a member name that is empty, too long or not printable")
    if name.startswith("/"):
        raise ArtifactError(f"{where}: member {name[:80]!r} has an absolute name")
    parts = name.split("/")
    if ".." in parts:
        raise ArtifactError(f"{where}: member {name[:80]!r} has '..' in its name")
    if "\\" in name or any(p in ("", ".") for p in parts):
        raise ArtifactError(f"{where}: member {name[:80]!r} has an unusual name")


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym() or info.islnk():
        return "a link"
    if info.isdir():
        return "a directory"
    if info.isdev():
        return "a device or FIFO"
    return "not a regular file"


def _members(
    data: bytes, where: str, *, max_members: int, limit: dict[str, int] | int
) -> list[_Member]:
    """Every member of the plain tar ``data``, in order, checked (regular files
    with plain, distinct names, each within its size limit: a name's own in
    ``limit``, else ``limit["*"]``)."""
    out: list[_Member] = []
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            while (info := tar.next()) is not None:
                if len(out) >= max_members:
                    raise ArtifactError(f"{where}: more than {max_members} members")
                name = info.name
                _check_name(where, name)
                if not info.isreg():
                    raise ArtifactError(f"{where}: member {name[:80]!r} is {_kind(info)}")
                if name in seen:
                    raise ArtifactError(f"{where}: member {name[:80]!r} is there twice")
                seen.add(name)
                bound = limit if isinstance(limit, int) else limit.get(name, limit["*"])
                if info.size > bound:
                    raise ArtifactError(f"{where}: member {name[:80]!r} is over {bound} bytes")
                fh = tar.extractfile(info)
                body = fh.read() if fh is not None else b""
                if len(body) != info.size:
                    raise ArtifactError(f"{where}: member {name[:80]!r} is truncated")
                out.append(_Member(name, body, float(info.mtime)))
    except ArtifactError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, OverflowError) as exc:
        raise ArtifactError(f"{where}: not a valid tar archive ({str(exc)[:120]})") from None
    if not out:
        raise ArtifactError(f"{where}: an empty tar archive")
    return out


# ---------------------------------------------------------------- compression


def _decompress(data: bytes, compression: str, limit: int, where: str) -> bytes:
    """``data`` decompressed, at most ``limit`` bytes (else an error: a
    decompression bomb stops at the limit, it is never inflated whole)."""
    if compression == "none":
        if len(data) > limit:
            raise ArtifactError(f"{where}: over {limit} bytes")
        return data
    out = bytearray()
    try:
        if compression == "gzip":
            z = zlib.decompressobj(wbits=31)
            rest = data
            while True:
                out += z.decompress(rest, limit + 1 - len(out))
                if len(out) > limit:
                    raise ArtifactError(f"{where}: over {limit} bytes decompressed")
                rest = z.unconsumed_tail
                if z.eof:
                    break
                if not rest:
                    raise ArtifactError(f"{where}: the gzip stream is truncated")
            trailing = z.unused_data
        else:
            x = lzma.LZMADecompressor()
            out += x.decompress(data, limit + 1 - len(out))
            while not x.eof:
                if len(out) > limit:
                    raise ArtifactError(f"{where}: over {limit} bytes decompressed")
                if x.needs_input:
                    raise ArtifactError(f"{where}: the xz stream is truncated")
                out += x.decompress(b"", limit + 1 - len(out))
            if len(out) > limit:
                raise ArtifactError(f"{where}: over {limit} bytes decompressed")
            trailing = x.unused_data
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise ArtifactError(f"{where}: not valid {compression} data ({exc})") from None
    if trailing:
        raise ArtifactError(f"{where}: bytes after the end of the {compression} stream")
    return bytes(out)


def _compression(name: str, stem: str) -> str:
    suffix = name[len(stem) :]
    if suffix == ".tar.zst":
        raise ArtifactError(
            f"{name}: zstd compression is not supported (write the artifact with "
            "mender-artifact --compression gzip, lzma or none)"
        )
    if suffix not in COMPRESSIONS:
        raise ArtifactError(f"{name}: an unknown compression (gzip, xz or none are read)")
    return COMPRESSIONS[suffix]


# ---------------------------------------------------------------- JSON documents


def _json_object(where: str, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where}: not JSON ({str(exc)[:100]})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where}: not a JSON object")
    problem = tree_problem(doc)
    if problem is not None:
        raise ArtifactError(f"{where}: {problem}")
    return doc


def label(where: str, value: Any, max_length: int) -> str:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= max_length
        or not value.isprintable()
        or value != value.strip()
    ):
        raise ArtifactError(f"{where}: a printable string of 1 to {max_length} characters")
    return value


def _string_map(where: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_PROVIDES:
        raise ArtifactError(f"{where}: an object of at most {MAX_PROVIDES} strings")
    for key, item in value.items():
        label(f"{where}: key", key, 256)
        if not isinstance(item, str) or len(item) > 1024:
            raise ArtifactError(f"{where}.{key[:64]}: a string of at most 1024 characters")
    return dict(value)


@dataclass(frozen=True)
class _Header:
    name: str
    device_types: list[str]
    payload_type: str
    artifact_provides: dict[str, Any]
    provides: dict[str, str]
    depends: dict[str, Any]
    clears: list[str]
    meta_data: dict[str, Any]


def _header_info(where: str, doc: dict[str, Any]) -> tuple[str, list[str], str, dict[str, Any]]:
    payloads = doc.get("payloads")
    if not isinstance(payloads, list) or not payloads:
        raise ArtifactError(f"{where}: no payload")
    if len(payloads) != 1:
        raise ArtifactError(f"{where}: {len(payloads)} payloads (exactly one is taken)")
    entry = payloads[0]
    if not isinstance(entry, dict) or entry.get("type") is None:
        raise ArtifactError(f"{where}: an empty payload (no type)")
    payload_type = label(f"{where}: payload type", entry["type"], 64)
    provides = doc.get("artifact_provides")
    if not isinstance(provides, dict):
        raise ArtifactError(f"{where}: no artifact_provides")
    name = label(f"{where}: artifact_provides.artifact_name", provides.get("artifact_name"), 256)
    depends = doc.get("artifact_depends")
    types = depends.get("device_type") if isinstance(depends, dict) else None
    if not isinstance(types, list) or not types:
        raise ArtifactError(f"{where}: no compatible device types (artifact_depends.device_type)")
    if len(types) > MAX_DEVICE_TYPES:
        raise ArtifactError(f"{where}: over {MAX_DEVICE_TYPES} device types")
    device_types = [label(f"{where}: device type", t, 64) for t in types]
    if len(set(device_types)) != len(device_types):
        raise ArtifactError(f"{where}: a device type is listed twice")
    return name, device_types, payload_type, provides


def _type_info(
    where: str, doc: dict[str, Any], payload_type: str
) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    if doc.get("type") != payload_type:
        raise ArtifactError(f"{where}: type {str(doc.get('type'))[:64]!r} is not the payload's")
    provides = _string_map(f"{where}: artifact_provides", doc.get("artifact_provides"))
    depends = doc.get("artifact_depends") or {}
    if not isinstance(depends, dict):
        raise ArtifactError(f"{where}: artifact_depends is not an object")
    clears = doc.get("clears_artifact_provides") or []
    if not isinstance(clears, list) or not all(isinstance(c, str) for c in clears):
        raise ArtifactError(f"{where}: clears_artifact_provides is not a list of strings")
    return provides, depends, clears[:MAX_PROVIDES]


def _header(
    members: list[_Member], where: str, *, augment: bool
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """header-info, headers/0000/type-info and headers/0000/meta-data (as parsed
    objects; the type-info and meta-data may be missing from an augmented header)."""
    docs: dict[str, dict[str, Any]] = {}
    allowed = ("header-info", "headers/0000/type-info", "headers/0000/meta-data")
    for m in members:
        if m.name.startswith("scripts/"):
            raise ArtifactError(f"{where}: state scripts are not supported ({m.name[:80]})")
        if m.name.startswith("headers/") and not m.name.startswith("headers/0000/"):
            raise ArtifactError(f"{where}: {m.name[:80]}: a second payload (exactly one is taken)")
        if m.name not in allowed:
            raise ArtifactError(f"{where}: an unexpected member {m.name[:80]!r}")
        docs[m.name] = _json_object(f"{where}: {m.name}", m.data)
    if "header-info" not in docs:
        raise ArtifactError(f"{where}: no header-info")
    if "headers/0000/type-info" not in docs and not augment:
        raise ArtifactError(f"{where}: no headers/0000/type-info")
    return (
        docs["header-info"],
        docs.get("headers/0000/type-info"),
        docs.get("headers/0000/meta-data"),
    )


# ---------------------------------------------------------------- the manifest


def _manifest(where: str, data: bytes) -> dict[str, str]:
    """``{name: sha256}`` of a manifest (``<sha256>  <name>`` per line)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ArtifactError(f"{where}: not ASCII text") from None
    lines = [line for line in text.split("\n") if line]
    if not lines or len(lines) > MAX_MANIFEST_LINES:
        raise ArtifactError(f"{where}: 1 to {MAX_MANIFEST_LINES} lines")
    out: dict[str, str] = {}
    for line in lines:
        sha, sep, name = line.partition("  ")
        if not sep or not _SHA256.fullmatch(sha):
            raise ArtifactError(f"{where}: a line that is not '<sha256>  <name>'")
        _check_name(where, name)
        if name in out:
            raise ArtifactError(f"{where}: {name[:80]!r} is listed twice")
        out[name] = sha
    return out


def _verify(listed: dict[str, str], name: str, data: bytes, where: str) -> None:
    expected = listed.pop(name, None)
    if expected is None:
        raise ArtifactError(f"{where}: {name[:80]!r} has no checksum")
    if hashlib.sha256(data).hexdigest() != expected:
        raise ArtifactError(f"{name[:80]}: its checksum is not the one in the {where}")


# ---------------------------------------------------------------- reading


_ORDER = {
    "version": 0,
    "manifest": 1,
    "manifest.sig": 2,
    "manifest-augment": 3,
    "header": 4,
    "header-augment": 5,
    "data": 6,
}


def _role(name: str) -> str:
    if name in ("version", "manifest", "manifest.sig", "manifest-augment"):
        return name
    for stem in ("header-augment", "header"):
        if name.startswith(stem + ".tar"):
            return stem
    match = _DATA.fullmatch(name)
    if match:
        if match.group(1) != "0000":
            raise ArtifactError(f"{name}: a second payload (exactly one is taken)")
        return "data"
    raise ArtifactError(f"an unexpected member {name[:80]!r}")


def _check_version(data: bytes) -> None:
    doc = _json_object("version", data)
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"version: format {str(doc.get('format'))[:40]!r} is not 'mender'")
    version = doc.get("version")
    if version in (1, 2):
        raise ArtifactError(
            f"format version {version} is not supported: only version 3 "
            "(what mender-artifact writes by default)"
        )
    if version != VERSION:
        raise ArtifactError(f"version: {str(version)[:20]} is not a known format version")


def _roles(outer: list[_Member]) -> dict[str, _Member]:
    """The outer members by role, in Mender's order, the required ones present."""
    if outer[0].name != "version":
        raise ArtifactError("the first member is not 'version'")
    _check_version(outer[0].data)
    roles: dict[str, _Member] = {}
    last = -1
    for m in outer:
        role = _role(m.name)
        if role in roles:
            raise ArtifactError(f"{m.name[:80]}: a second {role}")
        if _ORDER[role] < last:
            raise ArtifactError(f"{m.name[:80]}: out of order")
        last = _ORDER[role]
        roles[role] = m
    for required in ("manifest", "header", "data"):
        if required not in roles:
            raise ArtifactError(f"no {required} member")
    if ("manifest-augment" in roles) != ("header-augment" in roles):
        raise ArtifactError("manifest-augment and header-augment go together")
    return roles


def _header_docs(m: _Member, *, augment: bool) -> tuple[dict[str, Any] | None, ...]:
    raw = _decompress(m.data, _compression(m.name, m.name.split(".")[0]), MAX_HEADER, m.name)
    members = _members(raw, m.name, max_members=MAX_HEADER_MEMBERS, limit=MAX_HEADER)
    return _header(members, m.name, augment=augment)


def _augmented(
    roles: dict[str, _Member], payload_type: str, provides: dict[str, str], meta: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any]]:
    """The provides and meta-data with the augmented header's on top (if any)."""
    if "header-augment" not in roles:
        return provides, meta
    aug_m = roles["header-augment"]
    aug_listed = _manifest("manifest-augment", roles["manifest-augment"].data)
    _verify(aug_listed, aug_m.name, aug_m.data, "manifest-augment")
    if aug_listed:
        raise ArtifactError(
            f"manifest-augment: {next(iter(aug_listed))[:80]!r} is not in the artifact"
        )
    _, aug_type, aug_meta = _header_docs(aug_m, augment=True)
    if aug_type is not None:
        more, _, _ = _type_info("augmented type-info", aug_type, payload_type)
        provides = {**provides, **more}
    return provides, {**meta, **(aug_meta or {})}


def _payload(m: _Member, max_payload: int) -> _Member:
    raw = _decompress(m.data, _compression(m.name, "data/0000"), max_payload + (1 << 20), m.name)
    files = _members(raw, m.name, max_members=2, limit=max_payload)
    if len(files) != 1:
        raise ArtifactError(f"{m.name}: {len(files)} files (exactly one is taken)")
    payload = files[0]
    if "/" in payload.name:
        raise ArtifactError(f"{m.name}: the file {payload.name[:80]!r} is in a directory")
    if not payload.data:
        raise ArtifactError(f"{m.name}: the file {payload.name[:80]!r} is empty")
    return payload


def read(data: bytes, *, max_payload: int) -> MenderArtifact:
    """Parse and check a whole ``.mender`` file; :class:`ArtifactError` if it is not
    an artifact of format 3 with one payload of one file of at most ``max_payload``
    bytes."""
    data_limit = max_payload + (1 << 20)
    outer = _members(
        data,
        "artifact",
        max_members=MAX_OUTER_MEMBERS,
        limit={"*": MAX_HEADER, "data/0000.tar": data_limit}
        | {f"data/0000.tar.{x}": data_limit for x in ("gz", "xz", "zst")},
    )
    roles = _roles(outer)
    header_m, data_m = roles["header"], roles["data"]
    _compression(header_m.name, "header")
    compression = _compression(data_m.name, "data/0000")
    listed = _manifest("manifest", roles["manifest"].data)
    _verify(listed, "version", outer[0].data, "manifest")
    _verify(listed, header_m.name, header_m.data, "manifest")

    info, type_info, meta = _header_docs(header_m, augment=False)
    if info is None or type_info is None:  # (_header says so for a plain header)
        raise ArtifactError(f"{header_m.name}: no header-info or type-info")
    name, device_types, payload_type, artifact_provides = _header_info("header-info", info)
    provides, depends, clears = _type_info("type-info", type_info, payload_type)
    provides, meta = _augmented(roles, payload_type, provides, meta or {})

    payload = _payload(data_m, max_payload)
    _verify(listed, f"data/0000/{payload.name}", payload.data, "manifest")
    if listed:
        raise ArtifactError(f"manifest: {next(iter(listed))[:80]!r} is not in the artifact")
    return MenderArtifact(
        name=name,
        device_types=device_types,
        payload_type=payload_type,
        provides=provides,
        depends=depends,
        clears_provides=clears,
        meta_data=meta,
        file=PayloadFile(
            payload.name,
            payload.data,
            hashlib.sha256(payload.data).hexdigest(),
            _date(payload.mtime),
        ),
        signed="manifest.sig" in roles,
        compression=compression,
        artifact_provides=artifact_provides,
    )


def _date(mtime: float) -> datetime | None:
    try:
        return datetime.fromtimestamp(mtime, UTC) if mtime > 0 else None
    except (OverflowError, OSError, ValueError):
        return None


# ---------------------------------------------------------------- writing


def _tar(files: list[tuple[str, bytes]], mtime: int, *, owner: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name, body in files:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mtime = mtime
            info.mode = 0o600
            if owner:
                info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def write(
    payload: bytes,
    *,
    name: str,
    device_types: list[str],
    payload_type: str,
    file_name: str,
    provides: dict[str, str],
    clears_provides: list[str] | None = None,
    meta_data: dict[str, Any] | None = None,
    mtime: int = 0,
) -> bytes:
    """A Mender artifact v3 (gzip) of one payload of one file, laid out and
    checksummed as ``mender-artifact write module-image`` writes it (``file_name``
    as it takes one, :data:`FILE_NAME`)."""
    if not FILE_NAME.fullmatch(file_name):
        raise ArtifactError(f"payload file name {file_name[:80]!r}: {FILE_NAME_RULE}")
    version = _compact({"format": FORMAT, "version": VERSION})
    header_info = {
        "payloads": [{"type": payload_type}],
        "artifact_provides": {"artifact_name": name},
        "artifact_depends": {"device_type": device_types},
    }
    type_info: dict[str, Any] = {"type": payload_type, "artifact_provides": provides}
    if clears_provides:
        type_info["clears_artifact_provides"] = clears_provides
    header_files = [
        ("header-info", _compact(header_info)),
        ("headers/0000/type-info", _compact(type_info)),
    ]
    if meta_data:
        header_files.append(("headers/0000/meta-data", _compact(meta_data)))
    header = gzip.compress(_tar(header_files, 0, owner=False), mtime=0)
    data = gzip.compress(_tar([(file_name, payload)], mtime, owner=True), mtime=0)
    sums = {
        f"data/0000/{file_name}": hashlib.sha256(payload).hexdigest(),
        "header.tar.gz": hashlib.sha256(header).hexdigest(),
        "version": hashlib.sha256(version).hexdigest(),
    }
    manifest = "".join(f"{sums[k]}  {k}\n" for k in sorted(sums)).encode()
    return _tar(
        [
            ("version", version),
            ("manifest", manifest),
            ("header.tar.gz", header),
            ("data/0000.tar.gz", data),
        ],
        mtime,
        owner=False,
    )
