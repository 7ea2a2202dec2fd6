"""The arguments of ``edge-agent fleet`` (argparse only: building the parser imports
nothing heavy, so ``edge-agent --version`` and ``--help`` stay fast, and work
without the ``[fleet]`` extra)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SORT_FIELDS = ["deviceId", "flowId", "desiredVersion", "currentVersion", "lastUpdated"]
COLUMNS = (
    "deviceId",
    "flowId",
    "desiredVersion",
    "currentVersion",
    "status",
    "health",
    "lastUpdated",
    "online",
)
KINDS = ["wasm", "eea", "bundle"]
EXIT_STOPPED = 2
EXIT_TIMEOUT = 3


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--config", type=Path, help="TOML file whose [mqtt] section is used")
    g.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    g.add_argument("--prefix", help="topic prefix (default: edge)")
    g.add_argument("--username")
    g.add_argument("--password-file", type=Path)
    g.add_argument("--ca-file", type=Path)
    g.add_argument("--cert-file", type=Path)
    g.add_argument("--key-file", type=Path)
    s = p.add_argument_group("control plane (instead of the broker)")
    s.add_argument("--server", help="edge-agent server's URL (or EDGE_AGENT_SERVER)")
    s.add_argument("--application", help="the application id (or EDGE_AGENT_APPLICATION)")
    s.add_argument("--token-file", type=Path, help="file holding the API token")
    s.add_argument("--token", help="the API token (or EDGE_AGENT_TOKEN; shows in ps)")


def _artifact_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", help="a local file (sent over MQTT when small) or a URL")
    p.add_argument("--kind", default="wasm", choices=KINDS)
    p.add_argument("--sign", type=Path, metavar="KEY", help="sign with this ed25519 key")
    p.add_argument(
        "--manifest",
        type=Path,
        help="JSON file with the entry's triggers, permissions and config",
    )
    p.add_argument(
        "--mqtt-limit",
        type=int,
        default=256 * 1024,
        help="largest artifact sent over MQTT, in bytes (larger: give a URL)",
    )


def _add_release(fsub: Any) -> None:
    rel = fsub.add_parser("release", help="release a flow version to devices (blank: remove)")
    _common(rel)
    rel.add_argument("--flow", required=True)
    rel.add_argument("--version", required=True, help='the version; "" removes the flow')
    _artifact_flags(rel)
    target = rel.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", action="append", help="a device id (repeatable)")
    target.add_argument("--all", action="store_true", help="every device seen on the broker")
    rel.add_argument(
        "--device-type",
        action="append",
        help="the artifact is for devices of this type (repeatable); releasing the same "
        "version for other types adds their artifacts to the entry",
    )
    rel.add_argument("--retries", type=int, default=2)
    rel.add_argument("--deployment-id", help="default: <flow>-<version>-<time>")
    _health_flags(rel)


def _health_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--health-window",
        type=float,
        help="seconds the new version is on probation (default: the agent's, 60)",
    )
    p.add_argument(
        "--no-revert",
        action="store_true",
        help="a version that fails in its window stays (default: the previous one comes back)",
    )


def _add_rollout(fsub: Any) -> None:
    ro = fsub.add_parser("rollout", help="a phased release that stops on failures")
    _common(ro)
    ro.add_argument("--flow", required=True)
    ro.add_argument("--version", required=True)
    _artifact_flags(ro)
    ro.add_argument("--device", action="append", help="a device id (default: all devices)")
    ro.add_argument(
        "--device-type",
        action="append",
        help="the artifact is for devices of this type (repeatable), as for release",
    )
    ro.add_argument("--retries", type=int, default=2)
    ro.add_argument("--deployment-id")
    _health_flags(ro)
    ro.add_argument(
        "--phase",
        action="append",
        required=True,
        help="cumulative share of the devices (10%%) or count; repeat, last one 100%%",
    )
    ro.add_argument("--max-failures", default="0", help="tolerated failures: 5%% or a count")
    ro.add_argument("--wait-timeout", default="10m", help="per phase: 90s, 10m, 1h")
    ro.add_argument(
        "--no-health-gate",
        action="store_true",
        help="count a device done as soon as it runs the version, not after its health window",
    )
    ro.add_argument(
        "--rollback",
        action="store_true",
        help="when stopped by failures, give the failed devices their previous version",
    )


def _add_replace_remove(fsub: Any) -> None:
    rep = fsub.add_parser("replace", help="every device with version A of a flow gets B")
    _common(rep)
    rep.add_argument("--flow", required=True)
    rep.add_argument("--old-version", required=True)
    rep.add_argument("--new-version", required=True, help='"" removes the flow')
    _artifact_flags(rep)
    rem = fsub.add_parser(
        "remove",
        help="remove a flow from a device, a flow from all devices, or all flows from a device",
    )
    _common(rem)
    rem.add_argument("--flow")
    rem.add_argument("--device")


def _add_queries(fsub: Any) -> None:
    get = fsub.add_parser("get", help="desired vs current, per device and flow")
    _common(get)
    get.add_argument("--device", action="append", help="only this device (repeatable)")
    get.add_argument("--flow")
    get.add_argument("--version", help="desired or current version")
    get.add_argument(
        "--filter-empty",
        action="store_true",
        help="leave out rows with neither a desired nor a current version",
    )
    get.add_argument("--sort-field", choices=SORT_FIELDS, default="deviceId")
    get.add_argument("--sort-direction", choices=["asc", "desc"], default="asc")
    get.add_argument("--page", type=int, default=0, help="page number, from 0")
    get.add_argument("--per-page", type=int, default=1000)
    get.add_argument("--json", action="store_true")

    st = fsub.add_parser("stats", help="devices per status for a deployment")
    _common(st)
    which = st.add_mutually_exclusive_group(required=True)
    which.add_argument("--deployment")
    which.add_argument("--flow")
    st.add_argument("--version")

    logs = fsub.add_parser("logs", help="the deployment log a device published on failure")
    _common(logs)
    logs.add_argument("--device", required=True)
    logs.add_argument("--deployment", required=True, help="deployment id (or the flow id)")


def _add_command(fsub: Any) -> None:
    cmd = fsub.add_parser("command", help="send a device command and print the responses")
    _common(cmd)
    target = cmd.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", action="append", help="a device id (repeatable)")
    target.add_argument("--all", action="store_true", help="every device seen on the broker")
    cmd.add_argument("--name", required=True, help="e.g. agent.ping, or a flow's command")
    cmd.add_argument("--payload", default="null", help="JSON (default: null)")
    cmd.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")


def _add_sign(fsub: Any) -> None:
    sign = fsub.add_parser("sign", help="ed25519 keys and artifact signatures")
    ssub = sign.add_subparsers(dest="sign_command", required=True)
    keygen = ssub.add_parser("keygen", help="write NAME.key (private, 0600) and NAME.pub")
    keygen.add_argument("name", type=Path, help="path and base name of the two files")
    art = ssub.add_parser("artifact", help="print the signature entry of an artifact file")
    art.add_argument("file", type=Path)
    art.add_argument("--key", type=Path, required=True)


def add_parser(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="operator commands across a fleet (over the broker)")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True)
    _add_release(fsub)
    _add_rollout(fsub)
    _add_replace_remove(fsub)
    _add_queries(fsub)
    _add_command(fsub)
    _add_sign(fsub)
