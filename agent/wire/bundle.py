"""Workflow bundles (``kind: "bundle"``): a ``.tar.gz`` of a manifest and modules.

``manifest.json`` (or ``manifest.toml``)::

    {"name": "greenhouse", "version": "1.2.0",
     "config": {...},                       # shared; a module's own config wins per key
     "permissions": {...},                  # for the whole flow (see agent.wire.manifest)
     "modules": [{"name": "sensor", "file": "sensor.wasm", "sha256": "<hex>",
                  "kind": "wasm",           # or "eea"
                  "triggers": [...], "config": {...}}, ...]}

Reading is done in memory and refuses anything odd: absolute paths, ``..``, links,
devices and FIFOs; more than ``max_files`` entries; more than ``max_bytes`` once
decompressed (the gzip stream itself is bounded, so a bomb stops early); a
compression ratio above ``max_ratio``. Every module's bytes must match the sha256
in the manifest. All modules of a bundle start, swap and stop together.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from agent.errors import ArtifactError
from agent.wire.manifest import Permissions, Trigger

if TYPE_CHECKING:
    import tarfile

# gzip and tarfile (~0.3 MiB and several ms of the agent's start-up with what they
# import) are imported by the functions that read or build a bundle.

MANIFEST_NAMES = ("manifest.json", "manifest.toml")
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class BundleError(ArtifactError):
    """A bundle that cannot be accepted (layout, limits, manifest, hashes)."""


class ModuleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ModuleName
    file: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    kind: Literal["wasm", "eea"] = "wasm"
    triggers: tuple[Trigger, ...] = ()
    config: dict[str, Any] = Field(default_factory=dict)


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    version: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    modules: Annotated[tuple[ModuleEntry, ...], Field(min_length=1, max_length=16)]
    config: dict[str, Any] = Field(default_factory=dict)
    permissions: Permissions = Field(default_factory=Permissions)


@dataclass(frozen=True)
class BundleLimits:
    max_files: int = 64
    max_bytes: int = 64 * 1024 * 1024
    max_ratio: float = 200.0


@dataclass(frozen=True)
class Bundle:
    manifest: BundleManifest
    modules: dict[str, bytes]  # module name -> bytes (verified)

    def module_config(self, entry: ModuleEntry) -> dict[str, Any]:
        return {**self.manifest.config, **entry.config}


class _Bounded(io.RawIOBase):
    """A reader that raises once more than ``limit`` bytes were read."""

    def __init__(self, inner: Any, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.inner.read(len(buf))
        self.count += len(data)
        if self.count > self.limit:
            raise BundleError(f"bundle expands to more than {self.limit} bytes")
        buf[: len(data)] = data
        return len(data)


def _parse_manifest(name: str, raw: bytes) -> BundleManifest:
    try:
        doc = tomllib.loads(raw.decode()) if name.endswith(".toml") else json.loads(raw)
        return BundleManifest.model_validate(doc)
    except (ValueError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            first = f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        raise BundleError(f"invalid {name}: {first}") from None


def _safe_name(member: tarfile.TarInfo) -> str:
    name = member.name
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or ".." in path.parts:
        raise BundleError(f"unsafe path in bundle: {name!r}")
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"bundle entry {name!r} is not a regular file or directory")
    return str(PurePosixPath(*[p for p in path.parts if p not in ("", ".")]))


def read_bundle(data: bytes, limits: BundleLimits | None = None) -> Bundle:
    """Parse and verify a bundle held in memory (blocking; no disk writes)."""
    import gzip
    import tarfile

    lim = limits or BundleLimits()
    files: dict[str, bytes] = {}
    try:
        raw = _Bounded(gzip.GzipFile(fileobj=io.BytesIO(data)), lim.max_bytes + 1024 * 1024)
        with tarfile.open(fileobj=io.BufferedReader(raw), mode="r|") as tar:
            for count, member in enumerate(tar, start=1):
                if count > lim.max_files:
                    raise BundleError(f"bundle has more than {lim.max_files} entries")
                name = _safe_name(member)
                if member.isdir():
                    continue
                if sum(map(len, files.values())) + member.size > lim.max_bytes:
                    raise BundleError(f"bundle expands to more than {lim.max_bytes} bytes")
                fh = tar.extractfile(member)
                if fh is None:
                    raise BundleError(f"cannot read {name!r} from the bundle")
                files[name] = fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"not a valid .tar.gz bundle: {exc}") from None
    total = sum(map(len, files.values()))
    if data and total / len(data) > lim.max_ratio:
        raise BundleError(
            f"bundle compression ratio {total / len(data):.0f} is above "
            f"{lim.max_ratio:.0f} (a decompression bomb?)"
        )
    manifest_name = next((n for n in MANIFEST_NAMES if n in files), None)
    if manifest_name is None:
        raise BundleError("bundle has no manifest.json or manifest.toml at its top level")
    manifest = _parse_manifest(manifest_name, files[manifest_name])
    modules: dict[str, bytes] = {}
    for entry in manifest.modules:
        if entry.name in modules:
            raise BundleError(f"module name {entry.name!r} appears twice")
        blob = files.get(entry.file.removeprefix("./"))
        if blob is None:
            raise BundleError(f"module {entry.name!r}: file {entry.file!r} is not in the bundle")
        digest = hashlib.sha256(blob).hexdigest()
        if entry.sha256 is None:
            raise BundleError(f"module {entry.name!r} has no sha256 in the manifest")
        if digest != entry.sha256:
            raise BundleError(
                f"module {entry.name!r}: sha256 mismatch (manifest "
                f"{entry.sha256[:12]}…, file {digest[:12]}…)"
            )
        modules[entry.name] = blob
    return Bundle(manifest, modules)


def build_bundle(src: Path, out: Path) -> BundleManifest:
    """Build a reproducible bundle from a directory with a manifest (sha256 filled in)."""
    import gzip
    import tarfile

    manifest_path = next((src / n for n in MANIFEST_NAMES if (src / n).exists()), None)
    if manifest_path is None:
        raise BundleError(f"{src} has no manifest.json or manifest.toml")
    doc = (
        tomllib.loads(manifest_path.read_text())
        if manifest_path.suffix == ".toml"
        else json.loads(manifest_path.read_text())
    )
    for mod in doc.get("modules", []):
        path = src / str(mod.get("file", ""))
        if not path.is_file():
            raise BundleError(f"module {mod.get('name')!r}: {path} does not exist")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if mod.get("sha256") not in (None, digest):
            raise BundleError(
                f"module {mod.get('name')!r}: manifest sha256 does not match {path.name}"
            )
        mod["sha256"] = digest
    manifest = BundleManifest.model_validate(doc)
    entries = {"manifest.json": json.dumps(doc, indent=2, sort_keys=True).encode()}
    for mod in manifest.modules:
        entries[mod.file] = (src / mod.file).read_bytes()
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size = len(entries[name])
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(entries[name]))
    out.write_bytes(buf.getvalue())
    read_bundle(out.read_bytes())  # what we write, we can read
    return manifest


def describe(data: bytes) -> dict[str, Any]:
    """What ``edge-agent bundle inspect`` prints."""
    started = time.perf_counter()
    bundle = read_bundle(data)
    m = bundle.manifest
    return {
        "name": m.name,
        "version": m.version,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "permissions": m.permissions.model_dump(by_alias=True),
        "modules": [
            {
                "name": e.name,
                "file": e.file,
                "kind": e.kind,
                "bytes": len(bundle.modules[e.name]),
                "sha256": e.sha256,
                "triggers": [t.model_dump() for t in e.triggers],
                "config": bundle.module_config(e),
            }
            for e in m.modules
        ],
        "verifiedInMs": round((time.perf_counter() - started) * 1000, 1),
    }
