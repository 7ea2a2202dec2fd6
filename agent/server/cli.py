"""``edge-agent server``: run the control plane, or administer its database.

    edge-agent server --db sqlite:///srv.db --broker mqtt://127.0.0.1:1883
    edge-agent server admin create-application --name plant-1 [--prefix edge]
    edge-agent server admin create-token --application ID --scope all.Application
    edge-agent server admin create-user --application ID --email E --password-file F
    edge-agent server admin sweep-artifacts [--dry-run] [--grace SECONDS]

FastAPI, SQLAlchemy and uvicorn are imported only here, on use (the ``server``
extra); the device install does not need them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser("server", help="run the control plane (HTTP API, database) or administer it")
    _common(p)
    p.add_argument("--listen", help="HOST:PORT of the HTTP API (default 127.0.0.1:8080)")
    p.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--public-url", help="base URL devices download artifacts from")
    p.add_argument(
        "--protocol",
        choices=["5", "3.1.1"],
        help="MQTT protocol (3.1.1 has no shared subscriptions)",
    )
    p.add_argument("--instance", help="this process's name among several (client id, logs)")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    admin = p.add_subparsers(dest="server_command")
    a = admin.add_parser("admin", help="create applications, API tokens and users; sweep artifacts")
    _common(a)
    asub = a.add_subparsers(dest="admin_command", required=True)
    app = asub.add_parser("create-application", help="print the new application's id")
    app.add_argument("--name", required=True, help="the application's name")
    app.add_argument("--prefix", default="edge", help="its devices' MQTT topic prefix")
    tok = asub.add_parser("create-token", help="print a new API token (shown once)")
    tok.add_argument("--application", required=True, help="the application id")
    tok.add_argument(
        "--scope", action="append", required=True, help="a scope, e.g. all.Application (repeat)"
    )
    tok.add_argument("--name", default="", help="a label for the token")
    key = asub.add_parser(
        "set-signing-key", help="sign the artifacts released to an application's devices"
    )
    key.add_argument("--application", required=True, help="the application id")
    key.add_argument(
        "--key", type=Path, required=True, help="ed25519 private key (edge-agent fleet sign keygen)"
    )
    user = asub.add_parser(
        "create-user", help="a user who logs in to Mender's API (mender-cli login); prints its id"
    )
    user.add_argument("--application", required=True, help="the application id")
    user.add_argument("--email", required=True, help="the user's email (the login name)")
    user.add_argument(
        "--password-file",
        type=Path,
        help="a file holding the password (one trailing newline is dropped); "
        "default: read from stdin (never from the command line, where ps shows it)",
    )
    gone = asub.add_parser("delete-user", help="delete a user: its login tokens stop working")
    gone.add_argument("--email", required=True, help="the user's email")
    asub.add_parser("migrate", help="bring the database to the newest schema and exit")
    sweep = asub.add_parser(
        "sweep-artifacts",
        help="remove artifact bytes nothing references any more; print what went",
    )
    sweep.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    sweep.add_argument(
        "--grace",
        type=_seconds,
        metavar="SECONDS",
        help="seconds unreferenced bytes are kept first (default: the sweep_grace_s setting; "
        "under 600 only with --force)",
    )
    sweep.add_argument(
        "--force",
        action="store_true",
        help="allow a grace under 600 s: only while nothing is being uploaded or released "
        "(an upload's file is written before its rows)",
    )


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= seconds <= 30 * 86400:
        raise argparse.ArgumentTypeError("0 to 2592000 seconds")
    return seconds


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="the server's TOML configuration file")
    p.add_argument("--db", help="sqlite:///path or postgresql://user@host/db")
    p.add_argument("--state-dir", type=Path, help="where the SQLite database and artifacts live")


def _config(args: argparse.Namespace) -> Any:
    from agent.server.config import load_server_config

    over = {
        "db": args.db,
        "state_dir": str(args.state_dir) if args.state_dir else None,
        "listen": getattr(args, "listen", None),
        "broker": getattr(args, "broker", None),
        "public_url": getattr(args, "public_url", None),
        "instance": getattr(args, "instance", None),
    }
    cfg = load_server_config(args.config, over)
    if getattr(args, "protocol", None):
        cfg = cfg.model_copy(
            update={"mqtt": cfg.mqtt.model_copy(update={"protocol": args.protocol})}
        )
    return cfg


#: What ``edge-agent server`` needs beyond the device install (the ``server`` extra).
SERVER_EXTRA = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "python_multipart", "jwt")


def cmd_server(args: argparse.Namespace) -> int:
    import importlib.util

    missing = next((m for m in SERVER_EXTRA if importlib.util.find_spec(m) is None), None)
    if missing is not None:
        sys.stderr.write(
            f"edge-agent server needs the server extra ({missing} is not installed): "
            "pip install 'edge-agent[server]'\n"
        )
        return EXIT_USAGE
    from agent.server.errors import ApiError, ServerError

    try:
        if args.server_command == "admin":
            return _admin(args)
        return _run(args)
    except ApiError as exc:
        sys.stderr.write(f"edge-agent server: {exc.message}\n")
        return EXIT_USAGE
    except ServerError as exc:
        sys.stderr.write(f"edge-agent server: {exc}\n")
        return EXIT_USAGE


def _admin(args: argparse.Namespace) -> int:
    from agent.server.db import applications as apps_repo
    from agent.server.db.engine import Database

    cfg = _config(args)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.db_url)
    try:
        db.migrate()
        if args.admin_command == "migrate":
            return 0
        if args.admin_command in ("create-user", "delete-user"):
            return _users(args, db)
        if args.admin_command == "sweep-artifacts":
            return _sweep(args, cfg, db)
        with db.transaction() as s:
            if args.admin_command == "create-application":
                app = apps_repo.create_application(s, args.name, args.prefix)
                print(app.id)
                return 0
            found = apps_repo.get_application(s, args.application)
            if found is None:
                sys.stderr.write(f"edge-agent server: no application {args.application}\n")
                return EXIT_USAGE
            if args.admin_command == "set-signing-key":
                from agent.wire.signing import KeyFileError, load_private_key

                try:
                    load_private_key(args.key)
                except KeyFileError as exc:
                    sys.stderr.write(f"edge-agent server: {exc}\n")
                    return EXIT_USAGE
                found.signing_key = args.key.read_text()
                print(f"artifacts released to {found.id} are now signed")
                return 0
            _token, secret = apps_repo.create_token(s, found.id, args.scope, args.name)
            print(secret)
            return 0
    finally:
        db.close()


def _users(args: argparse.Namespace, db: Any) -> int:
    from agent.server.service import users

    if args.admin_command == "delete-user":
        print(users.delete_user(db, args.email))
        return 0
    password = _password(args.password_file)
    if password is None:
        return EXIT_USAGE
    print(users.create_user(db, args.application, args.email, password))
    return 0


def _sweep(args: argparse.Namespace, cfg: Any, db: Any) -> int:
    from agent.server.artifact_store import ArtifactStore
    from agent.server.config import MIN_SWEEP_GRACE_S
    from agent.server.service.artifact_sweep import sweep

    grace = cfg.sweep_grace_s if args.grace is None else args.grace
    if grace < MIN_SWEEP_GRACE_S and not args.force:
        sys.stderr.write(
            f"--grace {grace:g}: under {MIN_SWEEP_GRACE_S:g} s a sweep can remove the bytes "
            "of an upload or a release in progress; add --force if nothing is running\n"
        )
        return EXIT_USAGE
    report = sweep(db, ArtifactStore(cfg.artifact_dir), grace_s=grace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb}: {report.files} artifact file{'s' * (report.files != 1)} "
        f"({report.bytes} bytes), {report.blobs} blob row{'s' * (report.blobs != 1)}, "
        f"{report.temp_files} temporary file{'s' * (report.temp_files != 1)} "
        f"({report.temp_bytes} bytes)"
    )
    print(f"kept for the grace ({grace:g} s): {report.pending} unreferenced")
    return 0


def _password(path: Path | None) -> str | None:
    """The new user's password: from ``path``, else a prompt on a terminal, else
    stdin; one trailing newline dropped."""
    import getpass

    try:
        if path is not None:
            text = path.read_text(encoding="utf-8")
        elif sys.stdin.isatty():
            text = getpass.getpass("Password: ")
        else:
            text = sys.stdin.read()
    except (OSError, UnicodeDecodeError) as exc:
        sys.stderr.write(f"edge-agent server: cannot read the password: {exc}\n")
        return None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        sys.stderr.write("edge-agent server: the password is empty\n")
        return None
    return text


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from agent.device._logging import configure_logging
    from agent.server.api.app import create_app
    from agent.server.context import ServerContext

    configure_logging(args.log_level)
    cfg = _config(args)
    ctx = ServerContext(cfg)
    ctx.start()
    try:
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(ctx),
                host=cfg.host,
                port=cfg.port,
                log_level=args.log_level,
                access_log=args.log_level == "debug",
                timeout_graceful_shutdown=10,
            )
        )
        server.run()
    finally:
        ctx.stop()
    return 0
