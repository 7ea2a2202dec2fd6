"""``edge-agent sim``: a fleet of real agents in one process, for local simulation.

Every simulated device is a complete :class:`~agent.device.daemon.Agent` (its own MQTT
connection, state directory, outbox, reconciler and flows); they share one
:class:`~agent.device.runtime.sandbox.Runtime` (one wasmtime Engine, its compiled-module cache and
worker threads), as flows on one device share it. Device ids are ``sim-0001``...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent.device import _signals
from agent.device.config import AgentConfig, load_config
from agent.device.daemon import Agent, sandbox_limits
from agent.device.runtime.sandbox import Runtime
from agent.errors import AgentError, ConfigError

log = structlog.get_logger("agent.fleet.sim")

#: Per-device changes to the configuration: ``(index, data) -> data``.
Customize = Callable[[int, dict[str, Any]], dict[str, Any]]


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def device_id(index: int) -> str:
    return f"sim-{index:04d}"


class Simulation:
    """``async with Simulation(base, n, root) as sim:`` runs ``n`` agents until the block
    ends. ``base`` is the configuration every device starts from; its ``device_id``
    and ``state_dir`` are replaced per device (``root/<device id>``)."""

    def __init__(
        self,
        base: AgentConfig,
        devices: int,
        state_root: Path,
        *,
        first: int = 1,
        customize: Customize | None = None,
        start_concurrency: int = 50,
    ) -> None:
        self.base = base
        self.count = devices
        self.root = state_root
        self.first = first
        self.customize = customize
        self.start_concurrency = start_concurrency
        self.agents: list[Agent] = []
        self.runtime = Runtime(
            sandbox_limits(base), workers=base.sandbox.workers, cache_dir=state_root / "modules"
        )
        self.rss_before = 0
        self.rss_started = 0

    def config(self, index: int) -> AgentConfig:
        data = self.base.model_dump(mode="python")
        data["device_id"] = device_id(index)
        data["state_dir"] = self.root / device_id(index)
        if self.customize is not None:
            data = self.customize(index, data)
        return AgentConfig.model_validate(data)

    async def __aenter__(self) -> Simulation:
        self.rss_before = rss_bytes()
        self.runtime.acquire()  # the runtime outlives the agents' own acquire/release
        self.agents = [
            Agent(self.config(i), runtime=self.runtime)
            for i in range(self.first, self.first + self.count)
        ]
        slots = asyncio.Semaphore(self.start_concurrency)

        async def start(agent: Agent) -> None:
            async with slots:
                await agent.__aenter__()

        try:
            async with asyncio.TaskGroup() as tg:
                for agent in self.agents:
                    tg.create_task(start(agent), name=f"start-{agent.cfg.device_id}")
        except BaseException:
            await self._stop_all()
            raise
        self.rss_started = rss_bytes()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_all()

    async def _stop_all(self) -> None:
        started = [a for a in self.agents if a._task is not None]
        await asyncio.gather(
            *(a.__aexit__(None, None, None) for a in started), return_exceptions=True
        )
        await self.runtime.release()

    async def wait_connected(self, timeout: float = 60.0) -> int:
        """Wait until every agent is connected (or ``timeout``); how many are."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = sum(a.session.connected.is_set() for a in self.agents)
            if up == len(self.agents):
                return up
            await asyncio.sleep(0.1)
        return sum(a.session.connected.is_set() for a in self.agents)

    def memory_per_device(self) -> float:
        """Resident memory the agents added, per device, in bytes."""
        return (rss_bytes() - self.rss_before) / max(1, len(self.agents))


#: Open files an agent keeps, with room: measured 7 idle and 11 running one flow (the
#: MQTT socket and its wake-up pair, the outbox database with its WAL and shared
#: memory, a flow's output pipes).
FDS_PER_AGENT = 12


def raise_open_file_limit(devices: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; a warning when even that is
    too low for ``devices`` agents (they would fail to open files mid-run)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    need = devices * FDS_PER_AGENT + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        return (
            f"the open-file limit is {soft}; {devices} agents need about {need} "
            f"(raise the hard limit: ulimit -Hn, or LimitNOFILE= in a unit)"
        )
    return None


def _base_config(args: argparse.Namespace) -> AgentConfig:
    over: dict[str, Any] = {"device_id": "sim"}
    mqtt: dict[str, Any] = {}
    if args.broker:
        mqtt["broker"] = args.broker
    if args.prefix:
        mqtt["topic_prefix"] = args.prefix
    if mqtt:
        over["mqtt"] = mqtt
    if args.device_type:
        over["device_type"] = args.device_type
    over["log"] = {"level": args.log_level}
    return load_config(args.config, overrides=over)


async def _main(args: argparse.Namespace, base: AgentConfig, root: Path) -> int:
    stop = asyncio.Event()
    _signals.install(
        asyncio.get_running_loop(),
        {signal.SIGINT: stop.set, signal.SIGTERM: stop.set},
        second_exits=frozenset({signal.SIGINT, signal.SIGTERM}),
    )
    started = time.monotonic()
    async with Simulation(base, args.devices, root, first=args.first) as sim:
        up = await sim.wait_connected(timeout=max(30.0, args.devices / 20))
        per = sim.memory_per_device()
        print(
            f"sim: {len(sim.agents)} agents ({device_id(args.first)}..."
            f"{device_id(args.first + args.devices - 1)}) started in "
            f"{time.monotonic() - started:.1f} s, {up} connected to {base.mqtt.broker}; "
            f"RSS {rss_bytes() / 2**20:.0f} MiB, {per / 1024:.0f} KiB per device",
            flush=True,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
        print(
            f"sim: stopping; {sim.memory_per_device() / 1024:.0f} KiB per device "
            f"(with the flows they run)",
            flush=True,
        )
    return 0


def run(args: argparse.Namespace) -> int:
    from agent.device._logging import configure_logging

    if args.devices < 1:
        sys.stderr.write("edge-agent sim: --devices must be at least 1\n")
        return 2
    try:
        base = _base_config(args)
    except ConfigError as exc:
        sys.stderr.write(f"edge-agent sim: config error: {exc}\n")
        return 2
    configure_logging(base.log.level, base.log.format)
    warning = raise_open_file_limit(args.devices)
    if warning is not None:
        sys.stderr.write(f"edge-agent sim: warning: {warning}\n")
    temp = args.state_root is None
    root = Path(tempfile.mkdtemp(prefix="edge-sim-")) if temp else args.state_root
    try:
        return asyncio.run(_main(args, base, root))
    except AgentError as exc:
        sys.stderr.write(f"edge-agent sim: {exc}\n")
        return 1
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
