"""One running flow: its instance, its triggers, its event queue, its supervision.

- Events (startup, interval ticks, commands, MQTT messages) go through a bounded
  queue and are delivered in order, each under the per-call deadline, fuel budget
  and an outer timeout (for blocking host calls); the events already queued run
  back to back in one worker job (:mod:`agent.device.runtime._batch`).
- Interval ticks are scheduled on the loop's clock without drift; a tick that is
  still queued when the next is due is not queued twice (a slow flow skips ticks
  rather than piling them up).
- A trap restarts the flow in a fresh Store after a backoff (1 s, doubling, capped
  at 60 s). ``max_failures`` traps within ``failure_window`` mark it ``broken``: it
  stops and stays stopped until a new deployment or a restart command.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog
from paho.mqtt.client import topic_matches_sub

from agent.device.runtime._batch import MAX_BATCH, Batch, deliver
from agent.device.runtime.hostapi import (
    EVENT_COMMAND,
    EVENT_INTERVAL,
    EVENT_MQTT,
    EVENT_STARTUP,
    FlowContext,
)
from agent.device.runtime.kvstore import KVStore
from agent.device.runtime.sandbox import FlowInstance, HostBindings, Limits, Runtime
from agent.errors import AgentError, SandboxError
from agent.wire.manifest import (
    CommandTrigger,
    IntervalTrigger,
    MqttTrigger,
    Permissions,
    StartupTrigger,
)

log = structlog.get_logger("agent.device.runtime.runner")

QUEUE_SIZE = 256


class Health(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    BROKEN = "broken"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Outcome:
    """How one event went: the handler's result code, or why it failed."""

    rc: int | None = None
    error: str | None = None
    #: What a command's handler passed to ``edge.respond`` (UTF-8).
    result: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rc == 0


@dataclass(frozen=True)
class Event:
    kind: int
    name: bytes
    payload: bytes
    #: Interval trigger name, for tick coalescing.
    tick: str | None = None
    #: Resolved with the event's :class:`Outcome` (commands need an answer).
    reply: asyncio.Future[Outcome] | None = field(default=None, compare=False)


@dataclass
class RunnerState:
    """What the state report shows of a running flow."""

    health: Health = Health.STARTING
    restarts: int = 0
    last_error: str | None = None
    events: int = 0
    events_dropped: int = 0
    failures: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    #: Failures by trap code (deadline, out_of_fuel, unreachable, ...), since start.
    traps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Supervision:
    max_failures: int = 3
    failure_window: float = 3600.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


@dataclass(frozen=True)
class RunSpec:
    """Everything needed to run one version of one flow."""

    flow_id: str
    version: str
    sha256: str
    kind: str
    config: dict[str, Any]
    triggers: tuple[Any, ...]
    permissions: Permissions
    #: The module's name when this runs one module of a bundle.
    module: str | None = None


