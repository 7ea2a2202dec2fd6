"""Export callbacks: the result is POSTed to an allowed callbackUrl, and a URL the
server's ``callbacks`` setting does not allow is refused before any job starts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from server_harness import RunningServer, running_server


class Receiver:
    """A real HTTP endpoint that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        arrived = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"path": self.path, "body": json.loads(body)})
                arrived.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.received = received
        self.arrived = arrived
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def server(tmp_path: Path, broker: Broker, receiver: Receiver) -> Iterator[RunningServer]:
    db = f"sqlite:///{tmp_path / 'server.db'}"
    settings = {"callbacks": [f"{receiver.url}/hooks/"]}
    with running_server(tmp_path / "srv", db, broker.url, settings=settings) as srv:
        yield srv


def test_the_result_is_posted_to_an_allowed_callback(
    server: RunningServer, receiver: Receiver
) -> None:
    app = server.app_id
    with server.http() as http:
        r = http.post(f"/applications/{app}/devices", json={"name": "one", "deviceId": "d1"})
        assert r.status_code == 201, r.text
        r = http.post(
            f"/applications/{app}/devices/export",
            params={"callbackUrl": f"{receiver.url}/hooks/export"},
        )
        assert r.status_code == 200, r.text
        job = r.json()["jobId"]
        assert receiver.arrived.wait(20), "no callback"
        got = receiver.received[0]
        assert got["path"] == "/hooks/export"
        assert got["body"]["jobId"] == job
        assert got["body"]["status"] == "done"
        listed = http.get(got["body"]["url"].replace(server.url, "")).json()
    assert [d["id"] for d in listed] == ["d1"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/elsewhere",  # not under an allowed prefix
        "http://169.254.169.254/latest/meta-data/",  # a cloud metadata address
    ],
)
def test_a_callback_the_server_does_not_allow_is_refused(
    server: RunningServer, receiver: Receiver, url: str
) -> None:
    with server.http() as http:
        r = http.post(f"/applications/{server.app_id}/devices/export", params={"callbackUrl": url})
    assert r.status_code == 400
    assert "not allowed by this server" in r.json()["message"]
    assert receiver.received == []


def test_a_download_link_works_until_it_expires(server: RunningServer) -> None:
    from common import COUNTER_WASM

    wasm = COUNTER_WASM.read_bytes()
    assert server.upload("counter", "v1", wasm).status_code == 201
    base = f"/applications/{server.app_id}/flows/counter/versions"
    with server.http() as http:
        link = http.get(f"{base}/v1/link", params={"expiresIn": 60}).json()
        assert link["expire"].endswith("Z")
        uri = link["items"][0]["uri"]
        assert "expires=" in uri
        got = http.get(uri.replace(server.url, ""), headers={"Authorization": ""})
        assert got.content == wasm
        # The same link with its expiry moved on is refused: the signature covers it.
        stretched = uri.rsplit("expires=", 1)[0] + "expires=9999999999"
        assert http.get(stretched.replace(server.url, "")).status_code == 404
        assert http.get(f"{base}/v9/link").status_code == 404
        assert http.get(f"{base}/v1/link", params={"expiresIn": 0}).status_code == 400
