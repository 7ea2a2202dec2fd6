"""The reconciler against fakes: no broker, no network, no wasmtime.

Only its public surface is used (the constructor, ``offer_desired``, ``trigger``,
``run_forever``, ``persist``, ``close``, ``set_trust``, ``state``, ``records``,
``on_status``), so the tests hold while its inside is reorganised. Around it:

- a real :class:`StateStore` and :class:`ArtifactStore` in the test's temporary
  directory (fast, and what a restart reads back);
- a fake fetcher that stores the bytes it is given, or raises the agent's artifact
  errors, or blocks until told to go on;
- a fake flow host that records ``prepare``/``activate``/``remove`` in order, and can
  fail or block either of them; its runners are plain objects;
- the real :class:`Reporter` over a fake MQTT session, so the events, deployment logs
  and the state report are the documents an operator would get.

Waits are on conditions (the state file, a call recorded by a fake), never on time.
Three tests here pinned down bugs found while writing them (a swap aborted by a
newer document, a document that could not be saved still stopping the run, a new
signature policy not stopping a download in flight); they pass since the fixes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from common import wait_until
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.device.artifacts import ArtifactStore, Fetcher, Progress
from agent.device.config import AgentConfig
from agent.device.deploy.reconciler import Reconciler
from agent.device.deploy.records import FlowRecords
from agent.device.deploy.state import PersistedState, StateStore
from agent.device.reporter import Reporter
from agent.device.runtime.flows import FlowHost
from agent.device.runtime.runner import RunSpec
from agent.errors import (
    AgentError,
    ArtifactError,
    ArtifactTooLarge,
    DownloadError,
    InstantiationError,
    IntegrityError,
    StateError,
)
from agent.wire.protocol import Status
from agent.wire.signing import Trust, key_id, sign
from agent.wire.topics import Topics

S = Status
TIMEOUT = 5.0
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 0.2

# ---------------------------------------------------------------- artifacts and documents


def blob(version: str) -> bytes:
    """A distinct artifact per version (the fake runtime never looks inside)."""
    return b"\0asm\x01\0\0\0" + version.encode()


def sha(version: str) -> str:
    return hashlib.sha256(blob(version)).hexdigest()


def url(version: str) -> str:
    return f"https://artifacts.example/{version}.wasm"


def entry(version: str, **extra: Any) -> dict[str, Any]:
    artifact: dict[str, Any] = {"url": url(version), "sha256": sha(version)}
    if "signature" in extra:
        artifact["signature"] = extra.pop("signature")
    return {"version": version, "artifact": artifact, **extra}


def doc(generation: int, **flows: Any) -> bytes:
    return json.dumps({"generation": generation, "flows": flows}).encode()


# ---------------------------------------------------------------- fakes


class FakeSession:
    """The MQTT session the real Reporter publishes through."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, json.loads(payload)))


