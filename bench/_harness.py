"""What the benchmarks share: percentiles, and the agent as a real process."""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
from pathlib import Path


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p95": pct(values, 95),
        "min": min(values),
        "max": max(values),
    }


def start_agent(
    work: Path, mqtt_port: int, device_id: str, *, log: str = 'level = "warning"'
) -> subprocess.Popen[bytes]:
    """``edge-agent run`` for ``device_id`` against the broker on ``mqtt_port``; its
    state in ``work/state``, its log in ``work/agent.log``; ``log`` is its [log]."""
    config = work / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{work / "state"}"\n'
        f'[mqtt]\nbroker = "mqtt://127.0.0.1:{mqtt_port}"\n[log]\n{log}\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        stderr=(work / "agent.log").open("wb"),
    )


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    agent.send_signal(signal.SIGTERM)
    agent.wait(20)