class FlowRunner:
    def __init__(
        self,
        runtime: Runtime,
        module: Any,
        spec: RunSpec,
        *,
        device_id: str,
        limits: Limits,
        make_bindings: Callable[[FlowRunner], HostBindings],
        context: FlowContext | None,
        kv: KVStore | None,
        data_dir: Any,
        supervision: Supervision,
        on_health: Callable[[FlowRunner], None],
    ) -> None:
        self.runtime = runtime
        self.module = module
        self.spec = spec
        self.device_id = device_id
        self.limits = limits
        self.context = context
        self.kv = kv
        self.data_dir = data_dir
        self.supervision = supervision
        self.on_health = on_health
        self.state = RunnerState()
        self._make_bindings = make_bindings
        self.instance: FlowInstance | None = None
        self._queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
        self._queued_ticks: set[str] = set()
        #: Events of a batch that were not delivered, delivered next.
        self._backlog: deque[Event] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self.log = log.bind(flow_id=spec.flow_id, device_id=device_id, flow_version=spec.version)
        if spec.module:
            self.log = self.log.bind(module=spec.module)

    @property
    def flow_id(self) -> str:
        return self.spec.flow_id

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def call_timeout(self) -> float:
        # Epochs and fuel stop wasm code; this outer bound catches a guest stuck in
        # a blocking host call (e.g. a WASI sleep), which neither can interrupt.
        return self.limits.call_deadline_ms / 1000 * 2 + 1.0

    def health_info(self) -> dict[str, Any]:
        """What the state report shows under ``runtime``."""
        st = self.state
        return {"health": st.health.value, "restarts": st.restarts, "lastError": st.last_error}

    @property
    def broken(self) -> bool:
        return self.state.health == Health.BROKEN

    def triggers(self, cls: type) -> list[Any]:
        return [t for t in self.spec.triggers if isinstance(t, cls)]

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Instantiate, run start-up and the startup trigger. Raises on failure."""
        inst = FlowInstance(
            self.runtime,
            self.module,
            flow_id=self.spec.flow_id,
            version=self.spec.version,
            device_id=self.device_id,
            limits=self.limits,
            config=self.spec.config,
            bindings=self._make_bindings(self),
            data_dir=self.data_dir,
        )
        fut = asyncio.ensure_future(
            self.runtime.run(inst.start, timeout=self.call_timeout, what="start-up")
        )
        try:
            await asyncio.shield(fut)
            await self._after_start(inst)
        except asyncio.CancelledError:
            # Superseded while starting: the thread finishes on its own; drop the instance
            # (and take its outcome, a trap or timeout included: nobody else will).
            fut.add_done_callback(functools.partial(_abandoned_start, inst, self.log))
            raise
        except SandboxError:
            inst.close()
            raise
        self.instance = inst

    async def _after_start(self, inst: FlowInstance) -> None:
        """Kind-specific start-up after instantiation (here: the startup triggers)."""
        for trig in self.triggers(StartupTrigger):
            await self._deliver(inst, Event(EVENT_STARTUP, trig.name.encode(), b""))

    def _extra_tasks(self) -> list[tuple[str, Any]]:
        """Kind-specific background coroutines started by :meth:`activate`."""
        return []

    async def shutdown(self, timeout: float) -> None:
        """A graceful stop (kinds that must flush something first override this)."""
        self.stop()

    def accepts(self, topic: str) -> bool:
        """Whether an MQTT message on ``topic`` is for this flow."""
        return any(topic_matches_sub(t.topic, topic) for t in self.mqtt_filters())

    def connection(self, connected: bool) -> None:
        """The agent's broker connection changed (kinds that care override this)."""
        return

    def activate(self) -> None:
        """Start delivering trigger events (after the blue/green swap)."""
        self._set_health(Health.RUNNING)
        loop = asyncio.get_running_loop()
        name = self.spec.flow_id
        self._tasks.append(loop.create_task(self._worker(), name=f"flow-{name}-events"))
        for trig in self.triggers(IntervalTrigger):
            self._tasks.append(
                loop.create_task(self._ticker(trig), name=f"flow-{name}-tick-{trig.name}")
            )
        if self.kv is not None:
            self._tasks.append(loop.create_task(self._flusher(), name=f"flow-{name}-kv"))
        for label, coro in self._extra_tasks():
            self._tasks.append(loop.create_task(coro, name=f"flow-{name}-{label}"))

    def stop(self, health: Health = Health.STOPPED) -> None:
        """Stop triggers and the instance; never blocks the event loop."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self.instance is not None:
            self.instance.close()
            self.instance = None
        if self.kv is not None:
            try:
                self.kv.flush()
            except OSError as exc:
                self.log.error("cannot persist flow storage", error=str(exc))
        self._set_health(health)

    # ------------------------------------------------------------ events
    def offer(self, event: Event) -> bool:
        """Queue an event; False (and counted) when the queue is full or the flow is down."""
        if self.state.health not in (Health.RUNNING, Health.RESTARTING):
            return False
        if event.tick is not None:
            if event.tick in self._queued_ticks:
                return True  # the previous tick has not run yet: coalesce
            self._queued_ticks.add(event.tick)
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            if event.tick is not None:
                self._queued_ticks.discard(event.tick)
            self.state.events_dropped += 1
            return False
        return True

    def command(
        self, name: str, payload: bytes, reply: asyncio.Future[Outcome] | None = None
    ) -> bool:
        if not any(t.command == name for t in self.triggers(CommandTrigger)):
            return False
        event = Event(EVENT_COMMAND, name.encode(), payload, reply=reply)
        if not self.offer(event) and reply is not None and not reply.done():
            reply.set_result(
                Outcome(
                    error=f"flow {self.flow_id} is not accepting events ({self.state.health.value})"
                )
            )
        return True

    def mqtt_filters(self) -> list[MqttTrigger]:
        return self.triggers(MqttTrigger)

    def message(self, topic: str, payload: bytes) -> bool:
        return self.offer(Event(EVENT_MQTT, topic.encode(), payload))

    async def _ticker(self, trig: IntervalTrigger) -> None:
        loop = asyncio.get_running_loop()
        period = trig.ms / 1000
        start = loop.time()
        n = 0
        while True:
            n += 1
            await asyncio.sleep(max(0.0, start + n * period - loop.time()))
            behind = int((loop.time() - start) / period)
            n = max(n, behind)  # after a long stall, don't fire a burst of missed ticks
            self.offer(Event(EVENT_INTERVAL, trig.name.encode(), b"", tick=trig.name))

    async def _flusher(self) -> None:
        assert self.kv is not None
        while True:
            await asyncio.sleep(1.0)
            if not self.kv.dirty:  # no thread hop for an idle flow (500 flows: 500/s)
                continue
            try:
                await asyncio.to_thread(self.kv.flush)
            except OSError as exc:
                self.log.error("cannot persist flow storage", error=str(exc))

    #: What the outer timeout's message calls the event handler.
    HANDLER = "edge_on_event"

    def _invoke(self, inst: FlowInstance, event: Event) -> tuple[int, bytes | None]:
        """Deliver one event (blocking, on a wasm worker thread): (rc, response)."""
        ctx = self.context
        if ctx is None:
            return inst.dispatch(event.kind, event.name, event.payload), None
        ctx.in_command, ctx.response = event.kind == EVENT_COMMAND, None
        try:
            return inst.dispatch(event.kind, event.name, event.payload), ctx.response
        finally:
            ctx.in_command = False

    def _delivered(self, event: Event, rc: int) -> None:
        self.state.events += 1
        if rc != 0:
            self.log.warning(
                "flow event handler returned an error",
                rc=rc,
                trigger=event.name[:100].decode(errors="replace"),
            )

    async def _deliver_all(self, inst: FlowInstance, events: list[Event]) -> Batch[Any]:
        return await deliver(
            self.runtime,
            functools.partial(self._invoke, inst),
            events,
            self.call_timeout,
            self.HANDLER,
        )

    async def _deliver(self, inst: FlowInstance, event: Event) -> tuple[int, bytes | None]:
        """One event on its own (the startup trigger); raises what it failed with."""
        batch = await self._deliver_all(inst, [event])
        if batch.error is not None:
            raise batch.error
        rc, result = batch.results[0]
        self._delivered(event, rc)
        return rc, result

    async def _next_batch(self) -> list[Event]:
        """The events to deliver next: what was put back first, then the queue's."""
        batch = [self._backlog.popleft() if self._backlog else await self._queue.get()]
        while len(batch) < MAX_BATCH and (self._backlog or not self._queue.empty()):
            batch.append(self._backlog.popleft() if self._backlog else self._queue.get_nowait())
        for event in batch:
            if event.tick is not None:
                self._queued_ticks.discard(event.tick)
        return batch

    def _put_back(self, events: list[Event]) -> None:
        """Undelivered events of a batch go back to the front of the queue, in order."""
        self._backlog.extendleft(reversed(events))
        self._queued_ticks.update(e.tick for e in events if e.tick is not None)

    async def _worker(self) -> None:
        while True:
            batch = await self._next_batch()
            inst = self.instance
            if inst is None:
                for event in batch:
                    _answer(event, Outcome(error=f"flow {self.flow_id} is not running"))
                continue
            try:
                out = await self._deliver_all(inst, batch)
            except Exception:  # a bug here must not end this flow's worker silently
                self.log.exception("internal error delivering events")
                out = Batch([], RuntimeError("delivery failed"))
            for event, (rc, result) in zip(batch, out.results, strict=False):
                self._delivered(event, rc)
                _answer(event, Outcome(rc=rc, result=result))
            self._put_back(batch[out.settled :])
            exc = out.error
            if exc is None:
                continue
            event = batch[len(out.results)]
            if isinstance(exc, AgentError):
                _answer(event, Outcome(error=str(exc)))
                await self._failed(str(exc), getattr(exc, "code", "error"))
            else:
                self.log.error("internal error delivering an event", exc_info=exc)
                _answer(event, Outcome(error=f"internal error: {exc!r}"))

    # ------------------------------------------------------------ supervision
    async def _failed(self, reason: str, code: str = "error") -> None:
        sup = self.supervision
        now = time.monotonic()
        self.state.failures.append(now)
        self.state.traps[code] = self.state.traps.get(code, 0) + 1
        recent = [t for t in self.state.failures if now - t <= sup.failure_window]
        self.state.last_error = reason
        if self.instance is not None:
            self.instance.close()
            self.instance = None
        if len(recent) >= sup.max_failures:
            self.log.error(
                "flow broken: too many failures; not restarting",
                error=reason,
                failures=len(recent),
                window_s=sup.failure_window,
            )
            self.stop(Health.BROKEN)
            raise asyncio.CancelledError  # ends this worker task
        delay = min(sup.backoff_max, sup.backoff_initial * 2 ** (len(recent) - 1))
        self.log.warning(
            "flow failed; restarting", error=reason, restart_in_s=delay, failures=len(recent)
        )
        self._set_health(Health.RESTARTING)
        await asyncio.sleep(delay)
        try:
            await self.start()
        except AgentError as exc:
            await self._failed(f"restart failed: {exc}", getattr(exc, "code", "error"))
            return
        self.state.restarts += 1
        self._set_health(Health.RUNNING)

    def _set_health(self, health: Health) -> None:
        if self.state.health != health:
            self.state.health = health
            with contextlib.suppress(Exception):
                self.on_health(self)


