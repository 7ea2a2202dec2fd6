"""config/mosquitto/production.conf + edge-agent.acl: TLS client certificates and an ACL.

The agent converges over mutual TLS with the production configuration (adapted to a
temp dir and a free port); a device's certificate can neither read another device's
desired document, nor write another device's state, nor write its own desired one.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import wat
from broker import Broker, free_port
from common import REPO
from paho.mqtt.enums import CallbackAPIVersion

from agent.device.daemon import Agent

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is needed to generate test certificates"
)
CONF = REPO / "config" / "mosquitto"
NOT_AUTHORIZED = 135
ACCEPTED = {0, 16}  # success, and success with "no matching subscribers"


def _ssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("acl-pki")
    _ssl(
        d,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=edge-agent test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in [
        ("server", ["-extfile", "san.ext"]),
        ("dev1", []),
        ("dev2", []),
        ("operator", []),
    ]:
        cn = "localhost" if name == "server" else name
        _ssl(
            d,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        _ssl(
            d,
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            *ext,
            "-out",
            f"{name}.crt",
        )
    return d


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Path) -> Iterator[tuple[Broker, int]]:
    tls_port = free_port()
    conf = (CONF / "production.conf").read_text()
    conf = conf.replace("listener 8883", f"listener {tls_port} 127.0.0.1")
    conf = conf.replace("/etc/mosquitto/certs/", f"{pki}/").replace(
        "/etc/mosquitto/edge-agent.acl", str(CONF / "edge-agent.acl")
    )
    conf = "\n".join(
        line
        for line in conf.splitlines()
        if not line.startswith(("persistence_location", "persistence "))
    )
    b = Broker(tmp_path / "secure", extra_conf=conf)
    b.start()
    yield b, tls_port
    b.stop()


class Client:
    """A paho MQTT 5 client authenticated by a certificate, recording reason codes."""

    def __init__(self, pki: Path, name: str, port: int) -> None:
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"acl-{name}", protocol=paho.MQTTv5
        )
        self.c.tls_set(
            ca_certs=str(pki / "ca.crt"),
            certfile=str(pki / f"{name}.crt"),
            keyfile=str(pki / f"{name}.key"),
            cert_reqs=ssl.CERT_REQUIRED,
        )
        self.events: dict[Any, Any] = {}
        self.got: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        with self.cond:
            self.events[("sub", mid)] = [c.value for c in codes]
            self.cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, code: Any, _p: Any) -> None:
        with self.cond:
            self.events[("pub", mid)] = code.value
            self.cond.notify_all()

    def _wait(self, key: tuple[str, int]) -> Any:
        with self.cond:
            assert self.cond.wait_for(lambda: key in self.events, 10), key
            return self.events[key]

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.c.subscribe(topic, qos=1)
        return self._wait(("sub", mid))  # type: ignore[no-any-return]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        return self._wait(("pub", info.mid))  # type: ignore[no-any-return]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


async def test_device_confined_to_its_topics_and_converging_over_mtls(
    secure_broker: tuple[Broker, int], pki: Path, make_config: Any
) -> None:
    import asyncio

    _, port = secure_broker
    operator = Client(pki, "operator", port)
    dev1 = Client(pki, "dev1", port)
    try:
        # the operator may publish artifacts and desired documents, and read reports
        data = wat.reactor("acl")
        sha = wat.sha256(data)
        assert operator.publish(f"edge/artifacts/{sha}", data, retain=True) in ACCEPTED
        desired = {
            "generation": 1,
            "flows": {
                "f1": {
                    "version": "v1",
                    "artifact": {"url": f"mqtt:edge/artifacts/{sha}", "sha256": sha},
                }
            },
        }
        assert (
            operator.publish("edge/dev1/desired", json.dumps(desired).encode(), retain=True)
            in ACCEPTED
        )
        assert operator.publish("edge/dev2/desired", b'{"generation": 1}', retain=True) in ACCEPTED
        assert operator.subscribe("edge/+/state") == [1]

        cfg = make_config(
            mqtt={
                "broker": f"mqtts://127.0.0.1:{port}",
                "ca_file": str(pki / "ca.crt"),
                "cert_file": str(pki / "dev1.crt"),
                "key_file": str(pki / "dev1.key"),
                "client_id": "dev1-agent",
            }
        )
        async with Agent(cfg):
            for _ in range(200):
                states = [json.loads(p) for t, p in operator.got if t == "edge/dev1/state"]
                if states and states[-1]["flows"].get("f1", {}).get("status") == "success":
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"no convergence over mutual TLS: {operator.got[-3:]}")

        # dev1's certificate: not another device's desired, not another's state,
        # not its own desired document
        # (Mosquitto grants the subscription and applies read access at delivery)
        dev1.subscribe("edge/dev2/desired")
        dev1.subscribe("edge/dev1/desired")
        for _ in range(100):  # its own retained desired arrives: the positive control
            if any(t == "edge/dev1/desired" for t, _ in dev1.got):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert [t for t, _ in dev1.got] == ["edge/dev1/desired"]  # never dev2's
        assert dev1.publish("edge/dev2/state", b"{}") == NOT_AUTHORIZED
        assert dev1.publish("edge/dev1/desired", b'{"generation": 99}') == NOT_AUTHORIZED
        assert dev1.publish("edge/dev1/state", b"{}") in ACCEPTED
        assert not [t for t, _ in operator.got if t == "edge/dev2/state"]
    finally:
        operator.close()
        dev1.close()
