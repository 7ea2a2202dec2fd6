"""Export jobs: the device inventory (Devices Export) and the WASM a device runs
(Embedded Deployments Export).

A job is a row (``queued`` → ``done`` | ``failed``) and a file under
``{state_dir}/exports/{jobId}``; it runs on a thread of its own, and when it ends
the result (``{"jobId", "status", "url"}`` or the error) is POSTed to the
``callbackUrl`` if one was given. The file is downloaded with a token through
``GET /applications/{app}/jobs/{jobId}/download``.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from pathlib import Path
from typing import Any

import structlog

from agent.device._fsutil import child_path
from agent.server.context import ServerContext
from agent.server.db import deployments as deployments_repo
from agent.server.db import devices as devices_repo
from agent.server.db.models import Application, Device, Job, utcnow
from agent.server.errors import NotFound, ServerError, Validation
from agent.server.text import text_problem

log = structlog.get_logger("agent.server.exports")

CALLBACK_TIMEOUT_S = 10.0
MAX_EMAIL = 320
MAX_CALLBACK_URL = 2048


def export_path(ctx: ServerContext, job_id: str) -> Path:
    if len(job_id) != 24 or not all(c in "0123456789abcdef" for c in job_id):
        raise NotFound("Job was not found")
    return child_path(ctx.cfg.state_dir / "exports", job_id)


def _check_callback(url: str | None, allowed: list[str]) -> None:
    """A callback URL the job's thread can POST to: http(s), a host, nothing that
    the HTTP client would refuse later (where the refusal would be lost), and under
    one of the prefixes the server's ``callbacks`` setting allows (none by default:
    a token must not make the server POST to any address it can reach)."""
    if url is None:
        return
    import httpx

    bad = Validation("callbackUrl: an http:// or https:// URL")
    if len(url) > MAX_CALLBACK_URL or not url.isprintable() or " " in url:
        raise bad
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise bad from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise bad
    if not any(url.startswith(prefix) for prefix in allowed):
        raise Validation(
            "callbackUrl: not allowed by this server (its `callbacks` setting lists the "
            "URL prefixes export results may be POSTed to)"
        )


def _start(ctx: ServerContext, app: Application, kind: str, params: dict[str, Any]) -> str:
    _check_callback(params.get("callbackUrl"), ctx.cfg.callbacks)
    email = params.get("email")
    if email is not None and (len(email) > MAX_EMAIL or text_problem(email)):
        raise Validation(f"email: at most {MAX_EMAIL} characters, no NUL")
    with ctx.db.transaction() as s:
        job = Job(application_id=app.id, kind=kind, params=params)
        s.add(job)
        s.flush()
        job_id = job.id
    threading.Thread(
        target=_run, args=(ctx, app.id, job_id, kind, params), name=f"export-{job_id}", daemon=True
    ).start()
    return job_id


def start_device_export(
    ctx: ServerContext, app: Application, email: str | None, callback_url: str | None
) -> str:
    return _start(ctx, app, "devices", {"email": email, "callbackUrl": callback_url})


def start_wasm_export(
    ctx: ServerContext, app: Application, device_id: str, callback_url: str | None
) -> str:
    with ctx.db.transaction() as s:
        dev = devices_repo.get(s, app.id, device_id)
        if dev is None or dev.decommissioned:
            raise NotFound(f"Device {device_id} was not found")
        if not any(
            d.current_sha256 for d in deployments_repo.for_device(s, app.id, device_id).values()
        ):
            raise NotFound(f"Device {device_id} reports no deployment running")
    return _start(ctx, app, "wasm", {"deviceId": device_id, "callbackUrl": callback_url})


def device_view(d: Device) -> dict[str, Any]:
    """A device in Losant's shape (plus this project's inventory fields)."""

    def iso(value: Any) -> str | None:
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z") if value else None

    return {
        "id": d.id,
        "deviceId": d.id,
        "applicationId": d.application_id,
        "name": d.name,
        "description": d.description,
        "tags": d.tags,
        "attributes": d.attributes,
        "deviceClass": d.device_class,
        "creationDate": iso(d.creation_date),
        "lastUpdated": iso(d.last_updated),
        "connectionInfo": {
            "connected": 1 if d.online else 0,
            "time": iso(d.connected_at if d.online else d.disconnected_at),
        },
        "deviceType": d.device_type,
        "agentVersion": d.agent_version,
        "runtime": d.runtime,
        "online": d.online,
        "lastSeen": iso(d.last_seen),
        "decommissioned": d.decommissioned,
    }


def _devices_file(ctx: ServerContext, app_id: str, out: Path) -> None:
    with ctx.db.transaction() as s:
        rows, _ = devices_repo.search(
            s,
            app_id,
            devices_repo.DeviceQuery(include_decommissioned=True),
            sort="id",
            descending=False,
            page=0,
            per_page=10**9,
        )
        doc = [device_view(d) for d in rows]
    out.write_text(json.dumps(doc, indent=1))


def _wasm_file(ctx: ServerContext, app_id: str, device_id: str, out: Path) -> None:
    with ctx.db.transaction() as s:
        running = {
            f: d.current_sha256
            for f, d in deployments_repo.for_device(s, app_id, device_id).items()
            if d.current_sha256
        }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for flow_id, sha in sorted(running.items()):
            if not ctx.store.exists(sha):
                raise ServerError(f"flow {flow_id}: the server does not hold artifact {sha}")
            zf.write(ctx.store.path(sha), f"{flow_id}.wasm")
    out.write_bytes(buf.getvalue())


def _run(ctx: ServerContext, app_id: str, job_id: str, kind: str, params: dict[str, Any]) -> None:
    """The job's thread: nothing escapes it (an exception here would be lost, and the
    job left queued for ever), so every failure ends in the job's row or the log."""
    try:
        _run_job(ctx, app_id, job_id, kind, params)
    except Exception as exc:  # noqa: BLE001 (the database away: logged, never raised in a thread)
        log.error("export job could not finish", job=job_id, error=repr(exc))


def _run_job(
    ctx: ServerContext, app_id: str, job_id: str, kind: str, params: dict[str, Any]
) -> None:
    out = export_path(ctx, job_id)
    result: dict[str, Any]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "devices":
            _devices_file(ctx, app_id, out)
        else:
            _wasm_file(ctx, app_id, params["deviceId"], out)
        url = f"{ctx.cfg.base_url}/applications/{app_id}/jobs/{job_id}/download"
        result = {"jobId": job_id, "status": "done", "url": url}
    except Exception as exc:  # noqa: BLE001 (reported in the job, never lost in a thread)
        log.warning("export failed", job=job_id, error=str(exc))
        result = {"jobId": job_id, "status": "failed", "error": str(exc)}
    with ctx.db.transaction() as s:
        job = s.get(Job, job_id)
        if job is not None:
            job.status = result["status"]
            job.result = result
            job.finished = utcnow()
    callback = params.get("callbackUrl")
    if callback:
        import httpx

        try:
            httpx.post(callback, json=result, timeout=CALLBACK_TIMEOUT_S)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            log.warning("export callback failed", job=job_id, error=str(exc))
