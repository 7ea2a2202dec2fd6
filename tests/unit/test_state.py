"""Persisted state: atomic writes, corrupt files, schema version, crash recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from common import REPO

from agent.device._fsutil import atomic_write
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.state import FlowRecord, Installed, PersistedState, StateStore
from agent.wire.protocol import Status


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = PersistedState(generation=4, desired_raw='{"generation":4}')
    state.flows["f"] = FlowRecord(
        installed=Installed(version="v1", sha256="a" * 64), status=Status.SUCCESS, attempts=1
    )
    store.save(state)
    loaded = StateStore(tmp_path).load()
    assert loaded == state
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "new").load() == PersistedState()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"schema_version": 99}',
        b'{"schema_version": 1, "flows": {"f": {"status": "bogus"}}}',
    ],
)
def test_corrupt_file_moved_aside(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    assert StateStore(tmp_path).load() == PersistedState()
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == content  # nothing is lost: the operator can inspect it


def test_leftover_temp_from_crash_is_ignored_and_removed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(PersistedState(generation=1))
    (tmp_path / ".state.json.abc123.tmp").write_bytes(b'{"half": ')
    assert store.load().generation == 1
    assert not list(tmp_path.glob(".state.json.*.tmp"))


def test_kill_during_writes_leaves_old_or_new(tmp_path: Path) -> None:
    """A child process rewrites the file in a tight loop and is SIGKILLed; the file
    is always one complete version."""
    target = tmp_path / "f.json"
    atomic_write(target, json.dumps({"n": -1}).encode())
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from agent.device._fsutil import atomic_write\n"
        "p = Path(sys.argv[1])\n"
        "print('go', flush=True)\n"
        "n = 0\n"
        "while True:\n"
        "    atomic_write(p, json.dumps({'n': n, 'pad': 'x' * 50000}).encode()); n += 1\n"
    )
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, cwd=REPO
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"go\n"
            # Let it write for a moment (a bounded loop of reads, not a fixed sleep).
            for _ in range(200):
                if json.loads(target.read_bytes())["n"] > 5:
                    break
            proc.kill()
        data = json.loads(target.read_bytes())  # parses: never torn
        assert isinstance(data["n"], int)


def test_recover_maps_inflight_steps(tmp_path: Path) -> None:
    state = PersistedState()
    state.flows["dl"] = FlowRecord(status=Status.DOWNLOADING, inflight="download", attempts=1)
    state.flows["inst"] = FlowRecord(status=Status.INSTALLING, inflight="install", attempts=2)
    state.flows["ok"] = FlowRecord(status=Status.SUCCESS)
    notes = FlowRecords(state).recover(now=100.0)
    assert state.flows["dl"].inflight == "download"  # resumes, same attempt
    assert state.flows["dl"].attempts == 1
    inst = state.flows["inst"]
    assert (inst.status, inst.inflight, inst.next_retry_at) == (Status.FAILURE, None, 100.0)
    assert "interrupted during install" in (inst.error or "")
    assert state.flows["ok"].status == Status.SUCCESS
    assert len(notes) == 2


def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        store = StateStore(blocker / "sub")
    else:  # pragma: no cover - depends on the user running the tests
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        store = StateStore(ro / "sub")
    from agent.errors import StateError

    with pytest.raises(StateError, match="cannot create state dir"):
        store.load()