class FakeRuntime:
    """What the reconciler's steps use of the sandbox runtime."""

    def __init__(self) -> None:
        self.validated: list[bytes] = []
        self.forgotten: list[str] = []

    async def run(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        return fn()

    def validate(self, data: bytes) -> None:
        self.validated.append(data)

    def forget(self, sha256: str) -> None:
        self.forgotten.append(sha256)

    def forget_cached(self, keep: set[str]) -> int:
        return 0


class FakeRunner:
    def __init__(self, spec: RunSpec, data: bytes) -> None:
        self.spec = spec
        self.data = data
        self.stopped = False

    @property
    def flow_id(self) -> str:
        return self.spec.flow_id

    @property
    def version(self) -> str:
        return self.spec.version

    def stop(self, health: object = None) -> None:
        self.stopped = True


Call = tuple[str, str, str | None]  # (operation, flow id, version)


class FakeHost:
    """A flow host that records its calls, like FlowHost: ``activate`` swaps the new
    runner in at once, then stops the old one (which may take a while: ``stop_gate``)."""

    def __init__(self) -> None:
        self.runtime = FakeRuntime()
        self.running: dict[str, FakeRunner] = {}
        self.calls: list[Call] = []
        #: The version running when each ``prepare`` happened (blue/green check).
        self.running_at_prepare: list[str | None] = []
        self.fail: dict[tuple[str, str], AgentError] = {}  # (operation, version) -> error
        self.prepare_gate: asyncio.Event | None = None
        self.stop_gate: asyncio.Event | None = None
        self.prepared: list[FakeRunner] = []

    async def prepare(self, spec: RunSpec, data: bytes) -> FakeRunner:
        self.calls.append(("prepare", spec.flow_id, spec.version))
        old = self.running.get(spec.flow_id)
        self.running_at_prepare.append(old.version if old else None)
        if self.prepare_gate is not None:
            await self.prepare_gate.wait()
        error = self.fail.get(("prepare", spec.version))
        if error is not None:
            raise error
        runner = FakeRunner(spec, data)
        self.prepared.append(runner)
        return runner

    async def activate(self, flow_id: str, runner: FakeRunner) -> FakeRunner | None:
        error = self.fail.get(("activate", runner.version))
        if error is not None:
            raise error
        old = self.running.get(flow_id)
        self.running[flow_id] = runner
        self.calls.append(("activate", flow_id, runner.version))
        if old is not None:
            if self.stop_gate is not None:
                await self.stop_gate.wait()
            old.stopped = True
            self.calls.append(("stop", flow_id, old.version))
        return old

    async def remove(self, flow_id: str, *, purge: bool = False) -> bool:
        runner = self.running.pop(flow_id, None)
        self.calls.append(("remove", flow_id, runner.version if runner else None))
        if runner is not None:
            runner.stopped = True
        return runner is not None

    def defer_until(self, flow_id: str) -> float | None:
        return None  # no flow asks to defer updates here

    def module_digests(self) -> set[str]:
        return {r.spec.sha256 for r in self.running.values()}


@dataclass
class FetchCall:
    url: str
    sha256: str
    at: float  # time.monotonic()


class FakeFetcher:
    """Stores the bytes of a known URL; or raises the queued errors first; or blocks
    while the URL has a gate that is not set."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.blobs: dict[str, bytes] = {}
        self.errors: dict[str, list[ArtifactError]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.calls: list[FetchCall] = []
        self.cancelled: list[str] = []

    def serve(self, *versions: str) -> None:
        for version in versions:
            self.blobs[url(version)] = blob(version)

    def urls(self) -> list[str]:
        return [c.url for c in self.calls]

    async def fetch(
        self, url: str, sha256: str, size: int | None = None, progress: Progress | None = None
    ) -> Path:
        self.calls.append(FetchCall(url, sha256, time.monotonic()))
        gate = self.gates.get(url)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(url)
                raise
        errors = self.errors.get(url)
        if errors:
            raise errors.pop(0)
        data = self.blobs[url]
        path = await asyncio.to_thread(self.store.put_bytes, data, sha256)
        if progress is not None:
            progress(len(data), len(data))
        return path


class FlakyStateStore(StateStore):
    """The real state store, whose writes fail while ``full`` (a full disk)."""

    full = False

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        #: Every state file written, in order (each is two fsyncs).
        self.saved: list[bytes] = []

    def save_bytes(self, data: bytes) -> None:
        if self.full:
            raise StateError(f"cannot write {self.path}: No space left on device")
        # (listed first: the write runs in a thread, and a test that saw the file on
        # disk must find it in this list too)
        self.saved.append(data)
        super().save_bytes(data)

    def statuses_saved(self, flow_id: str, since: int = 0) -> list[str]:
        """The status of ``flow_id`` in each state file written from the ``since``-th on."""
        out = []
        for data in self.saved[since:]:
            rec = json.loads(data)["flows"].get(flow_id)
            out.append(rec["status"] if rec else "-")
        return out


# ---------------------------------------------------------------- the rig


@dataclass
class Rig:
    """One reconciler and its surroundings, on a state dir."""

    state_dir: Path
    rec: Reconciler
    host: FakeHost
    fetcher: FakeFetcher
    artifacts: ArtifactStore
    session: FakeSession
    reporter: Reporter
    store: FlakyStateStore
    #: Every ``on_status`` call: (flow id, status).
    statuses: list[tuple[str, Status]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    # -- driving
    def start(self) -> None:
        self.task = asyncio.create_task(self.rec.run_forever(), name="test-reconciler")

    async def stop(self) -> None:
        """Stop as the daemon does: close at a safe point, then end the loop."""
        await self.rec.close()
        if self.task is not None:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task
            self.task = None

    async def crash(self) -> bytes:
        """End the loop without a clean shutdown; the state file's bytes at that moment."""
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        self.task = None
        return self.store.path.read_bytes()

    async def offer(self, payload: bytes) -> bool:
        return await self.rec.offer_desired(payload)

    async def until(self, check: Callable[[], Any], what: str) -> Any:
        def alive_and(check: Callable[[], Any] = check) -> Any:
            if self.task is not None and self.task.done():
                self.task.result()  # the loop ended: show why
                raise AssertionError("the reconcile loop ended")
            return check()

        return await wait_until(alive_and, TIMEOUT, what)

    async def until_status(self, flow_id: str, status: Status, version: str | None = None) -> None:
        def reached() -> bool:
            rec = self.rec.records.get(flow_id)
            return (
                rec is not None
                and rec.status == status
                and (version is None or rec.desired_version == version)
            )

        await self.until(reached, f"{flow_id} to be {status.value} {version or ''}")

    # -- observing
    def events(self, flow_id: str | None = None) -> list[dict[str, Any]]:
        return [
            d
            for t, d in self.session.sent
            if t == "edge/dev1/events" and (flow_id is None or d["flowId"] == flow_id)
        ]

    def trail(self, flow_id: str) -> list[tuple[str, str | None]]:
        """The status events of a flow: (status, version); progress events left out."""
        return [(e["status"], e["version"]) for e in self.events(flow_id) if not e["progress"]]

    def logs(self) -> list[tuple[str, dict[str, Any]]]:
        return [(t, d) for t, d in self.session.sent if "/deployments/" in t]

    def report(self) -> dict[str, Any]:
        """The state document the reporter would publish now."""
        snapshot = self.reporter.snapshot()
        data: dict[str, Any] = json.loads(snapshot.model_dump_json(by_alias=True))
        return data

    def on_disk(self) -> PersistedState:
        """The state file as it is now. Read only: ``StateStore.load`` would also clear
        temp files, and so could break a write of the running reconciler."""
        return PersistedState.model_validate_json(self.store.path.read_bytes())

    async def until_saved(self, flow_id: str, status: Status, version: str) -> None:
        """Until the state file has ``flow_id`` at ``status`` for ``version``."""

        def saved() -> bool:
            rec = self.on_disk().flows.get(flow_id)
            return rec is not None and (rec.status, rec.desired_version) == (status, version)

        await self.until(saved, f"{flow_id} {status.value} {version} on disk")


def make_rig(
    state_dir: Path,
    *,
    trust: Trust | None = None,
    recover: bool = False,
    reconcile: dict[str, Any] | None = None,
) -> Rig:
    """Assemble a reconciler the way the daemon does, with fakes at the edges."""
    cfg = AgentConfig.model_validate(
        {
            "device_id": "dev1",
            "device_type": "rpi4",
            "state_dir": str(state_dir),
            "reconcile": {
                "retry_backoff_initial": BACKOFF_INITIAL,
                "retry_backoff_max": BACKOFF_MAX,
                **(reconcile or {}),
            },
        }
    )
    store = FlakyStateStore(state_dir)
    state = store.load()
    records = FlowRecords(state)
    if recover:
        records.recover()
    artifacts = ArtifactStore(state_dir / "artifacts")
    host = FakeHost()
    fetcher = FakeFetcher(artifacts)
    session = FakeSession()
    reporter = Reporter(
        session,  # type: ignore[arg-type]
        Topics("edge", "dev1"),
        state,
        device_type="rpi4",
        runtime="fake",
    )
    rec = Reconciler(
        cfg,
        state,
        store,
        cast(FlowHost, host),
        artifacts,
        cast(Fetcher, fetcher),
        reporter,
        trust=trust,
        records=records,
    )
    rig = Rig(state_dir, rec, host, fetcher, artifacts, session, reporter, store)
    rec.on_status = lambda flow_id, status: rig.statuses.append((flow_id, status))
    return rig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path / "state")
    r.start()
    try:
        yield r
    finally:
        await r.stop()


