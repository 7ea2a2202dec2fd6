"""The operator's side of an end-to-end scenario: topics, desired entries, waiting
on state, commands, and the agent as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wat
from artifact_server import ArtifactServer
from broker import Operator

DESIRED = "edge/dev1/desired"
STATE = "edge/dev1/state"
EVENTS = "edge/dev1/events"
STATUS = "edge/dev1/status"


def flow(server: ArtifactServer, version: str, data: bytes, **extra: Any) -> dict[str, Any]:
    path = f"/{version}-{wat.sha256(data)[:8]}.wasm"
    server.add(path, data)
    return {
        "version": version,
        "artifact": {"url": server.url(path), "sha256": wat.sha256(data), "size": len(data)},
        **extra,
    }


def flow_state(flow_id: str, **want: Any) -> Callable[[dict[str, Any]], bool]:
    def check(doc: dict[str, Any]) -> bool:
        f = doc.get("flows", {}).get(flow_id)
        return f is not None and all(f.get(k) == v for k, v in want.items())

    return check


def statuses(op: Operator, flow_id: str) -> list[str]:
    return [e["status"] for e in map(json.loads, op.messages(EVENTS)) if e["flowId"] == flow_id]


COMMAND = "edge/dev1/command"
RESPONSE = "edge/dev1/command/response"


async def ask(
    op: Operator, doc: dict[str, Any] | bytes, rid: str | None = None, timeout: float = 10
) -> dict[str, Any]:
    """Send a command and return its response (matched by id)."""
    if isinstance(doc, dict) and rid is not None:
        doc = {**doc, "id": rid}
    op.publish(COMMAND, doc, retain=False)
    found = await op.wait_messages(
        RESPONSE, lambda docs: any(d.get("id") == rid for d in docs), timeout
    )
    return next(d for d in found if d.get("id") == rid)


def write_config(tmp_path: Path, broker_url: str, extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "dev1"\ndevice_type = "rpi4"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nbroker = "{broker_url}"\nreconnect_min = 0.05\nreconnect_max = 0.5\n'
        "[artifacts]\nstall_timeout = 5.0\nread_timeout = 5.0\nmin_free_space = 0\n"
        "[reconcile]\nretry_backoff_initial = 0.2\nstate_coalesce_ms = 10\n"
        f'[log]\nformat = "json"\n{extra}'
    )
    return path


class AgentProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
