"""The Mender artifact reader and writer: artifacts of the real ``mender-artifact``
read back; a table of crafted faults, each refused with its own message; random
bytes and random mutations of valid artifacts only ever raise the reader's error."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from common import COUNTER_WASM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mender_tools import (
    edit_header,
    edit_json,
    edit_payload,
    entry,
    mender_artifact,
    pack,
    tar_members,
    with_manifest,
    write_artifact,
)

from agent.server.mender_artifact import FILE_NAME, ArtifactError, MenderArtifact, read, write

WASM = COUNTER_WASM.read_bytes()
LIMIT = 1 << 20


def real(tmp: Path, name: str = "real-1", *extra: str, **kw: Any) -> bytes:
    options: dict[str, Any] = {"software_name": "counter", "software_version": "1.0.0", **kw}
    path = write_artifact(
        tmp, WASM, name=name, device_types=["gw-a", "gw-b"], extra=extra, **options
    )
    return path.read_bytes()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mender")


@pytest.fixture(scope="module")
def plain(tmp: Path) -> bytes:
    return real(tmp)


@pytest.fixture(scope="module")
def uncompressed(tmp: Path) -> bytes:
    return real(tmp, "none-1", "--compression", "none")


@pytest.mark.parametrize(
    ("option", "compression"), [("gzip", "gzip"), ("lzma", "xz"), ("none", "none")]
)
def test_reads_what_mender_artifact_writes(tmp: Path, option: str, compression: str) -> None:
    art = read(real(tmp, f"c-{option}", "--compression", option), max_payload=LIMIT)
    assert art.name == f"c-{option}"
    assert art.device_types == ["gw-a", "gw-b"]
    assert art.payload_type == "wasm-flow"
    assert art.provides == {"rootfs-image.counter.version": "1.0.0"}
    assert art.clears_provides == ["rootfs-image.counter.*"]
    assert art.compression == compression
    assert art.file.name == "flow.wasm"
    assert art.file.data == WASM
    assert art.file.sha256 == hashlib.sha256(WASM).hexdigest()
    assert art.file.modified is not None
    assert art.signed is False
    assert art.meta_data == {}


def test_meta_data_signature_and_augmented_header(tmp: Path) -> None:
    meta = tmp / "meta.json"
    meta.write_text(json.dumps({"color": "blue"}))
    key = tmp / "key.pem"
    subprocess.run(
        ["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)],
        check=True,
        capture_output=True,
    )
    data = real(
        tmp,
        "aug-1",
        "-m",
        str(meta),
        "-k",
        str(key),
        "--augment-type",
        "wasm-flow",
        "--augment-provides",
        "extra.key:value",
    )
    assert "manifest-augment" in [i.name for i, _ in tar_members(data)]
    art = read(data, max_payload=LIMIT)
    assert art.signed is True
    assert art.meta_data == {"color": "blue"}
    assert art.provides == {"rootfs-image.counter.version": "1.0.0", "extra.key": "value"}


def test_what_it_writes_mender_artifact_reads(tmp: Path) -> None:
    data = write(
        WASM,
        name="made-1",
        device_types=["x", "y"],
        payload_type="eea-flow",
        file_name="made.wasm",
        provides={"rootfs-image.made.version": "7"},
        clears_provides=["rootfs-image.made.*"],
        meta_data={"k": [1, 2]},
        mtime=1_700_000_000,
    )
    path = tmp / "made.mender"
    path.write_bytes(data)
    mender_artifact("validate", str(path))
    out = mender_artifact("read", str(path)).stdout
    assert "Name: made-1" in out
    assert "Compatible devices: '[x y]'" in out
    assert "Type:   eea-flow" in out
    assert "rootfs-image.made.version: 7" in out
    assert hashlib.sha256(WASM).hexdigest() in out
    art = read(data, max_payload=LIMIT)
    assert (art.name, art.payload_type, art.meta_data) == ("made-1", "eea-flow", {"k": [1, 2]})
    assert art.file.modified is not None
    assert art.file.modified.year == 2023
    # The same layout as mender-artifact's.
    assert [i.name for i, _ in tar_members(data)] == [
        i.name for i, _ in tar_members(real(tmp, "layout-1"))
    ]


# ---------------------------------------------------------------- crafted faults


def _insert(data: bytes, at: int, *members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    kept = tar_members(data)
    return pack([*kept[:at], *members, *kept[at:]])


def _without(data: bytes, name: str) -> bytes:
    return pack([(i, b) for i, b in tar_members(data) if i.name != name])


def _swap(data: bytes, a: int, b: int) -> bytes:
    members = tar_members(data)
    members[a], members[b] = members[b], members[a]
    return pack(members)


def _replace(data: bytes, name: str, body: bytes, *, manifest: bool = True) -> bytes:
    members = [(i, body if i.name == name else b) for i, b in tar_members(data)]
    return pack(with_manifest(members) if manifest else members)


def _renamed(data: bytes, old: str, new: str) -> bytes:
    """(The manifest is left as it was: the new name is refused before it is read.)"""
    members = tar_members(data)
    for info, _ in members:
        if info.name == old:
            info.name = new
    return pack(members)


def _header_files(edit: Callable[[dict[str, bytes]], None]) -> Callable[[bytes], bytes]:
    return lambda d: edit_header(d, edit)


def _set(doc: str, path: list[str], value: Any) -> Callable[[bytes], bytes]:
    def change(header: dict[str, Any]) -> None:
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return lambda d: edit_json(d, doc, change)


def _manifest_line(line: bytes) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        members = tar_members(data)
        return pack([(i, b + line if i.name == "manifest" else b) for i, b in members])

    return edit


def _gzip_trailing(data: bytes) -> bytes:
    members = [(i, b + b"junk" if i.name == "header.tar.gz" else b) for i, b in tar_members(data)]
    return pack(with_manifest(members))


def _payload_bomb(data: bytes) -> bytes:
    return edit_payload(data, [entry("flow.wasm", b"\0" * (LIMIT + 1))])


def _many_members(data: bytes) -> bytes:
    return _insert(data, 2, *(entry(f"x{i}", b"") for i in range(20)))


FAULTS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "not a tar": (lambda d: b"hello, this is not a tar archive" * 40, "tar"),
    "empty": (lambda d: b"", "tar"),
    "first not version": (lambda d: _swap(d, 0, 1), "first member"),
    "hard link": (
        lambda d: _insert(d, 4, entry("x", kind=tarfile.LNKTYPE, link="version")),
        "link",
    ),
    "directory": (lambda d: _insert(d, 4, entry("data", kind=tarfile.DIRTYPE)), "directory"),
    "fifo": (lambda d: _insert(d, 4, entry("fifo", kind=tarfile.FIFOTYPE)), "device or FIFO"),
    "char device": (lambda d: _insert(d, 4, entry("tty", kind=tarfile.CHRTYPE)), "device"),
    "duplicate": (lambda d: _insert(d, 1, entry("version", b"{}")), "twice"),
    "dot segment": (lambda d: _insert(d, 4, entry("./data/0000.tar.gz", b"x")), "unusual"),
    "out of order": (lambda d: _swap(d, 1, 2), "order"),
    "no manifest": (lambda d: _without(d, "manifest"), "no manifest"),
    "no header": (lambda d: _without(d, "header.tar.gz"), "no header"),
    "no payload": (lambda d: _without(d, "data/0000.tar.gz"), "no data"),
    "unknown member": (lambda d: _insert(d, 4, entry("evil.txt", b"x")), "unexpected"),
    "second payload": (lambda d: _insert(d, 5, entry("data/0001.tar.gz", b"x")), "second payload"),
    "manifest names a missing file": (
        _manifest_line(b"0" * 64 + b"  data/0000/other.wasm\n"),
        "not in the artifact",
    ),
    "manifest line malformed": (_manifest_line(b"nonsense\n"), "<sha256>"),
    "unsigned checksum edit": (
        lambda d: _replace(d, "version", b'{"format":"mender","version":3} ', manifest=False),
        "checksum",
    ),
    "state script": (
        _header_files(lambda f: f.update({"scripts/ArtifactInstall_Enter_00": b"#!/bin/sh"})),
        "state scripts",
    ),
    "no type-info": (_header_files(lambda f: f.pop("headers/0000/type-info")), "type-info"),
    "header-info not JSON": (_header_files(lambda f: f.update({"header-info": b"{"})), "not JSON"),
    "header-info NaN": (
        _header_files(lambda f: f.update({"header-info": b'{"a": NaN}'})),
        "finite",
    ),
    "type mismatch": (_set("headers/0000/type-info", ["type"], "other"), "not the payload's"),
    "null payload type": (_set("header-info", ["payloads"], [{"type": None}]), "empty payload"),
    "no payloads": (_set("header-info", ["payloads"], []), "no payload"),
    "no artifact name": (_set("header-info", ["artifact_provides"], {}), "artifact_name"),
    "duplicate device type": (
        _set("header-info", ["artifact_depends", "device_type"], ["a", "a"]),
        "twice",
    ),
    "device type not text": (
        _set("header-info", ["artifact_depends", "device_type"], [1]),
        "device type",
    ),
    "provides not strings": (
        _set("headers/0000/type-info", ["artifact_provides"], {"a": 1}),
        "string",
    ),
    "payload in a directory": (
        lambda d: edit_payload(d, [entry("dir/flow.wasm", WASM)]),
        "directory",
    ),
    "empty payload file": (lambda d: edit_payload(d, [entry("flow.wasm", b"")]), "empty"),
    "payload bomb": (_payload_bomb, "over"),
    "too many members": (_many_members, "more than"),
    "not mender": (lambda d: _replace(d, "version", b'{"format":"other","version":3}'), "'mender'"),
    "format version 1": (
        lambda d: _replace(d, "version", b'{"format":"mender","version":1}'),
        "version 1",
    ),
    "format version 9": (
        lambda d: _replace(d, "version", b'{"format":"mender","version":9}'),
        "known",
    ),
    "gzip trailing bytes": (_gzip_trailing, "after the end"),
    "zstd payload": (lambda d: _renamed(d, "data/0000.tar.gz", "data/0000.tar.zst"), "zstd"),
    "bzip2": (lambda d: _renamed(d, "header.tar.gz", "header.tar.bz2"), "unknown compression"),
    "augment alone": (lambda d: _insert(d, 2, entry("manifest-augment", b"")), "go together"),
}


def test_it_writes_the_file_names_mender_artifact_writes(tmp: Path) -> None:
    """The payload file names the real mender-artifact takes are the ones ``write``
    takes (it refuses UTF-8 and spaces: a manifest is ASCII), and those read back."""
    for name in ("a,b_c-D.9.wasm", "flöw.wasm", "my flow.wasm"):
        done = subprocess.run(
            ["mender-artifact", "write", "module-image", "-T", "wasm-flow", "-n", "n-1",
             "-t", "x", "-f", name, "-o", "out.mender"],
            cwd=_payload(tmp, name), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        takes = FILE_NAME.fullmatch(name) is not None
        assert (done.returncode == 0) is takes, (name, done.stderr)
        args: dict[str, Any] = {"name": "n-1", "device_types": ["x"], "provides": {}}
        if takes:
            data = write(WASM, payload_type="wasm-flow", file_name=name, **args)
            assert read(data, max_payload=LIMIT).file.name == name
        else:
            with pytest.raises(ArtifactError, match="payload file name"):
                write(WASM, payload_type="wasm-flow", file_name=name, **args)
    for name in ("", ".", "..", "a/b.wasm", "x" * 101, "tab\t.wasm"):
        with pytest.raises(ArtifactError, match="payload file name"):
            write(WASM, payload_type="wasm-flow", file_name=name, **args)


def _payload(tmp: Path, name: str) -> Path:
    work = tmp / f"names-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    work.mkdir()
    (work / name).write_bytes(WASM)
    return work


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_crafted_faults_are_refused(plain: bytes, fault: str) -> None:
    make, message = FAULTS[fault]
    with pytest.raises(ArtifactError) as caught:
        read(make(plain), max_payload=LIMIT)
    assert message in str(caught.value), str(caught.value)
    assert caught.value.status == 400


def test_the_header_is_bounded_decompressed(plain: bytes) -> None:
    def pad(files: dict[str, bytes]) -> None:
        files["header-info"] += b" " * (2 << 20)

    bomb = edit_header(plain, pad)
    assert len(bomb) < 64 << 10
    with pytest.raises(ArtifactError, match="over 1048576 bytes decompressed"):
        read(bomb, max_payload=LIMIT)


def test_an_intact_artifact_still_reads(plain: bytes) -> None:
    """(The crafting itself keeps a valid artifact valid.)"""
    assert isinstance(read(edit_header(plain, lambda f: None), max_payload=LIMIT), MenderArtifact)
    assert (
        read(edit_payload(plain, [entry("flow.wasm", WASM)]), max_payload=LIMIT).file.data == WASM
    )
    data = _insert(plain, 2, entry("manifest.sig", b"not checked"))
    assert read(data, max_payload=LIMIT).signed is True
    assert gzip.decompress(tar_members(plain)[-1][1])  # a real gzip payload


# ---------------------------------------------------------------- any bytes


def _parse(data: bytes) -> None:
    """Read ``data``: an :class:`ArtifactError` is fine, any other exception fails."""
    with contextlib.suppress(ArtifactError):
        read(data, max_payload=LIMIT)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_its_error(data: bytes) -> None:
    _parse(data)


Mutation = tuple[int, int]


@pytest.mark.parametrize("base", ["plain", "uncompressed"])
def test_mutations_only_raise_its_error(request: pytest.FixtureRequest, base: str) -> None:
    valid: bytes = request.getfixturevalue(base)

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=8),
        st.integers(0, len(valid)),
        st.binary(max_size=64),
    )
    def mutate(flips: list[Mutation], cut: int, tail: bytes) -> None:
        data = bytearray(valid)
        for at, value in flips:
            data[at] = value
        _parse(bytes(data[:cut]) + tail)

    mutate()


def test_header_mutations_behind_valid_checksums_only_raise_its_error(plain: bytes) -> None:
    """(The manifest's checksums stop a mutated header before it is parsed: here the
    checksums are made right again, so the header's own parsing is what is tried.)"""
    members = tar_members(plain)
    header = gzip.decompress(next(b for i, b in members if i.name == "header.tar.gz"))

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(header) - 1), st.integers(0, 255)), max_size=6))
    def mutate(flips: list[Mutation]) -> None:
        raw = bytearray(header)
        for at, value in flips:
            raw[at] = value
        body = gzip.compress(bytes(raw), mtime=0)
        _parse(
            pack(with_manifest([(i, body if i.name == "header.tar.gz" else b) for i, b in members]))
        )

    mutate()
