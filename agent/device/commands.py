"""Device commands: ``{prefix}/{deviceId}/command`` in, exactly one response out.

Request: ``{"name": "...", "payload": <any JSON>, "time": <ISO-8601 | epoch ms>,
"id": "<request id>"}`` (only ``name`` is required, 1-255 characters).

Response (QoS 1, not retained): to the MQTT 5 response topic with the request's
correlation data when the request has one, else to ``{prefix}/{deviceId}/command/response``:
``{"id", "name", "ok": true, "result": ...}`` or ``{"id", "name", "ok": false, "error": "..."}``,
plus ``"time"``.

Names under ``agent.`` are built in (see :data:`BUILTINS`); any other name goes to
every flow with a matching command trigger (the response carries each flow's
outcome) and, raw, to EEA bundles. A command whose ``time`` is older than
``commands.max_age_s`` is refused as stale rather than executed late.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Annotated, Any, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from agent import __version__
from agent.device._logging import capture
from agent.device.deploy.state import FlowRecord
from agent.device.mqtt import Message
from agent.errors import AgentError, ProtocolError
from agent.wire._boundedjson import load as load_json
from agent.wire.protocol import utc_now_iso
from agent.wire.redact import redact_text
from agent.wire.timevalue import issued_at

log = structlog.get_logger("agent.device.commands")

MAX_LOG_LINES = 500
#: The largest command accepted (the whole JSON request, payload included).
MAX_COMMAND_BYTES = 256 * 1024


class CommandError(AgentError):
    """A command that fails with a message for the ``error`` field."""


TimeValue = (
    Annotated[str, StringConstraints(max_length=64)] | Annotated[float, Field(allow_inf_nan=False)]
)


class Command(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    payload: Any = None
    #: ISO-8601 text, epoch milliseconds, or Losant's ``{"$date": ...}`` of either.
    time: TimeValue | dict[str, TimeValue] | None = None
    id: Annotated[str, StringConstraints(max_length=256)] | int | None = None


class FlowRef(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    flow_id: str = Field(alias="flowId")


class LogsArgs(FlowRef):
    lines: Annotated[int, Field(ge=1, le=MAX_LOG_LINES)] = 50


#: The most of an artifact one ``agent.artifact`` response carries (before base64).
MAX_ARTIFACT_CHUNK = 96 * 1024


class ArtifactArgs(FlowRef):
    which: Literal["installed", "previous"] = "installed"
    offset: Annotated[int, Field(ge=0, le=2**40)] = 0
    length: Annotated[int, Field(ge=1, le=MAX_ARTIFACT_CHUNK)] = MAX_ARTIFACT_CHUNK


class DirectTriggerArgs(FlowRef):
    id: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    payload: Any = None


class MalformedCommand(CommandError):
    """A request that is not a command; ``echo`` holds its id and name if it had them."""

    def __init__(self, message: str, echo: dict[str, Any] | None = None) -> None:
        super().__init__(f"malformed command: {message}")
        self.echo = echo or {}


def parse_command(payload: bytes) -> Command:
    """The command in ``payload``, or :class:`MalformedCommand` (never another error)."""
    try:
        raw = load_json(payload, what="command", max_bytes=MAX_COMMAND_BYTES)
    except ProtocolError as exc:
        raise MalformedCommand(str(exc)) from None
    echo = (
        {k: raw[k] for k in ("id", "name") if isinstance(raw.get(k), str | int)}
        if isinstance(raw, dict)
        else {}
    )
    if isinstance(echo.get("name"), str):
        echo["name"] = echo["name"][:255]
    if isinstance(echo.get("id"), str):
        echo["id"] = echo["id"][:256]
    try:
        return Command.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "command"
        raise MalformedCommand(f"{where}: {err['msg']}", echo) from None


def _args(model: type[BaseModel], payload: Any) -> Any:
    try:
        return model.model_validate(payload if payload is not None else {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        raise CommandError(f"bad payload: {where}: {err['msg']}") from None


class CommandFlows(Protocol):
    """The running flows, as commands reach them (a FlowHost)."""

    @property
    def running(self) -> Mapping[str, Any]: ...

    def info(self, flow_id: str) -> dict[str, Any] | None: ...
    def command(self, name: str, payload: bytes, replies: dict[str, Any]) -> list[str]: ...
    def route(self, topic: str, payload: bytes) -> list[str]: ...
    def is_eea(self, flow_id: str) -> bool: ...
    def direct_trigger(self, flow_id: str, trigger_id: str, payload: bytes) -> bool: ...


class CommandDevice(Protocol):
    """What commands need of the agent, and nothing more (the daemon provides it)."""

    device_id: str
    response_topic: str

    @property
    def flows(self) -> CommandFlows: ...
    @property
    def records(self) -> Mapping[str, FlowRecord]: ...

    def send(self, topic: str, payload: bytes, *, correlation: bytes | None) -> None:
        """Publish a response (QoS 1, through the outbox)."""

    def publish_state_now(self) -> None: ...
    def reconcile(self) -> None: ...
    async def restart_flow(self, flow_id: str) -> Any: ...
    async def artifact_range(self, sha256: str, offset: int, length: int) -> tuple[int, bytes]:
        """(size, bytes from ``offset``) of a stored artifact; ArtifactError if gone."""


class CommandRouter:
    """Handles the device's command topic for one agent."""

    def __init__(self, device: CommandDevice, *, max_age_s: float, flow_timeout_s: float) -> None:
        self.device = device
        self.max_age_s = max_age_s
        self.flow_timeout_s = flow_timeout_s
        #: Past this, a command is answered ``ok: false`` even if its work goes on (a
        #: restart waiting for a spinning flow's deadline): one response, always.
        self.answer_within_s = flow_timeout_s + 5
        self._unfinished: set[asyncio.Task[Any]] = set()
        self.started = time.monotonic()
        self.handled = 0
        self.builtins: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "agent.ping": self._ping,
            "agent.report": self._report,
            "agent.flows": self._flows,
            "agent.restart-flow": self._restart_flow,
            "agent.logs": self._logs,
            "agent.reconcile": self._reconcile,
            "agent.direct-trigger": self._direct_trigger,
            "agent.artifact": self._artifact,
        }

    def set_flow_timeout(self, flow_timeout_s: float) -> None:
        """How long flows may take to answer (and the answer bound that follows)."""
        self.flow_timeout_s = flow_timeout_s
        self.answer_within_s = flow_timeout_s + 5

    async def handle(self, msg: Message) -> None:
        """Run one command and publish its one response; never raises."""
        cmd: Command | None = None
        echo: dict[str, Any] = {}  # id/name of a request that is JSON but not valid
        try:
            try:
                cmd = parse_command(msg.payload)
            except MalformedCommand as exc:
                echo = exc.echo
                raise
            if cmd.time is not None:
                try:
                    age = time.time() - issued_at(cmd.time)
                except (ValueError, OverflowError, OSError):
                    raise CommandError(
                        f'bad time {cmd.time!r}: expected ISO-8601, epoch ms or {{"$date": ...}}'
                    ) from None
                if age > self.max_age_s:
                    raise CommandError(
                        f"stale: issued {age:.0f} s ago (commands older than "
                        f"{self.max_age_s:.0f} s are not executed)"
                    )
            result = await self._bounded(self._run(cmd, msg), cmd.name)
        except AgentError as exc:
            self._respond(msg, cmd, ok=False, body=str(exc), echo=echo)
        except Exception as exc:  # a bug must still answer, and not stop the agent
            log.exception("internal error handling a command")
            self._respond(msg, cmd, ok=False, body=f"internal error: {exc!r}", echo=echo)
        else:
            self._respond(msg, cmd, ok=True, body=result)

    async def _bounded(self, work: Coroutine[Any, Any, Any], name: str) -> Any:
        """``work``'s result, or :class:`CommandError` after :attr:`answer_within_s`
        (the work is not cancelled: it finishes in the background and is logged)."""
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.answer_within_s)
        except TimeoutError:
            self._unfinished.add(task)
            task.add_done_callback(functools.partial(self._finished_late, name))
            raise CommandError(
                f"no result within {self.answer_within_s:g} s; the command goes on "
                "(see agent.flows and agent.logs)"
            ) from None

    def _finished_late(self, name: str, task: asyncio.Task[Any]) -> None:
        self._unfinished.discard(task)
        outcome = "cancelled" if task.cancelled() else str(task.exception() or "done")
        log.info("command finished after its answer", command=name, outcome=outcome[:200])

    async def _run(self, cmd: Command, msg: Message) -> Any:
        handler = self.builtins.get(cmd.name)
        if handler is not None:
            return await handler(cmd.payload)
        if cmd.name.startswith("agent."):
            raise CommandError(
                f"unknown command {cmd.name!r} (built-ins: {', '.join(sorted(self.builtins))})"
            )
        return await self._to_flows(cmd, msg)

    async def _to_flows(self, cmd: Command, msg: Message) -> Any:
        host = self.device.flows
        replies: dict[str, asyncio.Future[Any]] = {}
        host.command(cmd.name, json.dumps(cmd.payload).encode(), replies)
        eea = host.route(msg.topic, msg.payload)  # EEA bundles get the raw message
        if not replies and not eea:
            raise CommandError(f"unknown command {cmd.name!r}: no flow has a trigger for it")
        done, pending = (
            await asyncio.wait(replies.values(), timeout=self.flow_timeout_s)
            if replies
            else (set(), set())
        )
        flows: dict[str, Any] = {}
        failures = []
        for flow_id, fut in replies.items():
            if fut in pending:
                fut.cancel()
                flows[flow_id] = {"ok": False, "error": "no answer in time"}
                failures.append(flow_id)
                continue
            outcome = fut.result()
            if outcome.ok:
                flows[flow_id] = {"ok": True, "rc": outcome.rc}
                if outcome.result is not None:
                    flows[flow_id]["result"] = _result_value(outcome.result)
            else:
                error = outcome.error or f"edge_on_event returned {outcome.rc}"
                flows[flow_id] = {"ok": False, "error": error}
                failures.append(flow_id)
        del done
        if failures:
            detail = "; ".join(f"{f}: {flows[f]['error']}" for f in failures)
            raise CommandError(f"command failed in flow(s) {detail}")
        return {"flows": flows, "eea": eea}

    # ------------------------------------------------------------ responses
    def _respond(
        self,
        msg: Message,
        cmd: Command | None,
        *,
        ok: bool,
        body: Any,
        echo: dict[str, Any] | None = None,
    ) -> None:
        self.handled += 1
        echo = echo or {}
        doc: dict[str, Any] = {
            "id": cmd.id if cmd else echo.get("id"),
            "name": cmd.name if cmd else (str(echo["name"])[:255] if "name" in echo else None),
            "ok": ok,
        }
        doc["result" if ok else "error"] = body if ok else redact_text(str(body))
        doc["time"] = utc_now_iso()
        topic = msg.response_topic or self.device.response_topic
        # Correlation data comes back even without a response topic: it is the only
        # way to match the answer to a request that was not JSON (and has no id).
        correlation = msg.correlation_data
        log.info("command handled", command=doc["name"], ok=ok, error=None if ok else body)
        # Through the outbox: a response made while offline goes out after the reconnect.
        self.device.send(
            topic, json.dumps(doc, separators=(",", ":")).encode(), correlation=correlation
        )

    # ------------------------------------------------------------ built-ins
    async def _ping(self, _payload: Any) -> Any:
        return {
            "pong": True,
            "agentVersion": __version__,
            "uptimeS": round(time.monotonic() - self.started, 1),
        }

    async def _report(self, _payload: Any) -> Any:
        self.device.publish_state_now()
        return {"published": True}

    async def _flows(self, _payload: Any) -> Any:
        records = self.device.records
        out = []
        for flow_id, rec in sorted(records.items()):
            info = self.device.flows.info(flow_id) or {}
            out.append(
                {
                    "flowId": flow_id,
                    "desiredVersion": rec.desired_version,
                    "currentVersion": rec.installed.version if rec.installed else None,
                    "status": rec.status.value,
                    "health": info.get("health", "broken" if rec.broken else "stopped"),
                    "restarts": info.get("restarts", 0),
                    "lastError": info.get("lastError") or rec.error,
                    **{k: v for k, v in info.items() if k in ("bundle", "registeredFunctions")},
                }
            )
        return {"flows": out}

    async def _restart_flow(self, payload: Any) -> Any:
        args = _args(FlowRef, payload)
        runner = await self.device.restart_flow(args.flow_id)
        return {
            "flowId": args.flow_id,
            "version": runner.version,
            "health": runner.health_info()["health"],
        }

    async def _logs(self, payload: Any) -> Any:
        args = _args(LogsArgs, payload)
        if args.flow_id not in self.device.records:
            raise CommandError(f"flow {args.flow_id!r} not found")
        lines = capture.recent(self.device.device_id, args.flow_id, args.lines)
        return {"flowId": args.flow_id, "lines": [m.model_dump() for m in lines]}

    async def _reconcile(self, _payload: Any) -> Any:
        self.device.reconcile()
        return {"triggered": True}

    async def _artifact(self, payload: Any) -> Any:
        """The installed (or previous) artifact of a flow, exactly as it runs: all of a
        small one, a larger one a range at a time (``offset``; ``more`` says whether
        bytes follow). ``sha256`` is what the whole must hash to."""
        args = _args(ArtifactArgs, payload)
        rec = self.device.records.get(args.flow_id)
        if rec is None:
            raise CommandError(f"flow {args.flow_id!r} not found")
        inst = rec.installed if args.which == "installed" else rec.previous
        if inst is None:
            raise CommandError(f"flow {args.flow_id!r} has no {args.which} version")
        size, data = await self.device.artifact_range(inst.sha256, args.offset, args.length)
        if args.offset > size:
            raise CommandError(f"offset {args.offset} is past the artifact's {size} bytes")
        return {
            "flowId": args.flow_id,
            "which": args.which,
            "version": inst.version,
            "sha256": inst.sha256,
            "kind": inst.kind,
            "size": size,
            "offset": args.offset,
            "length": len(data),
            "data": base64.b64encode(data).decode(),
            "more": args.offset + len(data) < size,
        }

    async def _direct_trigger(self, payload: Any) -> Any:
        args = _args(DirectTriggerArgs, payload)
        host = self.device.flows
        if args.flow_id not in host.running:
            raise CommandError(f"flow {args.flow_id!r} not found or not running")
        body = json.dumps(args.payload).encode()
        if not host.is_eea(args.flow_id):
            raise CommandError(f"flow {args.flow_id!r} is not an EEA bundle")
        if not host.direct_trigger(args.flow_id, args.id, body):
            raise CommandError(
                f"flow {args.flow_id!r} is not accepting events (broken, or its queue is full)"
            )
        return {"flowId": args.flow_id, "id": args.id, "delivered": True}


def _result_value(data: bytes) -> Any:
    """A flow's response: JSON when it parses as JSON, else the text."""
    text = data.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text