async def install(rig: Rig, generation: int, version: str, **extra: Any) -> None:
    """Deploy ``version`` of flow ``f`` and wait until its success is on disk."""
    rig.fetcher.serve(version)
    assert await rig.offer(doc(generation, f=entry(version, **extra)))
    await rig.until_status("f", S.SUCCESS, version)
    await rig.until_saved("f", S.SUCCESS, version)


# ---------------------------------------------------------------- deploying


async def test_one_flow_is_fetched_prepared_activated_and_reported(rig: Rig) -> None:
    rig.fetcher.serve("v1")
    assert await rig.offer(doc(1, f=entry("v1", deploymentId="d-1")))
    await rig.until_status("f", S.SUCCESS)

    assert [(c.url, c.sha256) for c in rig.fetcher.calls] == [(url("v1"), sha("v1"))]
    assert rig.host.calls == [("prepare", "f", "v1"), ("activate", "f", "v1")]
    runner = rig.host.running["f"]
    assert (runner.spec.sha256, runner.data) == (sha("v1"), blob("v1"))
    assert rig.host.runtime.validated == [blob("v1")]  # verified before it was started

    flow = rig.report()["flows"]["f"]
    assert (flow["status"], flow["currentVersion"], flow["desiredVersion"]) == (
        "success",
        "v1",
        "v1",
    )
    assert (flow["attempts"], flow["error"], flow["deploymentId"]) == (1, None, "d-1")
    assert rig.report()["generation"] == 1

    # One event and one on_status call per transition, in order.
    steps = ["pending", "downloading", "installing", "success"]
    assert rig.trail("f") == [(s, "v1") for s in steps]
    assert {e["deploymentId"] for e in rig.events("f")} == {"d-1"}
    assert rig.statuses == [("f", S(s)) for s in steps]

    # The intent and the outcome are on disk.
    await rig.until_saved("f", S.SUCCESS, "v1")
    saved = rig.on_disk()
    assert saved.generation == 1
    assert saved.flows["f"].installed is not None
    assert (saved.flows["f"].installed.version, saved.flows["f"].status) == ("v1", S.SUCCESS)
    assert saved.flows["f"].inflight is None


async def test_a_deployment_writes_the_state_file_four_times(rig: Rig) -> None:
    """Regression guard for the cost of a deployment (each write is two fsyncs, the
    largest share of a small deployment's time): the intent, then one save before
    each piece of work that a crash could interrupt (download, install), then the
    outcome. The intent is not written twice when no run is in flight."""
    rig.fetcher.serve("v1")
    before = len(rig.store.saved)
    assert await rig.offer(doc(1, f=entry("v1")))
    await rig.until_saved("f", S.SUCCESS, "v1")
    assert rig.store.statuses_saved("f", before) == [
        "pending",
        "downloading",
        "installing",
        "success",
    ]


