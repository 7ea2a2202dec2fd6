"""The ``edge-agent`` command.

Exit codes: 0 success or clean shutdown; 1 runtime failure; 2 configuration or
usage error (systemd's ``RestartPreventExitStatus=2`` keeps a misconfigured
agent from restarting in a loop).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import AgentError, ConfigError
from agent.fleet import parser as fleet_parser
from agent.server import cli as server_cli

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default: $EDGE_AGENT_CONFIG "
        "or /etc/edge-agent/agent.toml if it exists)",
    )
    p.add_argument("--device-id", help="this device's id")
    p.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--state-dir", type=Path, help="state directory")
    p.add_argument("--log-format", choices=["console", "json"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--profile",
        choices=["edge", "losant"],
        help="losant: run as a Losant Embedded Edge Agent device ([losant] section)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.device_id:
        out["device_id"] = args.device_id
    if args.state_dir:
        out["state_dir"] = str(args.state_dir)
    if args.broker:
        out.setdefault("mqtt", {})["broker"] = args.broker
    if args.log_format:
        out.setdefault("log", {})["format"] = args.log_format
    if args.log_level:
        out.setdefault("log", {})["level"] = args.log_level
    if args.profile:
        out.setdefault("losant", {})["enabled"] = args.profile == "losant"
    return out


def _add_sim(sub: Any) -> None:
    p = sub.add_parser("sim", help="run a simulated fleet of real agents in one process")
    p.add_argument("--devices", type=int, required=True, help="how many (ids sim-0001...)")
    p.add_argument("--first", type=int, default=1, help="number of the first device id")
    p.add_argument("--config", type=Path, help="base agent config (TOML) for every device")
    p.add_argument("--broker", help="mqtt://host:port (default: the config's)")
    p.add_argument("--prefix", help="topic prefix (default: edge)")
    p.add_argument("--device-type", help="device type of every simulated device")
    p.add_argument(
        "--state-root",
        type=Path,
        help="directory for the devices' state (kept; a rerun resumes it). "
        "Default: a temporary directory, removed at exit",
    )
    p.add_argument("--log-level", default="warning", help="(default: warning)")
    p.add_argument(
        "--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Device agent: runs WASM flows deployed over MQTT in a wasmtime sandbox.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent in the foreground")
    _add_config_flags(run)
    check = sub.add_parser("check-config", help="validate and print the effective config")
    _add_config_flags(check)
    sub.add_parser("schema", help="print the JSON Schemas of the wire messages")
    bundle = sub.add_parser("bundle", help="build or inspect a workflow bundle (.tar.gz)")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    build = bsub.add_parser("build", help="build a bundle from a directory with a manifest")
    build.add_argument("dir", type=Path)
    build.add_argument("-o", "--output", type=Path, required=True)
    inspect = bsub.add_parser("inspect", help="verify a bundle and print what it holds")
    inspect.add_argument("file", type=Path)
    demo = sub.add_parser(
        "demo",
        help="run a local demonstration (broker, server and its console, simulated fleet, "
        "phased deployment, command, abort)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="stay up until Ctrl-C (to click through the console), then clean up",
    )
    demo.add_argument("--broker", help="use this broker (default: a private Mosquitto)")
    fleet_parser.add_parser(sub)
    server_cli.add_parser(sub)
    _add_sim(sub)
    _finish(parser)
    return parser


#: Help for flags that several subcommands share (where they are defined bare).
_SHARED_HELP = {
    "--log-format": "console or json (default: the configuration's)",
    "--log-level": "debug, info, warning or error (default: the configuration's)",
    "dir": "a directory with manifest.json or manifest.toml and the modules",
    "--output": "the .tar.gz to write",
    "file": "the file to read",
    "--username": "MQTT username",
    "--password-file": "file whose first line is the MQTT password",
    "--ca-file": "CA bundle for mqtts:// (default: the system's)",
    "--cert-file": "client certificate (PEM) for mutual TLS",
    "--key-file": "client private key (PEM) for mutual TLS",
    "--flow": "the flow id",
    "--kind": "what the artifact is: wasm, eea or bundle",
    "--retries": "attempts after a failed one, per device",
    "--version": "the version label",
    "--device-type": "only devices of this type (repeatable)",
    "--deployment-id": "the deployment id (default: <flow>-<version>)",
    "--old-version": "the version to replace",
    "--device": "a device id",
    "--sort-field": "sort by this column",
    "--sort-direction": "asc or desc",
    "--per-page": "rows per page",
    "--json": "print JSON instead of a table",
    "--deployment": "the deployment id",
    "--key": "the private key file (PEM)",
}


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that names a flag's default when it has one (and says none yet)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every flag has help, and help shows defaults, in every subcommand."""
    parser.formatter_class = _HelpWithDefaults
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _finish(sub)
        elif not action.help:
            names = [*action.option_strings, action.dest]
            action.help = next((_SHARED_HELP[n] for n in names if n in _SHARED_HELP), None)


