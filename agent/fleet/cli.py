"""``edge-agent fleet``: release, replace, remove, get, stats, logs, rollout, sign.

The broker and credentials come from flags, then the ``EDGE_AGENT_MQTT__*``
environment variables, then ``--config`` (its ``[mqtt]`` section), like the agent's
own settings. Exit status: 0 done, 1 error, 2 a rollout stopped at its failure
threshold, 3 a rollout timed out waiting for devices.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from agent.device.config import load_config
from agent.errors import ConfigError
from agent.fleet.controller import (
    STATUSES,
    Artifact,
    FleetClient,
    FleetError,
    PhaseProgress,
    Rollout,
    failure_limit,
    load_artifact,
    phase_sizes,
    place,
    table_rows,
)
from agent.fleet.parser import COLUMNS, EXIT_STOPPED, EXIT_TIMEOUT


# ---------------------------------------------------------------- helpers
def _client(args: argparse.Namespace) -> FleetClient:
    over: dict[str, Any] = {"device_id": "fleet-operator"}
    mqtt: dict[str, Any] = {}
    for key in ("broker", "username", "password_file", "ca_file", "cert_file", "key_file"):
        value = getattr(args, key, None)
        if value is not None:
            mqtt[key] = str(value)
    if args.prefix:
        mqtt["topic_prefix"] = args.prefix
    if mqtt:
        over["mqtt"] = mqtt
    try:
        cfg = load_config(args.config, overrides=over)
    except ConfigError as exc:
        raise FleetError(f"config error: {exc}") from None
    return FleetClient(cfg.mqtt)


def _artifact(client: FleetClient, args: argparse.Namespace) -> Artifact | None:
    if not args.artifact:
        return None
    artifact = load_artifact(client, args.artifact, args.mqtt_limit, args.kind)
    if args.sign is not None:
        from agent.wire.signing import KeyFileError, load_private_key, sign

        try:
            key = load_private_key(args.sign)
        except KeyFileError as exc:
            raise FleetError(str(exc)) from None
        sig = sign(key, artifact.sha256)
        artifact = Artifact(
            artifact.url,
            artifact.sha256,
            artifact.size,
            artifact.kind,
            sig.model_dump(by_alias=True),
        )
    return artifact


def deployment_id(flow: str, version: str) -> str:
    """A deployment id that is a valid topic level: ``<flow>-<version>-<unix time>``."""
    raw = f"{flow}-{version or 'removed'}-{int(time.time())}"
    return re.sub(r"[^A-Za-z0-9._:-]", "_", raw)[:128]


MANIFEST_KEYS = frozenset({"triggers", "permissions", "config"})


def _manifest(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise FleetError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not set(doc) <= MANIFEST_KEYS:
        raise FleetError(f"{path}: expected an object with {', '.join(sorted(MANIFEST_KEYS))}")
    return doc


def _entry(
    version: str, artifact: Artifact | None, manifest: Path | None = None, **extra: Any
) -> dict[str, Any]:
    """A desired entry, validated as the agent will validate it."""
    from pydantic import ValidationError

    from agent.wire.protocol import FlowSpec

    if not version:
        dep = extra.get("deploymentId")
        return {"version": "", **({"deploymentId": dep} if dep else {})}
    if artifact is None:
        raise FleetError("--artifact is required to release a version")
    entry = {
        "version": version,
        "artifact": artifact.entry(),
        **_manifest(manifest),
        **{k: v for k, v in extra.items() if v is not None},
    }
    try:
        FlowSpec.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise FleetError(f"the desired entry would be invalid: {where}: {err['msg']}") from None
    return entry


def _release_entry(args: argparse.Namespace, artifact: Artifact | None, dep: str) -> dict[str, Any]:
    """The entry ``release`` and ``rollout`` write (validated as the agent will)."""
    entry = _entry(
        args.version,
        artifact,
        args.manifest,
        deploymentId=dep,
        retries=args.retries,
        health=_health(args),
    )
    return _typed(entry, args.device_type)


def _health(args: argparse.Namespace) -> dict[str, Any] | None:
    """The entry's ``health`` from --health-window and --no-revert (None: defaults)."""
    health: dict[str, Any] = {}
    if args.health_window is not None:
        health["window"] = args.health_window
    if args.no_revert:
        health["revert"] = False
    return health or None


def _typed(entry: dict[str, Any], device_types: list[str] | None) -> dict[str, Any]:
    """``entry`` with its artifact for ``device_types`` only (``artifacts``), so that a
    release for other types can go into the same entry (see ``place``)."""
    if not device_types or "artifact" not in entry:
        return entry
    typed = {**entry, "artifacts": [{"deviceTypes": device_types, **entry["artifact"]}]}
    del typed["artifact"]
    return typed


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = 160  # piped: don't squeeze the columns into 80
    return console


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        raise FleetError(f"duration {text!r}: expected e.g. 90s, 10m, 1h")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]
    return float(m.group(1)) * scale