async def test_back_to_a_stored_version_writes_the_state_file_three_times(rig: Rig) -> None:
    """A version whose artifact is still in the store skips the download and so its
    save; the attempt is still counted by the ``installing`` save."""
    await install(rig, 1, "v1")
    await install(rig, 2, "v2")
    before = len(rig.store.saved)
    assert await rig.offer(doc(3, f=entry("v1")))
    await rig.until_saved("f", S.SUCCESS, "v1")
    assert rig.store.statuses_saved("f", before) == ["pending", "installing", "success"]
    assert rig.fetcher.urls() == [url("v1"), url("v2")]  # not fetched again
    steps = ("pending", "downloading", "installing", "success")
    assert rig.trail("f")[-4:] == [(s, "v1") for s in steps]
    saved = json.loads(rig.store.saved[-2])["flows"]["f"]
    assert (saved["attempts"], saved["inflight"]) == (1, "install")


async def test_new_version_starts_beside_the_old_one_before_the_swap(rig: Rig) -> None:
    await install(rig, 1, "v1")
    old = rig.host.running["f"]
    await install(rig, 2, "v2")

    assert rig.host.calls == [
        ("prepare", "f", "v1"),
        ("activate", "f", "v1"),
        ("prepare", "f", "v2"),
        ("activate", "f", "v2"),
        ("stop", "f", "v1"),  # the old one stops only once the new one is swapped in
    ]
    assert rig.host.running_at_prepare == [None, "v1"]  # v2 started while v1 ran
    assert old.stopped
    assert rig.host.running["f"].version == "v2"
    assert not rig.host.running["f"].stopped
    saved = rig.rec.records["f"]
    assert saved.installed is not None
    assert saved.previous is not None
    assert (saved.installed.version, saved.previous.version) == ("v2", "v1")
    assert rig.trail("f")[4:] == [
        ("pending", "v2"),
        ("downloading", "v2"),
        ("installing", "v2"),
        ("success", "v2"),
    ]


async def test_the_same_version_again_is_already_installed_without_a_restart(rig: Rig) -> None:
    await install(rig, 1, "v1", deploymentId="d-1")
    assert await rig.offer(doc(2, f=entry("v1", deploymentId="d-2")))
    await rig.until_status("f", S.ALREADY_INSTALLED)
    assert len(rig.fetcher.calls) == 1
    assert [c[0] for c in rig.host.calls] == ["prepare", "activate"]
    assert rig.events("f")[-1]["deploymentId"] == "d-2"


@pytest.mark.parametrize(
    ("failing", "reason"),
    [
        ("prepare", "start-up trapped: unreachable"),
        ("activate", "cannot subscribe the trigger topics"),
    ],
)
async def test_a_version_that_cannot_start_leaves_the_old_one_running(
    rig: Rig, failing: str, reason: str
) -> None:
    await install(rig, 1, "v1")
    old = rig.host.running["f"]
    rig.host.fail[(failing, "v2")] = InstantiationError(reason)
    rig.fetcher.serve("v2")
    assert await rig.offer(doc(2, f=entry("v2", retries=0)))
    await rig.until_status("f", S.FAILURE)

    assert rig.host.running["f"] is old
    assert not old.stopped
    assert all(r.stopped for r in rig.host.prepared if r is not old)  # no stray new runner
    flow = rig.report()["flows"]["f"]
    assert (flow["currentVersion"], flow["desiredVersion"], flow["error"]) == ("v1", "v2", reason)
    assert flow["retryAt"] is None  # retries=0: final
    assert rig.artifacts.has(sha("v1"))


# ---------------------------------------------------------------- removing, collecting


@pytest.mark.parametrize(
    ("removal", "deployment_id"),
    [
        ({}, None),  # the flow is left out
        ({"f": None}, None),
        ({"f": {"version": "", "deploymentId": "rm-1"}}, "rm-1"),
    ],
    ids=["absent", "null", "blank-version"],
)
async def test_removal_stops_the_flow_and_a_later_generation_forgets_it(
    rig: Rig, removal: dict[str, Any], deployment_id: str | None
) -> None:
    await install(rig, 1, "v1")
    runner = rig.host.running["f"]
    assert await rig.offer(doc(2, **removal))
    await rig.until_status("f", S.REMOVED)

    assert rig.host.calls[-1] == ("remove", "f", "v1")
    assert runner.stopped
    assert "f" not in rig.host.running
    removed = rig.events("f")[-1]
    assert (removed["status"], removed["deploymentId"]) == ("removed", deployment_id)
    assert rig.report()["flows"]["f"]["currentVersion"] is None
    # Kept as the previous version until the record goes.
    assert rig.artifacts.has(sha("v1"))

    assert await rig.offer(doc(3))
    await rig.until(lambda: "f" not in rig.rec.records, "the record to be forgotten")
    await rig.until(lambda: sha("v1") in rig.host.runtime.forgotten, "v1 to be collected")
    assert not rig.artifacts.has(sha("v1"))
    assert "f" not in rig.on_disk().flows
    assert rig.trail("f")[-1] == ("removed", None)  # forgetting sends no event