def _load(args: argparse.Namespace) -> Any:
    from agent.device.config import load_config

    return load_config(args.config, overrides=_overrides(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.wire.signing import Trust

    cfg = _load(args)
    Trust.from_files(cfg.artifacts.trusted_keys, require=cfg.artifacts.require_signature)
    json.dump(cfg.masked(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK


def cmd_schema(_args: argparse.Namespace) -> int:
    from agent.wire.protocol import json_schemas

    json.dump(json_schemas(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK


async def _run_agent(cfg: Any, args: argparse.Namespace | None = None) -> None:
    from agent.device.daemon import Agent
    from agent.wire.signing import Trust

    loop = asyncio.get_running_loop()
    agent = Agent(cfg)
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            new = _load(args) if args is not None else cfg
            trust = Trust.from_files(
                new.artifacts.trusted_keys, require=new.artifacts.require_signature
            )
        except ConfigError as exc:  # keep running with what we have
            sys.stderr.write(f"edge-agent: reload refused: config error: {exc}\n")
            agent.notifier.ready(agent._status_line())
            return
        await agent.reload(new, trust)

    def on_hup() -> None:
        task = loop.create_task(reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    from agent.device import _signals

    stop_signals = frozenset({signal.SIGTERM, signal.SIGINT})
    restore = _signals.install(
        loop,
        {signal.SIGTERM: agent.stop, signal.SIGINT: agent.stop, signal.SIGHUP: on_hup},
        second_exits=stop_signals,
        exit_code=EXIT_FAILURE,
    )
    try:
        async with agent:
            await agent.stopped()
    finally:
        restore()


def _usable_state_dir(path: Path) -> None:
    """The state directory exists or can be made: else a config error (exit 2)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("state_dir", "", f"cannot use {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("state_dir", "", f"{path} is not writable") from None


def cmd_run(args: argparse.Namespace) -> int:
    from agent.device import _process

    _process.tune()  # before the daemon's imports and threads
    from agent.device._logging import configure_logging

    cfg = _load(args)
    _usable_state_dir(cfg.state_dir)
    configure_logging(cfg.log.level, cfg.log.format)
    try:
        asyncio.run(_run_agent(cfg, args))
    except AgentError as exc:
        sys.stderr.write(f"edge-agent: {exc}\n")
        return EXIT_FAILURE
    # State is persisted and the broker told: exit now rather than join a wasm worker
    # thread that may sit in a blocking WASI call, and before interpreter teardown
    # (where wasmtime can print a panic while freeing stores).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_OK)


def cmd_bundle(args: argparse.Namespace) -> int:
    from agent.errors import ArtifactError
    from agent.wire.bundle import build_bundle, describe

    try:
        if args.bundle_command == "build":
            manifest = build_bundle(args.dir, args.output)
            sys.stdout.write(
                f"{args.output}: {manifest.name} {manifest.version}, "
                f"{len(manifest.modules)} module(s), "
                f"sha256 {hashlib.sha256(args.output.read_bytes()).hexdigest()}\n"
            )
        else:
            json.dump(describe(args.file.read_bytes()), sys.stdout, indent=2)
            sys.stdout.write("\n")
    except (ArtifactError, OSError, ValueError) as exc:
        sys.stderr.write(f"edge-agent: {exc}\n")
        return EXIT_FAILURE
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if _fleet_extra_missing() is not None:
        return cmd_fleet(args)  # says which extra to install
    import importlib.util

    from agent.server.cli import EXIT_USAGE, SERVER_EXTRA

    missing = next((m for m in SERVER_EXTRA if importlib.util.find_spec(m) is None), None)
    if missing is not None:
        sys.stderr.write(
            f"edge-agent demo runs the control plane: it needs the server extra ({missing} "
            "is not installed): pip install 'edge-agent[fleet,server]'\n"
        )
        return EXIT_USAGE
    from agent.fleet import demo

    rc = demo.main(keep=args.keep, broker=args.broker)
    demo.watch_exit(rc)  # (this process is the demo's: it ends, whatever a thread does)
    return rc


#: What the operator side needs beyond the device agent (the ``fleet`` extra).
FLEET_EXTRA = ("rich",)


def _fleet_extra_missing() -> str | None:
    import importlib.util

    return next((m for m in FLEET_EXTRA if importlib.util.find_spec(m) is None), None)


def cmd_fleet(args: argparse.Namespace) -> int:
    missing = _fleet_extra_missing()
    if missing is not None:
        sys.stderr.write(
            f"edge-agent {args.command} needs the operator extra ({missing} is not "
            "installed): pip install 'edge-agent[fleet]'\n"
        )
        return EXIT_CONFIG
    from agent.fleet.cli import run

    return run(args)


def cmd_sim(args: argparse.Namespace) -> int:
    from agent.fleet.sim import run

    return run(args)


COMMANDS = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "schema": cmd_schema,
    "demo": cmd_demo,
    "bundle": cmd_bundle,
    "fleet": cmd_fleet,
    "sim": cmd_sim,
    "server": server_cli.cmd_server,
}


#: What a command cut off by a closed pipe (``edge-agent schema | head``) exits with,
#: as a process killed by SIGPIPE would.
EXIT_BROKEN_PIPE = 128 + 13


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        sys.stderr.write(f"edge-agent: config error: {exc}\n")
        return EXIT_CONFIG
    except BrokenPipeError:
        # The reader went away: no traceback, and no second error when Python
        # flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