# ---------------------------------------------------------------- commands
def cmd_release(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.settle()
        artifact = _artifact(client, args)
        dep = args.deployment_id or deployment_id(args.flow, args.version)
        entry = _release_entry(args, artifact, dep)
        targets = list(client.devices()) if args.all else args.device
        if not targets:
            raise FleetError("no devices found on the broker (use --device for new ones)")

        def change(_device_id: str, doc: dict[str, Any]) -> dict[str, Any]:
            flows = dict(doc.get("flows") or {})
            flows[args.flow] = place(flows.get(args.flow), entry)
            return {**doc, "flows": flows}

        written = client.update_many(targets, change)
        for device_id, gen in written.items():
            print(f"{device_id}: {args.flow} {args.version or '(removed)'} generation {gen}")
        print(f"deployment {dep}: {len(written)} device(s)")
    return 0


def cmd_replace(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.settle()
        artifact = _artifact(client, args)
        dep = deployment_id(args.flow, args.new_version)
        entry = _entry(args.new_version, artifact, args.manifest, deploymentId=dep)

        def change(_device_id: str, doc: dict[str, Any]) -> dict[str, Any] | None:
            cur = (doc.get("flows") or {}).get(args.flow) or {}
            if cur.get("version") != args.old_version:
                return None
            keep = {
                k: cur[k]
                for k in ("retries", "deviceTypes", "config", "triggers", "permissions")
                if k in cur and entry.get("version")
            }
            return {**doc, "flows": {**doc.get("flows", {}), args.flow: {**keep, **entry}}}

        written = client.update_many(list(client.devices()), change)
        changed = [d for d, gen in written.items() if gen is not None]
        for device_id in changed:
            print(
                f"{device_id}: {args.flow} {args.old_version} -> {args.new_version or '(removed)'}"
            )
        print(f"deployment {dep}: {len(changed)} device(s) changed")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    if not args.flow and not args.device:
        raise FleetError("give --flow, --device or both")
    with _client(args) as client:
        client.settle()
        targets = [args.device] if args.device else list(client.devices())

        def change(_device_id: str, doc: dict[str, Any]) -> dict[str, Any] | None:
            flows = dict(doc.get("flows") or {})
            names = [args.flow] if args.flow else list(flows)
            names = [n for n in names if n in flows and (flows[n] or {}).get("version")]
            if not names:
                return None
            dep = deployment_id(args.flow or "all", "")
            for name in names:
                flows[name] = {"version": "", "deploymentId": dep}
            return {**doc, "flows": flows}

        written = client.update_many(targets, change)
        changed = [d for d, gen in written.items() if gen is not None]
        for device_id in changed:
            print(
                f"{device_id}: removed {args.flow or 'all flows'} (generation {written[device_id]})"
            )
        print(f"{len(changed)} device(s) changed")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.settle()
        rows = table_rows(client.devices().values())
    if args.device:
        rows = [r for r in rows if r["deviceId"] in args.device]
    if args.flow:
        rows = [r for r in rows if r["flowId"] == args.flow]
    if args.version:
        rows = [r for r in rows if args.version in (r["desiredVersion"], r["currentVersion"])]
    if args.filter_empty:
        rows = [r for r in rows if r["desiredVersion"] or r["currentVersion"]]
    field = args.sort_field
    present = sorted(
        (r for r in rows if r[field] is not None),
        key=lambda r: (str(r[field]), r["deviceId"], r["flowId"]),
        reverse=args.sort_direction == "desc",
    )
    rows = present + [r for r in rows if r[field] is None]  # missing values last
    total = len(rows)
    rows = rows[args.page * args.per_page : (args.page + 1) * args.per_page]
    if args.json:
        json.dump({"count": len(rows), "totalCount": total, "items": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.table import Table

    table = Table(title=f"{len(rows)} of {total} flow deployments")
    for col in COLUMNS:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) if r[c] is not None else "-" for c in COLUMNS))
    _console().print(table)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.settle()
        rows = table_rows(client.devices().values())
    if args.deployment:
        rows = [r for r in rows if r["deploymentId"] == args.deployment]
    else:
        rows = [
            r
            for r in rows
            if r["flowId"] == args.flow
            and (args.version is None or args.version in (r["desiredVersion"], r["currentVersion"]))
        ]
    counts = dict.fromkeys(STATUSES, 0)
    for r in rows:
        if r["status"] in counts:
            counts[r["status"]] += 1
    json.dump(counts, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        doc = client.read_topic(f"{client.prefix}/{args.device}/deployments/{args.deployment}/log")
    if doc is None:
        raise FleetError(f"no deployment log for {args.deployment} on {args.device}")
    print(
        f"{doc.get('deviceId')} {doc.get('flowId')} {doc.get('version')} "
        f"deployment {doc.get('deploymentId')}, attempt {doc.get('attempts')}"
    )
    for m in doc.get("messages", []):
        print(f"{m.get('time')} {m.get('level', ''):<7} {m.get('message')}")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = _console()
    with _client(args) as client:
        client.settle()
        artifact = _artifact(client, args)
        if not args.version or artifact is None:
            raise FleetError("a rollout needs --version and --artifact (use remove to remove)")
        dep = args.deployment_id or deployment_id(args.flow, args.version)
        entry = _release_entry(args, artifact, dep)
        targets = args.device or list(client.devices())
        if not targets:
            raise FleetError("no devices found on the broker")
        phases = phase_sizes(args.phase, len(targets))
        limit = failure_limit(args.max_failures, len(targets))
        console.print(
            f"rollout {dep}: {args.flow} {args.version} to {len(targets)} device(s) "
            f"in {len(phases)} phase(s) {phases}, tolerating {limit} failure(s)"
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
        ) as bars:
            tasks: dict[int, Any] = {}

            def show(p: PhaseProgress) -> None:
                if p.index not in tasks:
                    tasks[p.index] = bars.add_task(
                        f"phase {p.index + 1}/{len(phases)}", total=len(p.devices), detail=""
                    )
                c = p.counts
                bars.update(
                    tasks[p.index],
                    completed=c["ok"] + c["failed"] + c["skipped"],
                    detail=f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped",
                )

            rollout = Rollout(
                client,
                args.flow,
                entry,
                targets,
                phases,
                max_failures=limit,
                timeout=_duration(args.wait_timeout),
                rollback=args.rollback,
                on_progress=show,
                health_gate=not args.no_health_gate,
            )
            result = rollout.run()
        for name in ("ok", "failed", "skipped", "waiting", "not_started", "rolled_back"):
            devices = getattr(result, name)
            if devices:
                shown = ", ".join(devices[:10]) + (" …" if len(devices) > 10 else "")
                console.print(f"  {name.replace('_', ' ')}: {len(devices)} ({shown})")
        if result.stopped == "failures":
            console.print(
                f"rollout {dep} stopped after phase {result.phases_done + 1}: "
                f"{len(result.failed)} failure(s), more than {limit} tolerated"
                + ("; failed devices rolled back" if result.rolled_back else "")
            )
            return EXIT_STOPPED
        if result.stopped == "timeout":
            console.print(f"rollout {dep} timed out waiting for {len(result.waiting)} device(s)")
            return EXIT_TIMEOUT
        console.print(f"rollout {dep} complete: {len(result.ok)} device(s) succeeded")
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except ValueError as exc:
        raise FleetError(f"--payload is not JSON: {exc}") from None
    with _client(args) as client:
        if args.all:
            client.settle()
        targets = list(client.devices()) if args.all else args.device
        responses = client.command(targets, args.name, payload, args.timeout)
    missing = 0
    for device_id, response in responses.items():
        if response is None:
            missing += 1
            print(f"{device_id}: no response within {args.timeout:g} s")
        elif response.get("ok"):
            print(f"{device_id}: {json.dumps(response.get('result'))}")
        else:
            print(f"{device_id}: error: {response.get('error')}")
    return 1 if missing or any(r and not r.get("ok") for r in responses.values()) else 0


def cmd_sign(args: argparse.Namespace) -> int:
    import hashlib

    from agent.wire.signing import KeyFileError, generate, load_private_key, sign

    try:
        if args.sign_command == "keygen":
            name = args.name
            key_id = generate(
                name.with_name(name.name + ".key"), name.with_name(name.name + ".pub")
            )
            print(
                f"wrote {name}.key (private; keep it off devices) and {name}.pub "
                f"(copy to devices, artifacts.trusted_keys); key id {key_id}"
            )
            return 0
        key = load_private_key(args.key)
    except KeyFileError as exc:
        raise FleetError(str(exc)) from None
    try:
        digest = hashlib.sha256(args.file.read_bytes()).hexdigest()
    except OSError as exc:
        raise FleetError(f"cannot read {args.file}: {exc.strerror}") from None
    print(json.dumps({"sha256": digest, "signature": sign(key, digest).model_dump(by_alias=True)}))
    return 0


COMMANDS = {
    "release": cmd_release,
    "replace": cmd_replace,
    "remove": cmd_remove,
    "get": cmd_get,
    "stats": cmd_stats,
    "logs": cmd_logs,
    "rollout": cmd_rollout,
    "command": cmd_command,
    "sign": cmd_sign,
}


def run(args: argparse.Namespace) -> int:
    try:
        from agent.fleet import via_server

        conn = via_server.settings(args)
        if conn is not None:
            return via_server.run(args, conn)
        return COMMANDS[args.fleet_command](args)
    except FleetError as exc:
        sys.stderr.write(f"edge-agent fleet: {exc}\n")
        return 1