async def test_artifacts_no_longer_installed_previous_or_desired_are_collected(rig: Rig) -> None:
    await install(rig, 1, "v1")
    await install(rig, 2, "v2")
    assert rig.artifacts.has(sha("v1"))  # the previous version stays
    await install(rig, 3, "v3")
    await rig.until(lambda: rig.host.runtime.forgotten, "the run's garbage collection")
    assert rig.host.runtime.forgotten == [sha("v1")]
    assert not rig.artifacts.has(sha("v1"))
    assert rig.artifacts.has(sha("v2"))
    assert rig.artifacts.has(sha("v3"))


# ---------------------------------------------------------------- failures and retries


async def test_failed_attempts_are_retried_with_exponential_backoff(rig: Rig) -> None:
    retry_in: list[float] = []

    def on_status(flow_id: str, status: Status) -> None:
        rig.statuses.append((flow_id, status))
        if status == S.FAILURE:
            at = rig.rec.records[flow_id].next_retry_at
            assert at is not None
            retry_in.append(at - time.time())

    rig.rec.on_status = on_status
    rig.fetcher.serve("v1")
    rig.fetcher.errors[url("v1")] = [
        DownloadError("connection refused by artifacts.example"),
        DownloadError("HTTP 503 from artifacts.example"),
    ]
    assert await rig.offer(doc(1, f=entry("v1", retries=2)))
    await rig.until_status("f", S.SUCCESS)

    assert rig.trail("f") == [
        ("pending", "v1"),
        ("downloading", "v1"),
        ("failure", "v1"),
        ("downloading", "v1"),
        ("failure", "v1"),
        ("downloading", "v1"),
        ("installing", "v1"),
        ("success", "v1"),
    ]
    failures = [e for e in rig.events("f") if e["status"] == "failure"]
    assert [e["error"] for e in failures] == [
        "connection refused by artifacts.example",
        "HTTP 503 from artifacts.example",
    ]
    assert rig.rec.records["f"].attempts == 3
    # min(max, initial * 2^(n-1)) after the n-th failed attempt: 0.05 s, then 0.1 s.
    assert retry_in == [
        pytest.approx(BACKOFF_INITIAL, abs=0.02),
        pytest.approx(2 * BACKOFF_INITIAL, abs=0.02),
    ]
    at = [c.at for c in rig.fetcher.calls]
    assert at[1] - at[0] >= BACKOFF_INITIAL - 0.01
    assert at[2] - at[1] >= 2 * BACKOFF_INITIAL - 0.01
    # Each failed attempt publishes a deployment log (retained, per flow without an id).
    logs = rig.logs()
    assert [t for t, _ in logs] == ["edge/dev1/deployments/f/log"] * 2
    assert [d["attempts"] for _, d in logs] == [1, 2]


