"""A real ``edge-agent server`` for tests: uvicorn on a free port in a thread, on
SQLite or a private PostgreSQL, connected to the test's Mosquitto; an application
and a token made with the admin command."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
from broker import free_port

from agent import cli
from agent.device.config import AgentConfig
from agent.fleet.sim import Simulation
from agent.server.api.app import create_app
from agent.server.config import ServerConfig
from agent.server.context import ServerContext
from agent.server.thread import ServerThread


def admin(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["server", "admin", *argv])
    assert rc == 0, f"admin {argv} exited {rc}"
    return out.getvalue().strip()


class RunningServer:
    def __init__(
        self,
        state_dir: Path,
        db_url: str,
        broker_url: str,
        *,
        prefix: str,
        settings: dict[str, Any] | None = None,
    ) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.cfg = ServerConfig.model_validate(
            {
                "db": db_url,
                "state_dir": str(state_dir),
                "listen": f"127.0.0.1:{port}",
                "mqtt": {"broker": broker_url},
                "publish_retry_s": 0.2,
                **(settings or {}),
            }
        )
        common = ["--db", db_url, "--state-dir", str(state_dir)]
        self.app_id = admin(*common, "create-application", "--name", "test", "--prefix", prefix)
        self.token = admin(
            *common, "create-token", "--application", self.app_id, "--scope", "all.Application"
        )
        self.prefix = prefix
        self.db_url = db_url
        self.ctx = ServerContext(self.cfg)
        self._http: ServerThread | None = None

    def token_with(self, *scopes: str) -> str:
        args = ["--db", self.db_url, "--state-dir", str(self.cfg.state_dir), "create-token"]
        args += ["--application", self.app_id]
        for scope in scopes:
            args += ["--scope", scope]
        return admin(*args)

    def start(self) -> None:
        self.ctx.start()
        self._http = ServerThread(create_app(self.ctx), "127.0.0.1", self.cfg.port)
        self._http.start(15)

    def stop(self) -> None:
        stopped = self._http.stop() if self._http is not None else True
        self.ctx.stop()
        assert stopped, "the server's HTTP thread did not stop"

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def upload(self, flow_id: str, version: str, data: bytes, **form: Any) -> httpx.Response:
        with self.http() as c:
            return c.post(
                f"/applications/{self.app_id}/flows/{flow_id}/versions",
                data={"version": version, **form},
                files={"artifact": ("flow.wasm", data, "application/octet-stream")},
            )


@contextlib.contextmanager
def running_server(
    state_dir: Path,
    db_url: str,
    broker_url: str,
    *,
    prefix: str = "edge",
    settings: dict[str, Any] | None = None,
) -> Iterator[RunningServer]:
    """A started server; ``settings``: ServerConfig keys over the test's defaults."""
    srv = RunningServer(state_dir, db_url, broker_url, prefix=prefix, settings=settings)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.asynccontextmanager
async def sim_fleet(
    root: Path, broker_url: str, prefix: str, devices: int, **agent: Any
) -> AsyncIterator[Simulation]:
    """``devices`` real agents (``sim-0001``…) on the test's broker under ``prefix``;
    ``agent``: more of the agents' settings (``mqtt`` merged into the broker's)."""
    mqtt = {"broker": broker_url, "topic_prefix": prefix, **agent.pop("mqtt", {})}
    base = AgentConfig.model_validate(
        {"device_id": "sim", "state_dir": str(root / "unused"), "mqtt": mqtt, **agent}
    )
    sim = Simulation(base, devices, root / "sim")
    await sim.__aenter__()
    try:
        yield sim
    finally:
        await sim.__aexit__(None, None, None)