def _answer(event: Event, outcome: Outcome) -> None:
    if event.reply is not None and not event.reply.done():
        event.reply.set_result(outcome)


_HEALTH_ORDER = [Health.BROKEN, Health.RESTARTING, Health.STARTING, Health.RUNNING, Health.STOPPED]


class BundleRunner(FlowRunner):
    """The modules of one workflow bundle, run as one flow."""

    def __init__(
        self, spec: RunSpec, parts: list[FlowRunner], on_health: Callable[[FlowRunner], None]
    ) -> None:
        first = parts[0]
        super().__init__(
            first.runtime,
            None,
            spec,
            device_id=first.device_id,
            limits=first.limits,
            make_bindings=lambda _r: first._make_bindings(first),
            context=None,
            kv=None,
            data_dir=None,
            supervision=first.supervision,
            on_health=on_health,
        )
        self.parts = parts
        for part in parts:
            part.on_health = self._part_health

    def _part_health(self, _part: FlowRunner) -> None:
        with contextlib.suppress(Exception):
            self.on_health(self)

    def health_info(self) -> dict[str, Any]:
        infos = [p.health_info() for p in self.parts]
        health = min((i["health"] for i in infos), key=lambda h: _HEALTH_ORDER.index(Health(h)))
        errors = [
            f"{p.spec.module}: {i['lastError']}"
            for p, i in zip(self.parts, infos, strict=True)
            if i["lastError"]
        ]
        return {
            "health": health,
            "restarts": sum(i["restarts"] for i in infos),
            "lastError": "; ".join(errors) or None,
        }

    @property
    def broken(self) -> bool:
        return any(p.broken for p in self.parts)

    async def start(self) -> None:
        started: list[FlowRunner] = []
        try:
            for part in self.parts:
                await part.start()
                started.append(part)
        except BaseException:
            for part in started:
                part.stop()
            raise

    def activate(self) -> None:
        for part in self.parts:
            part.activate()
        self._set_health(Health.RUNNING)

    def stop(self, health: Health = Health.STOPPED) -> None:
        for part in self.parts:
            part.stop(health)
        self._set_health(health)

    async def shutdown(self, timeout: float) -> None:
        for part in self.parts:
            await part.shutdown(timeout)
        self._set_health(Health.STOPPED)

    def command(
        self, name: str, payload: bytes, reply: asyncio.Future[Outcome] | None = None
    ) -> bool:
        """Every module with the trigger gets it; the reply is the first failure, or
        the last module's outcome."""
        loop = asyncio.get_running_loop()
        replies: list[asyncio.Future[Outcome]] = []
        for part in self.parts:
            fut: asyncio.Future[Outcome] = loop.create_future()
            if part.command(name, payload, fut):
                replies.append(fut)
        if reply is not None and replies:
            gathered = asyncio.gather(*replies)

            def done(g: asyncio.Future[list[Outcome]]) -> None:
                if reply.done():
                    return
                outcomes = g.result() if not g.cancelled() else [Outcome(error="cancelled")]
                reply.set_result(next((o for o in outcomes if not o.ok), outcomes[-1]))

            gathered.add_done_callback(done)
        return bool(replies)

    def mqtt_filters(self) -> list[MqttTrigger]:
        return [t for p in self.parts for t in p.mqtt_filters()]

    def accepts(self, topic: str) -> bool:
        return any(p.accepts(topic) for p in self.parts)

    def message(self, topic: str, payload: bytes) -> bool:
        delivered = False
        for part in self.parts:
            if part.accepts(topic):
                delivered = part.message(topic, payload) or delivered
        return delivered

    def connection(self, connected: bool) -> None:
        for part in self.parts:
            part.connection(connected)


def _abandoned_start(inst: FlowInstance, log: Any, fut: asyncio.Future[Any]) -> None:
    """A start-up whose waiter was cancelled: close the instance, note how it ended."""
    inst.close()
    if not fut.cancelled() and fut.exception() is not None:
        log.info("abandoned start-up ended", outcome=str(fut.exception())[:200])