@pytest.mark.parametrize(
    "error",
    [
        IntegrityError("sha256 mismatch: expected 1a2b3c4d5e6f, got 000000000000"),
        ArtifactTooLarge("https://artifacts.example/v1.wasm is over the limit of 1024 bytes"),
        ArtifactError("unsupported artifact URL scheme"),
        DownloadError("HTTP 404 from artifacts.example"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_failure_with_no_retries_left_is_final_with_its_reason(
    rig: Rig, error: ArtifactError
) -> None:
    rig.fetcher.errors[url("v1")] = [error]
    assert await rig.offer(doc(1, f=entry("v1", retries=0, deploymentId="d-1")))
    await rig.until_status("f", S.FAILURE)
    await rig.until(rig.logs, "the deployment log")  # (published once the failure is saved)

    rec = rig.rec.records["f"]
    assert (rec.error, rec.attempts, rec.next_retry_at, rec.installed) == (
        str(error),
        1,
        None,
        None,
    )
    flow = rig.report()["flows"]["f"]
    assert (flow["status"], flow["error"], flow["retryAt"]) == ("failure", str(error), None)
    ((topic, log),) = rig.logs()
    assert topic == "edge/dev1/deployments/d-1/log"
    assert (log["deploymentId"], log["attempts"]) == ("d-1", 1)
    assert rig.host.calls == []
    assert "\n" not in str(rec.error)


@pytest.mark.parametrize(
    ("deployment_id", "retried"),
    [("d-1", False), ("d-2", True)],
    ids=["same-deployment", "new-deployment"],
)
async def test_a_failed_target_is_retried_only_under_a_new_deployment_id(
    rig: Rig, deployment_id: str, retried: bool
) -> None:
    rig.fetcher.serve("v1", "other")
    rig.fetcher.errors[url("v1")] = [IntegrityError("sha256 mismatch")]
    assert await rig.offer(doc(1, f=entry("v1", retries=0, deploymentId="d-1")))
    await rig.until_status("f", S.FAILURE)

    # A higher generation with the same entry (or a new deploymentId), and a marker
    # flow: once the marker is installed, the run that planned `f` is over.
    again = doc(2, f=entry("v1", retries=0, deploymentId=deployment_id), g=entry("other"))
    assert await rig.offer(again)
    await rig.until_status("g", S.SUCCESS)
    if retried:
        await rig.until_status("f", S.SUCCESS)
        assert rig.rec.records["f"].attempts == 1  # a new target counts from 1
        assert rig.events("f")[-1]["deploymentId"] == "d-2"
    else:
        assert rig.rec.records["f"].status == S.FAILURE
        assert rig.rec.records["f"].error == "sha256 mismatch"
    assert rig.fetcher.urls().count(url("v1")) == (2 if retried else 1)


# ---------------------------------------------------------------- documents refused


@pytest.mark.parametrize(
    ("payload", "generation", "reason"),
    [
        (b"", None, "empty desired document (retained message cleared); ignored"),
        (b"{not json", None, "desired document is not valid JSON: "),
        (b"[1, 2]", None, "desired document must be a JSON object"),
        (b'{"flows": {}}', None, "desired document invalid: generation: Field required"),
        (b'{"generation": "7", "flows": {}}', None, "desired document invalid: generation: "),
        (b'{"generation": 7, "flows": {"..": null}}', None, "desired document invalid: flow id"),
        (doc(4), 4, "generation 4 is older than the applied 5; ignored"),
        (
            doc(5, f=entry("v2")),
            5,
            "generation 5 is already applied with other content; "
            "a changed document needs a higher generation",
        ),
    ],
    ids=[
        "empty",
        "not-json",
        "not-object",
        "no-generation",
        "string-generation",
        "bad-flow-id",
        "stale-generation",
        "same-generation-other-content",
    ],
)
async def test_a_refused_document_is_rejected_and_the_applied_one_kept(
    rig: Rig, payload: bytes, generation: int | None, reason: str
) -> None:
    await install(rig, 5, "v1")
    applied = rig.rec.state.desired_raw
    calls = list(rig.host.calls)

    assert await rig.offer(payload) is False

    rejected = rig.report()["rejected"]
    assert rejected["generation"] == generation
    assert rejected["reason"].startswith(reason)
    assert "\n" not in rejected["reason"]
    assert (rig.rec.state.generation, rig.rec.state.desired_raw) == (5, applied)
    assert rig.report()["generation"] == 5
    # Nothing changed for the flow; a trigger plans from the applied document.
    rig.rec.trigger()
    assert await rig.offer(doc(6, f=entry("v1"), g=entry("v1")))
    await rig.until_status("g", S.SUCCESS)
    assert rig.rec.state.rejected is None  # an accepted document clears it
    assert rig.host.calls == [*calls, ("prepare", "g", "v1"), ("activate", "g", "v1")]
    assert rig.host.running["f"].version == "v1"
    assert rig.trail("f")[-1] == ("success", "v1")


async def test_the_applied_document_again_is_ignored_silently(rig: Rig) -> None:
    await install(rig, 5, "v1")
    events = len(rig.events())
    assert await rig.offer(doc(5, f=entry("v1"))) is False
    assert rig.rec.state.rejected is None
    assert len(rig.events()) == events


async def test_a_document_that_cannot_be_persisted_is_rejected(rig: Rig) -> None:
    await install(rig, 1, "v1")
    rig.store.full = True
    rig.fetcher.serve("v2")
    assert await rig.offer(doc(2, f=entry("v2"))) is False
    rejected = rig.rec.state.rejected
    assert rejected is not None
    assert rejected.reason.startswith("cannot persist the desired state: cannot write ")
    assert "No space left on device" in rejected.reason
    assert rig.rec.state.generation == 1
    assert rig.rec.records["f"].status == S.SUCCESS
    assert rig.rec.records["f"].desired_version == "v1"

    rig.store.full = False  # space freed: the next document applies
    assert await rig.offer(doc(3, f=entry("v2")))
    await rig.until_status("f", S.SUCCESS, "v2")
    assert rig.trail("f")[4] == ("pending", "v2")
    assert rig.fetcher.urls() == [url("v1"), url("v2")]


async def test_a_document_that_cannot_be_persisted_leaves_the_attempt_in_flight_alone(
    rig: Rig,
) -> None:
    rig.fetcher.serve("v1", "v2")
    gate = rig.fetcher.gates[url("v1")] = asyncio.Event()
    assert await rig.offer(doc(1, f=entry("v1")))
    await rig.until(lambda: url("v1") in rig.fetcher.urls(), "v1 to be downloading")
    before = rig.trail("f")

    rig.store.full = True
    assert await rig.offer(doc(2, f=entry("v2"))) is False
    rig.store.full = False
    # "A rejected document changes nothing on the device ... no event for a rejection."
    assert rig.trail("f") == before
    gate.set()
    await rig.until_status("f", S.SUCCESS, "v1")
    assert rig.rec.records["f"].attempts == 1


# ---------------------------------------------------------------- superseded documents


async def test_a_newer_document_aborts_a_download_in_flight_and_wins(rig: Rig) -> None:
    rig.fetcher.serve("v1", "v2")
    rig.fetcher.gates[url("v1")] = asyncio.Event()  # never set: v1 is slow
    assert await rig.offer(doc(1, f=entry("v1")))
    await rig.until(lambda: url("v1") in rig.fetcher.urls(), "v1 to be downloading")

    assert await rig.offer(doc(2, f=entry("v2")))
    await rig.until_status("f", S.SUCCESS, "v2")

    assert rig.fetcher.cancelled == [url("v1")]
    assert rig.host.calls == [("prepare", "f", "v2"), ("activate", "f", "v2")]
    assert rig.trail("f") == [
        ("pending", "v1"),
        ("downloading", "v1"),
        ("aborted", "v1"),
        ("pending", "v2"),
        ("downloading", "v2"),
        ("installing", "v2"),
        ("success", "v2"),
    ]
    aborted = rig.events("f")[2]
    assert aborted["error"] == "superseded by generation 2"
    assert rig.rec.records["f"].attempts == 1


async def test_a_newer_document_that_keeps_the_target_does_not_cost_an_attempt(rig: Rig) -> None:
    rig.fetcher.serve("v1", "other")
    gate = rig.fetcher.gates[url("v1")] = asyncio.Event()
    assert await rig.offer(doc(1, f=entry("v1")))
    await rig.until(lambda: url("v1") in rig.fetcher.urls(), "v1 to be downloading")

    assert await rig.offer(doc(2, f=entry("v1"), g=entry("other")))
    gate.set()
    await rig.until_status("f", S.SUCCESS)
    await rig.until_status("g", S.SUCCESS)

    assert rig.fetcher.cancelled == [url("v1")]
    assert rig.fetcher.urls().count(url("v1")) == 2  # the download was resumed
    assert rig.rec.records["f"].attempts == 1
    assert rig.trail("f") == [
        ("pending", "v1"),
        ("downloading", "v1"),
        ("installing", "v1"),
        ("success", "v1"),
    ]
    assert rig.host.calls.count(("prepare", "f", "v1")) == 1


async def test_a_newer_document_during_the_swap_does_not_abort_the_swapped_version(
    rig: Rig,
) -> None:
    await install(rig, 1, "v1")
    rig.host.stop_gate = stop = asyncio.Event()  # stopping v1 takes a while
    rig.fetcher.serve("v2", "v3")
    assert await rig.offer(doc(2, f=entry("v2")))
    await rig.until(lambda: ("activate", "f", "v2") in rig.host.calls, "v2 to be swapped in")

    offered = asyncio.create_task(rig.offer(doc(3, f=entry("v3"))))
    # Let the offer go as far as it goes while v1 is still stopping (loop turns, not
    # time: whether it waits for the swap or not, this ends).
    for _ in range(200):
        if offered.done() or rig.rec.records["f"].status != S.INSTALLING:
            break
        await asyncio.sleep(0)
    assert ("aborted", "v2") not in rig.trail("f")
    stop.set()
    assert await offered
    await rig.until_status("f", S.SUCCESS, "v3")
    assert ("success", "v2") in rig.trail("f")


# ---------------------------------------------------------------- restarts


@pytest.mark.parametrize(
    ("crash_at", "attempts", "failure"),
    [
        ("pending", 1, None),
        ("download", 1, None),
        ("install", 2, "interrupted during install (attempt 1)"),
    ],
)
async def test_a_new_reconciler_resumes_the_persisted_intent(
    tmp_path: Path, crash_at: str, attempts: int, failure: str | None
) -> None:
    state_dir = tmp_path / "state"
    first = make_rig(state_dir)
    first.fetcher.serve("v1")
    if crash_at == "pending":  # accepted and persisted; the loop never ran
        assert await first.offer(doc(1, f=entry("v1", deploymentId="d-1")))
        image = first.store.path.read_bytes()
    else:
        if crash_at == "download":
            first.fetcher.gates[url("v1")] = asyncio.Event()
        else:
            first.host.prepare_gate = asyncio.Event()

        def started() -> bool:
            if crash_at == "download":
                return url("v1") in first.fetcher.urls()
            return ("prepare", "f", "v1") in first.host.calls

        first.start()
        assert await first.offer(doc(1, f=entry("v1", deploymentId="d-1")))
        # Once the work that can be interrupted has started, its step is on disk.
        await first.until(started, f"the {crash_at} to start")
        image = await first.crash()
    await first.stop()  # (frees its writer thread)
    first.store.path.write_bytes(image)  # the disk as the crash left it
    assert first.on_disk().flows["f"].inflight == (None if crash_at == "pending" else crash_at)

    second = make_rig(state_dir, recover=True)  # as the daemon: load, recover, construct
    recovered = second.rec.records["f"]
    if failure is None:  # nothing to map: the same attempt goes on
        assert recovered.status == (S.PENDING if crash_at == "pending" else S.DOWNLOADING)
    else:  # an interrupted install is a failed attempt, due for a retry now
        assert (recovered.status, recovered.error) == (S.FAILURE, failure)
        assert recovered.next_retry_at is not None
        assert recovered.next_retry_at <= time.time()
    second.fetcher.serve("v1")
    second.start()
    try:
        await second.until_status("f", S.SUCCESS)
        rec = second.rec.records["f"]
        assert rec.installed is not None
        assert (rec.installed.version, rec.attempts, rec.deployment_id) == ("v1", attempts, "d-1")
        assert second.host.calls == [("prepare", "f", "v1"), ("activate", "f", "v1")]
        assert second.trail("f")[-2:] == [("installing", "v1"), ("success", "v1")]
        await second.until_saved("f", S.SUCCESS, "v1")
        # The retained document coming back after the restart changes nothing.
        assert await second.offer(doc(1, f=entry("v1", deploymentId="d-1"))) is False
        assert second.rec.state.rejected is None
    finally:
        await second.stop()


# ---------------------------------------------------------------- signatures


def signed_entry(version: str, key: Ed25519PrivateKey, over: str | None = None) -> dict[str, Any]:
    sig = sign(key, over or sha(version))
    return entry(version, signature={"keyId": sig.key_id, "sig": sig.sig})


TRUSTED = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()
TRUSTED_ID = key_id(TRUSTED.public_key())
STRANGER_ID = key_id(STRANGER.public_key())


@pytest.mark.parametrize(
    ("require", "flow", "refusal"),
    [
        (False, entry("v1"), None),
        (True, signed_entry("v1", TRUSTED), None),
        (True, entry("v1"), "artifact is not signed and this device requires signed artifacts"),
        (
            False,
            signed_entry("v1", STRANGER),
            f"artifact signed by unknown key {STRANGER_ID} (trusted: {TRUSTED_ID})",
        ),
        (
            True,
            signed_entry("v1", TRUSTED, over=sha("v2")),
            f"artifact signature by key {TRUSTED_ID} does not verify",
        ),
    ],
    ids=["unsigned-optional", "signed", "unsigned-required", "unknown-key", "bad-signature"],
)
async def test_signature_policy(
    tmp_path: Path, require: bool, flow: dict[str, Any], refusal: str | None
) -> None:
    trust = Trust({TRUSTED_ID: TRUSTED.public_key()}, require=require)
    r = make_rig(tmp_path / "state", trust=trust)
    r.fetcher.serve("v1")
    r.start()
    try:
        assert await r.offer(doc(1, f=flow))  # the document is accepted; the entry judged
        if refusal is None:
            await r.until_status("f", S.SUCCESS)
            return
        await r.until_status("f", S.FAILURE)
        state = r.report()["flows"]["f"]
        assert (state["error"], state["retryAt"], state["attempts"]) == (refusal, None, 0)
        assert r.fetcher.calls == []  # refused before anything is downloaded
        assert r.host.calls == []
        assert r.trail("f") == [("failure", None)]
    finally:
        await r.stop()


async def test_set_trust_rejudges_the_applied_document_and_keeps_the_running_version(
    rig: Rig,
) -> None:
    await install(rig, 1, "v1")
    runner = rig.host.running["f"]
    await rig.rec.set_trust(Trust({}, require=True))
    await rig.until_status("f", S.FAILURE)
    assert rig.rec.records["f"].error == (
        "artifact is not signed and this device requires signed artifacts"
    )
    assert rig.host.running["f"] is runner  # a refused entry leaves the running version
    assert not runner.stopped
    assert rig.report()["flows"]["f"]["currentVersion"] == "v1"

    await rig.rec.set_trust(Trust({}))  # relaxed again: what runs matches the entry
    await rig.until_status("f", S.ALREADY_INSTALLED)
    assert [c[0] for c in rig.host.calls] == ["prepare", "activate"]
    assert len(rig.fetcher.calls) == 1


async def test_set_trust_refuses_an_artifact_whose_download_is_in_flight(rig: Rig) -> None:
    rig.fetcher.serve("v1")
    gate = rig.fetcher.gates[url("v1")] = asyncio.Event()
    assert await rig.offer(doc(1, f=entry("v1")))
    await rig.until(lambda: url("v1") in rig.fetcher.urls(), "v1 to be downloading")

    await rig.rec.set_trust(Trust({}, require=True))
    gate.set()
    await rig.until(
        lambda: (rig.rec.records["f"].error or "").startswith("artifact is not signed"),
        "the entry to be refused",
    )
    assert ("activate", "f", "v1") not in rig.host.calls
    assert "f" not in rig.host.running


# ---------------------------------------------------------------- persist and close


async def test_persist_and_close_write_the_state_the_next_reconciler_reads(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    first = make_rig(state_dir)
    first.fetcher.serve("v1")
    first.start()
    await install(first, 3, "v1")
    first.rec.records.set_broken("f", True)  # a change only persist() writes out
    await first.rec.persist()
    assert first.on_disk().flows["f"].broken is True
    await first.stop()

    second = make_rig(state_dir, recover=True)
    assert second.rec.state.generation == 3
    assert second.rec.records["f"].installed is not None
    second.start()
    try:
        assert await second.offer(doc(3, f=entry("v1"))) is False  # already applied
        assert second.rec.state.rejected is None
    finally:
        await second.stop()
