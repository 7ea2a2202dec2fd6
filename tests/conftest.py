"""Shared fixtures: a private Mosquitto, an artifact HTTP server, agent configs."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

from artifact_server import ArtifactServer
from broker import MOSQUITTO, Broker, Operator
from common import MakeConfig
from postgres import PostgresCluster, postgres_fixture

from agent.device._logging import configure_logging
from agent.device.config import AgentConfig

if TYPE_CHECKING:
    from agent.server.db.engine import Database

configure_logging("debug" if os.environ.get("EDGE_AGENT_TEST_DEBUG") else "info")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not os.path.exists(MOSQUITTO):
        pytest.fail("mosquitto is not installed: run `make test` (it installs it)")
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def operator(broker: Broker) -> Iterator[Operator]:
    op = Operator(broker).connect()
    try:
        yield op
    finally:
        op.close()


@pytest.fixture
def artifact_server() -> Iterator[ArtifactServer]:
    with ArtifactServer() as server:
        yield server


@pytest.fixture
def make_config(tmp_path: Path, broker: Broker) -> MakeConfig:
    """An agent config for a test: fast timings, private state dir, the test broker."""

    def make(device_id: str = "dev1", **over: Any) -> AgentConfig:
        data: dict[str, Any] = {
            "device_id": device_id,
            "device_type": "rpi4",
            "state_dir": str(tmp_path / f"state-{device_id}"),
            "mqtt": {
                "broker": broker.url,
                "reconnect_min": 0.05,
                "reconnect_max": 0.5,
                "keepalive": 5,
            },
            "artifacts": {
                "retries": 2,
                "backoff_initial": 0.05,
                "backoff_max": 0.2,
                "stall_timeout": 2.0,
                "read_timeout": 2.0,
                "min_free_space": 0,
            },
            "sandbox": {"call_deadline_ms": 1000},
            "reconcile": {
                "retry_backoff_initial": 0.2,
                "retry_backoff_max": 1.0,
                "state_coalesce_ms": 20,
            },
        }
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return AgentConfig.model_validate(data)

    return make


@pytest.fixture
async def running_agent(make_config: MakeConfig) -> AsyncIterator[Callable[..., Any]]:
    """Start agents in-process; all are stopped at the end of the test."""
    from agent.device.daemon import Agent

    agents: list[Agent] = []

    async def start(cfg: AgentConfig | None = None) -> Agent:
        agent = Agent(cfg or make_config())
        await agent.__aenter__()
        agents.append(agent)
        return agent

    yield start
    for agent in reversed(agents):
        await agent.__aexit__(None, None, None)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """One private PostgreSQL for the session; each test takes a database of its own."""
    yield from postgres_fixture(tmp_path_factory)


_DB_COUNTER = iter(range(1, 10**6))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind the server supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database(f"test_{next(_DB_COUNTER)}")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """The server's database of each kind, migrated, closed afterwards."""
    from agent.server.db.engine import Database

    database = Database(db_url)
    database.migrate()
    try:
        yield database
    finally:
        database.close()
