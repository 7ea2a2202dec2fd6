"""``edge-agent fleet --server URL``: the same commands through ``edge-agent server``'s
HTTP API instead of the broker.

The server keeps the records (history, deployment ids, the inventory), so ``release``
uploads the artifact as a flow version first (once: a version already there with the
same bytes is reused), then releases it; ``get`` and ``stats`` read the deployment
records; ``command`` sends through the server. The token comes from ``--token-file``
or ``EDGE_AGENT_TOKEN`` (``--token`` works too, but shows in the process list).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from agent.fleet.controller import FleetError

TIMEOUT_S = 60.0
PAGE = 1000


class ServerClient:
    def __init__(self, url: str, token: str, application: str) -> None:
        import httpx

        self.app = application
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=TIMEOUT_S,
        )
        self._httpx = httpx

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, f"/applications/{self.app}{path}", **kw)
        except self._httpx.HTTPError as exc:
            raise FleetError(f"cannot reach the server: {exc}") from None
        if r.status_code >= 400:
            try:
                body = r.json()
                message = f"{body.get('type')}: {body.get('message')}"
            except ValueError:
                message = r.text[:200]
            raise FleetError(f"server answered {r.status_code} ({message})")
        return r.json()

    def all_pages(self, path: str, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        page = 0
        while True:
            got = self.call("GET", path, params={**params, "page": page, "perPage": PAGE})
            items.extend(got["items"])
            if len(items) >= got["totalCount"] or not got["items"]:
                return items
            page += 1


def settings(args: argparse.Namespace) -> tuple[str, str, str] | None:
    """(url, token, application) when the server is to be used, else None."""
    url = getattr(args, "server", None) or os.environ.get("EDGE_AGENT_SERVER")
    if not url or args.fleet_command == "sign":
        return None
    token = getattr(args, "token", None) or os.environ.get("EDGE_AGENT_TOKEN")
    token_file: Path | None = getattr(args, "token_file", None)
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise FleetError(f"cannot read {token_file}: {exc.strerror}") from None
    app = getattr(args, "application", None) or os.environ.get("EDGE_AGENT_APPLICATION")
    if not token or not app:
        raise FleetError(
            "--server needs a token (--token-file or EDGE_AGENT_TOKEN) and --application"
        )
    return url, token, app


def _version(client: ServerClient, args: argparse.Namespace, flow: str, version: str) -> None:
    """Make sure ``version`` of ``flow`` exists on the server (upload --artifact)."""
    existing = {v["version"]: v for v in client.call("GET", f"/flows/{flow}/versions")["items"]}
    source = getattr(args, "artifact", None)
    if source is None:
        if version not in existing:
            raise FleetError(f"the server has no version {version} of {flow}: give --artifact")
        return
    if source.startswith(("http://", "https://", "mqtt:")):
        raise FleetError("with --server, --artifact is a local file (the server serves it)")
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise FleetError(f"cannot read {source}: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if version in existing:
        if all(a["sha256"] != digest for a in existing[version]["artifacts"]):
            raise FleetError(f"version {version} of {flow} exists on the server with other bytes")
        return
    form: dict[str, str] = {"version": version, "kind": args.kind}
    manifest: dict[str, Any] = {}
    if getattr(args, "manifest", None):
        manifest.update(json.loads(Path(args.manifest).read_text()))
    if getattr(args, "retries", None) is not None:
        manifest["retries"] = args.retries
    health = {}
    if getattr(args, "health_window", None) is not None:
        health["window"] = args.health_window
    if getattr(args, "no_revert", False):
        health["revert"] = False
    if health:
        manifest["health"] = health
    if manifest:
        form["manifest"] = json.dumps(manifest)
    if getattr(args, "device_type", None):
        form["deviceTypes"] = json.dumps(args.device_type)
    client.call(
        "POST",
        f"/flows/{flow}/versions",
        data=form,
        files={"artifact": (Path(source).name, data, "application/octet-stream")},
    )


def _devices(client: ServerClient) -> list[str]:
    return [d["id"] for d in client.all_pages("/devices")]


def run(args: argparse.Namespace, conn: tuple[str, str, str]) -> int:
    url, token, app = conn
    command = args.fleet_command
    with ServerClient(url, token, app) as client:
        if command == "release":
            if args.version:
                _version(client, args, args.flow, args.version)
            targets = _devices(client) if args.all else args.device
            body = {"flowId": args.flow, "version": args.version or None, "deviceIds": targets}
            client.call("POST", "/edge/deployments/release", json=body)
            print(f"released {args.flow} {args.version or '(removed)'} to {len(targets)} device(s)")
            return 0
        if command == "replace":
            if args.new_version:
                _version(client, args, args.flow, args.new_version)
            body = {
                "flowId": args.flow,
                "oldVersion": args.old_version,
                "newVersion": args.new_version or None,
            }
            client.call("POST", "/edge/deployments/replace", json=body)
            print(f"{args.flow}: {args.old_version} -> {args.new_version or '(removed)'}")
            return 0
        if command == "remove":
            if not args.flow and not args.device:
                raise FleetError("give --flow, --device or both")
            client.call(
                "POST",
                "/edge/deployments/remove",
                json={"flowId": args.flow, "deviceId": args.device},
            )
            print(f"removed {args.flow or 'all flows'} from {args.device or 'every device'}")
            return 0
        if command == "get":
            return _get(client, args)
        if command == "stats":
            rows = client.all_pages("/edge/deployments", flowId=args.flow or None)
            if args.version:
                rows = [
                    r for r in rows if args.version in (r["desiredVersion"], r["currentVersion"])
                ]
            print(json.dumps(dict(sorted(Counter(str(r["status"]) for r in rows).items()))))
            return 0
        if command == "command":
            try:
                payload = json.loads(args.payload)
            except ValueError as exc:
                raise FleetError(f"--payload: not JSON ({exc})") from None
            targets = _devices(client) if args.all else args.device
            client.call(
                "POST",
                "/devices/command",
                json={"name": args.name, "payload": payload, "deviceIds": targets},
            )
            print(f"sent {args.name} to {len(targets)} device(s) (responses: on the broker)")
            return 0
    raise FleetError(f"'fleet {command}' works over the broker only (leave out --server)")


def _get(client: ServerClient, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "sortField": args.sort_field,
        "sortDirection": args.sort_direction,
        "page": args.page,
        "perPage": args.per_page,
    }
    for key, value in (("flowId", args.flow), ("version", args.version)):
        if value:
            params[key] = value
    if args.filter_empty:
        params["filterEmpty"] = "true"
    got = client.call("GET", "/edge/deployments", params=params)
    items = got["items"]
    if args.device:
        items = [r for r in items if r["deviceId"] in args.device]
    if args.json:
        json.dump(
            {"count": len(items), "totalCount": got["totalCount"], "items": items},
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return 0
    for r in items:
        print(
            f"{r['deviceId']:<24} {r['flowId']:<16} {r['desiredVersion'] or '-':<12} "
            f"{r['currentVersion'] or '-':<12} {r['status'] or '-'}"
        )
    print(f"{len(items)} of {got['totalCount']} flow deployments")
    return 0
