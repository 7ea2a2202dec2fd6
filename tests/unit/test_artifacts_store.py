"""ArtifactStore: layout, verification, atomic commit, put_bytes, gc and usage."""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING

import pytest

from agent.device.artifacts import ArtifactStore
from agent.errors import ArtifactError, IntegrityError

if TYPE_CHECKING:
    from pathlib import Path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def test_init_creates_layout(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "artifacts"
    store = ArtifactStore(root)
    assert store.root == root
    assert sorted(p.name for p in root.iterdir()) == ["partial", "sha256", "tmp"]
    sha = _sha(b"x")
    assert store.path(sha) == root / "sha256" / sha
    assert store.partial_path(sha) == root / "partial" / f"{sha}.part"
    assert not store.has(sha)
    assert store.usage() == (0, 0)


def test_digest_is_normalised_and_validated(store: ArtifactStore) -> None:
    sha = _sha(b"abc")
    assert store.path(sha.upper()) == store.path(sha)
    for bad in ("", "abc", "../../etc/passwd", "g" * 64, sha + "0", f"{sha[:-1]}/"):
        with pytest.raises(ArtifactError, match="invalid sha256"):
            store.path(bad)
        with pytest.raises(ArtifactError, match="invalid sha256"):
            store.partial_path(bad)


def test_put_bytes_read_verify(store: ArtifactStore) -> None:
    data = b"\0asm" + os.urandom(5000)
    sha = _sha(data)
    path = store.put_bytes(data, sha)
    assert path == store.path(sha)
    assert store.has(sha)
    assert store.read(sha) == data
    assert store.verify(sha)
    assert store.usage() == (1, len(data))
    assert _names(store.root / "sha256") == [sha]
    assert _names(store.root / "tmp") == []


def test_put_bytes_rejects_wrong_digest(store: ArtifactStore) -> None:
    sha = _sha(b"expected")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.put_bytes(b"something else", sha)
    assert not store.has(sha)
    assert _names(store.root / "sha256") == []
    assert _names(store.root / "tmp") == []


def test_read_missing_raises(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactError, match="not in the store"):
        store.read(_sha(b"nothing"))
    assert not store.verify(_sha(b"nothing"))


def test_verify_deletes_corrupted_file(store: ArtifactStore) -> None:
    data = os.urandom(10_000)
    sha = _sha(data)
    path = store.put_bytes(data, sha)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # flip the last byte
    assert store.has(sha)
    assert not store.verify(sha)
    assert not path.exists()
    assert not store.has(sha)


def test_read_of_corrupted_file_raises_and_deletes(store: ArtifactStore) -> None:
    data = os.urandom(1000)
    sha = _sha(data)
    path = store.put_bytes(data, sha)
    path.write_bytes(b"truncated")
    with pytest.raises(IntegrityError, match="corrupt"):
        store.read(sha)
    assert not path.exists()


def test_commit_moves_file_atomically(store: ArtifactStore) -> None:
    data = os.urandom(4096)
    sha = _sha(data)
    tmp = store.root / "tmp" / "upload.tmp"
    tmp.write_bytes(data)
    path = store.commit(tmp, sha)
    assert path == store.path(sha)
    assert path.read_bytes() == data
    assert not tmp.exists()
    assert _names(store.root / "sha256") == [sha]  # no temp names in sha256/
    assert _names(store.root / "tmp") == []
    # Committing the same digest again replaces the file in one step.
    tmp.write_bytes(data)
    assert store.commit(tmp, sha) == path
    assert _names(store.root / "sha256") == [sha]


def test_commit_failure_leaves_sha256_dir_untouched(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(100)
    sha = _sha(data)
    part = store.partial_path(sha)
    part.write_bytes(data)

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ArtifactError, match="cannot commit"):
        store.commit(part, sha)
    assert _names(store.root / "sha256") == []
    assert part.read_bytes() == data  # still resumable


def test_commit_of_missing_file_raises(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactError, match="cannot commit"):
        store.commit(store.root / "tmp" / "gone", _sha(b"gone"))


def test_gc_keeps_only_what_is_asked(store: ArtifactStore) -> None:
    blobs = [os.urandom(100 + i) for i in range(3)]
    keep_sha, drop_sha, drop2_sha = (_sha(b) for b in blobs)
    for data in blobs:
        store.put_bytes(data, _sha(data))
    kept_partial = _sha(b"kept partial")
    dropped_partial = _sha(b"dropped partial")
    store.partial_path(kept_partial).write_bytes(b"kept")
    store.partial_path(dropped_partial).write_bytes(b"drop")
    store.partial_path(drop_sha).write_bytes(b"also a partial of a dropped artifact")
    (store.root / "sha256" / "junk").write_bytes(b"not an artifact")
    stale = store.root / "tmp" / "stale.tmp"
    stale.write_bytes(b"left by a crash")
    old = time.time() - 2 * ArtifactStore.TMP_STALE_AFTER
    os.utime(stale, (old, old))
    fresh = store.root / "tmp" / "fresh.tmp"
    fresh.write_bytes(b"a put_bytes in progress")

    removed = store.gc({keep_sha.upper(), kept_partial})

    assert removed == sorted({drop_sha, drop2_sha, dropped_partial})
    assert _names(store.root / "sha256") == [keep_sha]
    assert _names(store.root / "partial") == [f"{kept_partial}.part"]
    assert _names(store.root / "tmp") == ["fresh.tmp"]
    assert store.read(keep_sha) == blobs[0]
    assert store.usage() == (1, len(blobs[0]))
    assert store.gc({keep_sha, kept_partial}) == []


def test_gc_with_empty_keep_empties_the_store(store: ArtifactStore) -> None:
    data = b"payload"
    store.put_bytes(data, _sha(data))
    assert store.gc(set()) == [_sha(data)]
    assert store.usage() == (0, 0)


def test_usage_counts_only_artifacts(store: ArtifactStore) -> None:
    a, b = b"a" * 10, b"b" * 25
    store.put_bytes(a, _sha(a))
    store.put_bytes(b, _sha(b))
    store.partial_path(_sha(b"p")).write_bytes(b"x" * 1000)
    assert store.usage() == (2, 35)
