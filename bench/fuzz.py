"""Fuzz and fault campaign against a real ``edge-agent run`` process.

Starts a private Mosquitto (``tests/support/broker.py``), an HTTP artifact server
(``tests/support/artifact_server.py``) and the agent as a subprocess, then publishes
mutated desired documents (retained, QoS 1) and mutated commands (QoS 1) at it, in
batches that each end with an ``agent.ping`` barrier (the next batch goes out only
once the agent has answered), so the campaign measures the agent, not a backlog.

Inputs start from a seed corpus of valid documents (real WASM modules served over
HTTP, ``mqtt:`` and ``file://``; secret-bearing URLs ``http://fznN:SECRET@...?token=SECRET``;
triggers, permissions, config objects) and of valid commands, mutated at the JSON
level (values of other types, huge integers written as digits, long strings, lone
surrogate escapes, NaN/Infinity, nesting 10..200000 deep, odd flow ids, odd
generations, odd URLs, duplicate keys) and at the byte level (bit flips,
truncation, insertion, deletion, UTF-16/UTF-32, byte order marks, invalid UTF-8).

What counts as a finding (the exit status is 1 if there is any):

- crash: the agent process exited on its own (exit code and last log lines; it
  is restarted; exiting again within a few seconds of a restart is a crash loop,
  after which the retained desired document is cleared and, if that is not
  enough, the state directory is moved aside);
- traceback: a log line with an ``exception`` member or a ``Traceback``;
- internal error: a log line containing "internal error";
- escape: a sentinel file changed or vanished (in the state dir, next to it, in
  ``artifacts/``, in an innocent flow's data dir) or a file appeared, changed or
  vanished anywhere in the work dir outside the agent's own files and the fuzzed
  flows' own ``flows/<id>/`` directories;
- leak: "SECRET" (only ever sent in the user info or query of artifact URLs) in a
  log line or in any message the agent publishes (a separate client subscribes to
  ``edge/#``; a final sweep reads the retained messages);
- unanswered / duplicate / stray: a command that got no response, or more than one, or
  a response that does not carry its command's correlation data or id (an unanswered
  command is sent once more at the end, to tell a lost response from a hang);
- not malformed: a command that is not a valid JSON object (RFC 8259 text in
  UTF-8, a leading BOM tolerated) answered other than ``ok: false`` with an error
  starting "malformed";
- stall: no answer to a barrier ping within 30 s while the process is alive.

For the first examples of each finding the culprit input is found from a marker
(every input carries ``fznN``), from the command's correlation data, or by
replaying the batch one input at a time. Every finding (up to 1000 per kind) is also
written to ``findings.jsonl`` in the work dir, which is kept (with the agent log and
the broker's files) when there is a finding, or with ``--keep``.

Usage::

    python bench/fuzz.py --quick                 # 2,000 desired documents and 2,000 commands
    python bench/fuzz.py [--desired 100000] [--commands 100000] [--seed S] [--json]
                         [--batch 50] [--time-limit 3600] [--agent-src DIR] [--keep]

``--agent-src DIR`` runs the agent package found in DIR (prepended to PYTHONPATH),
e.g. an export of another revision: ``git archive HEAD agent | tar -x -C /tmp/head``.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "fuzz1"
BASE = f"edge/{DEVICE}"
DESIRED = f"{BASE}/desired"
COMMAND = f"{BASE}/command"
RESPONSE = f"{BASE}/command/response"
REPLIES = f"{BASE}/replies/fuzz"
STATE = f"{BASE}/state"
EVENTS = f"{BASE}/events"
SECRET = "SECRET"
INNOCENT = "innocent"
FUZZ_IDS = ("fz-a", "fz-b", "fz-c")
#: First generation used; 10 digits, so a replayed document can take a new one.
GEN0 = 1_000_000_000
MARK = "@N@"  # replaced by fznN, the input's number, wherever it appears
MARKER_RE = re.compile(r"fzn(\d+)")
CRASH_LOOP_S = 10.0
BARRIER_TIMEOUT = 30.0
HANG_TIMEOUT = 120.0
IN_PROGRESS = {"pending", "downloading", "installing"}
SECRET_ENCODINGS = tuple(
    SECRET.encode(e) for e in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
)

FINDINGS = (
    ("crash", "crashes"),
    ("crash_loop", "crash loops"),
    ("traceback", "tracebacks"),
    ("internal_error", "internal errors"),
    ("escape", "escapes"),
    ("leak", "secret leaks"),
    ("unanswered", "unanswered commands"),
    ("duplicate", "duplicate responses"),
    ("not_malformed", "malformed input not refused"),
    ("bad_response", "unparseable responses"),
    ("stray_response", "stray responses"),
    ("stall", "stalls"),
)


# --------------------------------------------------------------------------- JSON text


@dataclass(frozen=True)
class Raw:
    """JSON text inserted verbatim (NaN, 10**5000 as digits, deep nesting, ...)."""

    text: str


@dataclass
class Dup:
    """An object written with the given (possibly repeated) keys."""

    pairs: list[tuple[str, Any]]


def dumps(obj: Any, *, compact: bool = True, ascii_only: bool = True) -> str:
    item_sep, key_sep = (",", ":") if compact else (", ", ": ")
    out: list[str] = []

    def text(value: str) -> str:
        return json.dumps(value, ensure_ascii=ascii_only)

    def enc(o: Any) -> None:
        if isinstance(o, Raw):
            out.append(o.text)
        elif isinstance(o, Dup | dict):
            pairs = o.pairs if isinstance(o, Dup) else list(o.items())
            out.append("{")
            for i, (k, v) in enumerate(pairs):
                if i:
                    out.append(item_sep)
                out.append(text(str(k)))
                out.append(key_sep)
                enc(v)
            out.append("}")
        elif isinstance(o, list | tuple):
            out.append("[")
            for i, v in enumerate(o):
                if i:
                    out.append(item_sep)
                enc(v)
            out.append("]")
        elif isinstance(o, str):
            out.append(text(o))
        else:
            out.append(json.dumps(o))

    enc(obj)
    return "".join(out)


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


_TOKEN = re.compile(
    r"[ \t\n\r]*(?:(?P<p>[{}\[\]:,])"
    r'|(?P<s>"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")'
    r"|(?P<n>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<l>true|false|null))"
)


def json_syntax_ok(text: str) -> bool:
    """RFC 8259 grammar, iteratively (any depth, any number size, no NaN)."""
    stack: list[str] = []
    state = "value"
    pos = 0

    def after() -> str:
        return "next" if stack else "end"

    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            return state == "end" and not text[pos:].strip(" \t\n\r")
        pos = m.end()
        kind = m.lastgroup
        tok = m.group(kind or 0)
        if state in ("value", "value_or_close"):
            if state == "value_or_close" and tok == "]":
                stack.pop()
                state = after()
            elif tok == "{":
                stack.append("{")
                state = "key_or_close"
            elif tok == "[":
                stack.append("[")
                state = "value_or_close"
            elif kind in ("s", "n", "l"):
                state = after()
            else:
                return False
        elif state in ("key", "key_or_close"):
            if state == "key_or_close" and tok == "}":
                stack.pop()
                state = after()
            elif kind == "s":
                state = "colon"
            else:
                return False
        elif state == "colon":
            if tok != ":":
                return False
            state = "value"
        elif state == "next":
            top = stack[-1]
            if tok == ",":
                state = "key" if top == "{" else "value"
            elif tok == ("}" if top == "{" else "]"):
                stack.pop()
                state = after()
            else:
                return False
        else:  # "end": a second value
            return False


def strict_object_problem(payload: bytes) -> str | None:
    """Why ``payload`` is not a JSON object in UTF-8 (BOM tolerated), or None."""
    if not payload:
        return "empty"
    boms = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    if any(payload.startswith(b) for b in boms):
        return "UTF-16/32"
    body = payload[3:] if payload.startswith(codecs.BOM_UTF8) else payload
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "UTF-16/32" if b"\x00" in body[:8] else "not UTF-8"
    if not json_syntax_ok(text):
        if b"\x00" in body[:8] and lenient_load(payload) is not None:
            return "UTF-16/32"
        if re.search(r"NaN|Infinity", text) and lenient_load(payload) is not None:
            return "NaN/Infinity literal"
        return "not JSON"
    if not text.lstrip(" \t\n\r").startswith("{"):
        return "not an object"
    return None


def lenient_load(payload: bytes) -> Any:
    """What Python's json makes of the payload (as the agent's first parser did), or None."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def walk(obj: Any) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every node, iteratively (parsed documents can be deep)."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), obj)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in enumerate(node))


def secret_placement_ok(payload: bytes) -> bool:
    """SECRET may only be in the user info or query of an artifact URL (not mqtt:), where
    the agent promises to leave it out of messages and logs."""
    if not any(s in payload for s in SECRET_ENCODINGS):
        return True
    doc = lenient_load(payload)
    if doc is None:
        return True  # unparseable: the agent has no business quoting any of it
    for path, node in walk(doc):
        if isinstance(node, dict) and any(SECRET in str(k) for k in node):
            return False
        if not isinstance(node, str) or SECRET not in node:
            continue
        is_url = len(path) == 4 and path[0] == "flows" and path[2:] == ("artifact", "url")
        if not is_url or node.startswith("mqtt:"):
            return False
        try:
            parts = urlsplit(node)
        except ValueError:
            return False
        host = parts.netloc.rpartition("@")[2]
        if SECRET in parts.scheme + host + parts.path + parts.fragment:
            return False
    return True


# --------------------------------------------------------------------------- mutation


WEIRD_STRINGS = (
    "",
    " ",
    "\u0000",
    "\udfff",
    "\ud800",
    "a\udfffb",
    "\ud83d",
    "é",
    "日本語",
    "🙂",
    "\u202e",
    "\\",
    '"',
    "../../etc/passwd",
    "%s%n%x",
    "{}",
    "null",
    "true",
    "0",
    "-1",
    "x" * 65,
    "x" * 129,
    "x" * 256,
    "x" * 257,
    "#",
    "+",
    "/",
    "a/b",
    "$SYS/x",
    "\n",
    "\t",
    "2026-13-45T99:99:99Z",
    "yesterday",
    "1e309",
    "0x10",
)
FLOW_ID_SPECIALS = (
    ".",
    "..",
    "...",
    "....",
    "a/b",
    "",
    "x" * 65,
    "y" * 64,
    "é",
    "日本",
    "a b",
    "+",
    "#",
    "../x",
    "..\\x",
    "\u0000",
    "-",
    "_",
    ".hidden",
    "a..b",
    "CON",
    "fz-a\n",
    " fz-a",
    "\udfff",
    "\ud800x",
    "flows",
    "fz/../..",
)
DEPTHS = (10, 31, 32, 33, 100, 1000, 10_000, 100_000, 200_000)
DIGITS = (19, 20, 309, 400, 4300, 4301, 5000, 5001)


def huge_int(rng: random.Random) -> Raw:
    digits = rng.choice(DIGITS)
    sign = "-" if rng.random() < 0.2 else ""
    return Raw(sign + "1" + "0" * (digits - 1))


def deep(rng: random.Random) -> Raw:
    d = rng.choice(DEPTHS)
    if rng.random() < 0.5:
        return Raw("[" * d + "]" * d)
    return Raw('{"a":' * d + "0" + "}" * d)


def nan(rng: random.Random) -> Raw:
    return Raw(rng.choice(("NaN", "Infinity", "-Infinity", "-NaN", "nan", "1e999")))


def long_string(rng: random.Random) -> str:
    return rng.choice("AZé🙂") * rng.choice((1000, 4096, 65_536, 300_000))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.08:
        return None
    if r < 0.14:
        return rng.random() < 0.5
    if r < 0.26:
        return rng.choice((0, -1, 1, 7, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1))
    if r < 0.32:
        return rng.choice((0.5, -0.0, 1e308, 5e-324, 1.5, -2.5e10))
    if r < 0.38:
        return nan(rng)
    if r < 0.44:
        return huge_int(rng)
    if r < 0.62:
        return rng.choice(WEIRD_STRINGS)
    if r < 0.66:
        return long_string(rng)
    if r < 0.70:
        return deep(rng)
    if r < 0.85 and depth < 3:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3:
        return {
            rng.choice(WEIRD_STRINGS[:20]) or "k": random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 4))
        }
    return rng.choice(WEIRD_STRINGS)


JsonPath = tuple[Any, ...]


def slots(doc: Any, skip: Callable[[JsonPath], bool]) -> list[tuple[Any, Any, JsonPath]]:
    """(container, key, path) of every replaceable member, skipping protected paths."""
    out: list[tuple[Any, Any, tuple[Any, ...]]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                p = (*path, k)
                if skip(p):
                    continue
                out.append((node, k, p))
                stack.append((p, v))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                p = (*path, i)
                out.append((node, i, p))
                stack.append((p, v))
    return out


def dicts(doc: Any, skip: Callable[[JsonPath], bool]) -> list[tuple[dict[str, Any], JsonPath]]:
    found = [(doc, ())] if isinstance(doc, dict) else []
    for _c, _k, path in slots(doc, skip):
        node = _get(doc, path)
        if isinstance(node, dict):
            found.append((node, path))
    return found


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def pathname(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)[:60] or "(root)"


BYTE_TOKENS = (
    b"\x00",
    b"\xff",
    b"\xfe",
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\",
    b"\\u",
    b"\\ud800",
    b"\xc0\xaf",
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xc3",
    b"\xe2\x82",
    b"NaN",
    b"-",
    b"1e99999",
    b"\r\n",
    b"\x1b[2J",
)


def byte_mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    ops = (
        "bitflip",
        "truncate",
        "insert",
        "delete",
        "dup-span",
        "utf16",
        "utf32",
        "bom",
        "invalid-utf8",
        "overlong",
        "cesu",
        "nul",
        "trailing",
        "whitespace",
        "empty",
    )
    weights = (20, 10, 14, 8, 5, 6, 4, 6, 8, 3, 3, 3, 4, 3, 1)
    op = rng.choices(ops, weights)[0]
    b = bytearray(data)
    n = len(b)
    if op == "bitflip" and n:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(b), op
    if op == "truncate" and n:
        return bytes(b[: rng.randrange(n)]), op
    if op == "insert":
        pos = rng.randint(0, n)
        token = (
            rng.choice(BYTE_TOKENS)
            if rng.random() < 0.7
            else bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        )
        return bytes(b[:pos]) + token + bytes(b[pos:]), op
    if op == "delete" and n:
        pos = rng.randrange(n)
        return bytes(b[:pos] + b[pos + rng.randint(1, 32) :]), op
    if op == "dup-span" and n:
        pos = rng.randrange(n)
        span = b[pos : pos + rng.randint(1, 64)]
        return bytes(b[:pos] + span + span + b[pos + len(span) :]), op
    if op in ("utf16", "utf32"):
        text = data.decode("utf-8", "surrogatepass")
        codec = rng.choice(
            ("utf-16", "utf-16-le", "utf-16-be")
            if op == "utf16"
            else ("utf-32", "utf-32-le", "utf-32-be")
        )
        return text.encode(codec, "surrogatepass"), f"{op}:{codec}"
    if op == "bom":
        bom = rng.choice(
            (
                codecs.BOM_UTF8,
                codecs.BOM_UTF8 * 2,
                codecs.BOM_UTF16_LE,
                codecs.BOM_UTF16_BE,
                codecs.BOM_UTF32_LE,
                codecs.BOM_UTF32_BE,
            )
        )
        return bom + data, op
    if op == "invalid-utf8" and n:
        quotes = [i for i, c in enumerate(b) if c == 0x22]
        pos = rng.choice(quotes) + 1 if quotes and rng.random() < 0.7 else rng.randrange(n)
        return bytes(b[:pos]) + bytes([rng.choice((0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFF))]) + bytes(
            b[pos:]
        ), op
    if op in ("overlong", "cesu") and n:
        quotes = [i for i, c in enumerate(b) if c == 0x22]
        pos = rng.choice(quotes) + 1 if quotes else 0
        token = b"\xc0\xaf" if op == "overlong" else rng.choice((b"\xed\xa0\x80", b"\xed\xbf\xbf"))
        return bytes(b[:pos]) + token + bytes(b[pos:]), op
    if op == "nul":
        return data + b"\x00" * rng.randint(1, 8), op
    if op == "trailing":
        return data + rng.choice((b"x", b"}", b"]", b" garbage", data)), op
    if op == "whitespace":
        return b" \t\r\n" * rng.randint(1, 100) + data + b"\n" * rng.randint(0, 3), op
    return b"", "empty"


# --------------------------------------------------------------------------- corpus


@dataclass
class Artifact:
    name: str
    data: bytes
    kind: str = "wasm"

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class Corpus:
    """Valid seed documents and commands, and their mutations."""

    def __init__(
        self,
        rng: random.Random,
        artifacts: list[Artifact],
        http_port: int,
        closed_port: int,
        www: Path,
    ) -> None:
        self.rng = rng
        self.artifacts = artifacts
        self.port = http_port
        self.closed_port = closed_port
        self.www = www
        counter = next(a for a in artifacts if a.name == "counter")
        self.innocent_entry: dict[str, Any] = {
            "version": "1.0.0",
            "deploymentId": "innocent-1",
            "artifact": {
                "url": f"http://127.0.0.1:{http_port}/counter.wasm",
                "sha256": counter.sha,
                "size": len(counter.data),
                "kind": "wasm",
            },
            "triggers": [
                {"type": "command", "command": "counter.get"},
                {"type": "command", "command": "counter.reset"},
            ],
            "permissions": {"dataDir": True},
        }
        self.current_n = 0  # the number of the input being mutated (for its markers)
        self.desired_seeds = [self._seed_desired() for _ in range(160)]
        self.command_seeds = self._seed_commands()

    # -- seeds ---------------------------------------------------------------------------

    def _url(self, art: Artifact) -> tuple[str, str, str]:
        """(url, sha256, how) of one way to fetch ``art`` (or to fail to)."""
        rng, port = self.rng, self.port
        secret = f"{MARK}:{SECRET}@"
        query = f"?token={SECRET}&m={MARK}"
        fake = hashlib.sha256(str(rng.random()).encode()).hexdigest()
        how = rng.choice(
            ("http", "secret", "secret", "mqtt", "file", "missing", "mismatch", "refused", "tls")
        )
        if how == "http":
            return f"http://127.0.0.1:{port}/{art.name}", art.sha, how
        if how == "secret":
            return f"http://{secret}127.0.0.1:{port}/{art.name}{query}", art.sha, how
        if how == "mqtt":
            return f"mqtt:edge/artifacts/{art.sha}", art.sha, how
        if how == "file":
            return f"file://{self.www}/{art.name}", art.sha, how
        if how == "missing":
            return (
                f"http://{secret}127.0.0.1:{port}/missing-{rng.randint(0, 999)}{query}",
                fake,
                how,
            )
        if how == "mismatch":
            return f"http://{secret}127.0.0.1:{port}/{art.name}{query}", fake, how
        if how == "refused":
            return f"http://{secret}127.0.0.1:{self.closed_port}/x.wasm{query}", fake, how
        return f"https://{secret}127.0.0.1:{port}/{art.name}{query}", fake, how

    def _config(self) -> dict[str, Any]:
        rng = self.rng
        cfg: dict[str, Any] = {}
        for _ in range(rng.randint(0, 4)):
            cfg[rng.choice(("interval", "threshold", "name", "tags", "nested", "eea"))] = (
                rng.choice((10, 2.5, "text", ["a", 1], {"x": {"y": [1, 2]}}, None, True))
            )
        return cfg

    def _entry(self) -> dict[str, Any] | None:
        rng = self.rng
        r = rng.random()
        if r < 0.06:
            return None
        if r < 0.12:
            return rng.choice(({"version": ""}, {}, {"version": None, "deploymentId": "rm-1"}))
        art = rng.choice(self.artifacts)
        url, sha, _how = self._url(art)
        artifact: dict[str, Any] = {"url": url, "sha256": sha}
        if rng.random() < 0.5:
            artifact["size"] = len(art.data)
        if art.kind != "wasm" or rng.random() < 0.3:
            artifact["kind"] = art.kind
        entry: dict[str, Any] = {
            "version": rng.choice(("1.0.0", "1.1.0", "2.0.0", f"1.0.0-{MARK}")),
            "artifact": artifact,
        }
        if rng.random() < 0.7:
            entry["deploymentId"] = rng.choice(("dep-1", "dep-2", f"dep-{MARK}"))
        if rng.random() < 0.5:
            entry["config"] = self._config()
        if rng.random() < 0.6:
            entry["triggers"] = rng.sample(
                [
                    {"type": "startup"},
                    {"type": "interval", "name": "tick", "ms": rng.choice((1000, 2000, 5000))},
                    {"type": "command", "command": "counter.get"},
                    {"type": "command", "command": "fz.cmd"},
                    {"type": "mqtt", "topic": f"{BASE}/in/#"},
                    {"type": "mqtt", "topic": "fuzz/+/x", "qos": 0},
                ],
                rng.randint(1, 3),
            )
        if rng.random() < 0.5:
            entry["permissions"] = {
                k: v
                for k, v in (
                    ("dataDir", rng.random() < 0.7),
                    ("storageQuota", rng.choice((1024, 65536))),
                    ("publish", ["telemetry/#"]),
                    ("publishRate", 5),
                )
                if rng.random() < 0.6
            }
        if rng.random() < 0.4:
            entry["retries"] = rng.randint(0, 2)
        if rng.random() < 0.15:
            entry["deviceTypes"] = rng.choice((["rpi4"], ["other"], [], None))
        return entry

    def _seed_desired(self) -> dict[str, Any]:
        rng = self.rng
        flows: dict[str, Any] = {INNOCENT: copy.deepcopy(self.innocent_entry)}
        for fid in rng.sample(FUZZ_IDS, rng.randint(0, len(FUZZ_IDS))):
            flows[fid] = self._entry()
        doc: dict[str, Any] = {"generation": 0, "flows": flows}
        if rng.random() < 0.1:
            doc["comment"] = f"seed {MARK}"
        return doc

    def _seed_commands(self) -> list[dict[str, Any]]:
        return [
            {"name": "agent.ping"},
            {"name": "agent.report"},
            {"name": "agent.flows"},
            {"name": "agent.logs", "payload": {"flowId": INNOCENT}},
            {"name": "agent.logs", "payload": {"flowId": "fz-a", "lines": 5}},
            {"name": "agent.logs", "payload": {"flowId": "ghost", "lines": 500}},
            {"name": "agent.reconcile"},
            {"name": "agent.restart-flow", "payload": {"flowId": "fz-b"}},
            {"name": "agent.restart-flow", "payload": {"flowId": "ghost"}},
            {
                "name": "agent.direct-trigger",
                "payload": {"flowId": INNOCENT, "id": "t1", "payload": {"x": 1}},
            },
            {"name": "counter.get", "payload": {"why": "fuzz"}},
            {"name": "counter.reset"},
            {"name": "fz.cmd", "payload": [1, 2, {"a": None}]},
            {"name": "fz.custom", "payload": "text"},
            {"name": "fz.custom", "payload": {"k": "日本", "n": 1.5, "l": [True, None]}},
            {"name": "agent.nope"},
        ]

    def desired_seed(self, gen: int, n: int) -> dict[str, Any]:
        text = json.dumps(self.rng.choice(self.desired_seeds)).replace(MARK, f"fzn{n}")
        doc: dict[str, Any] = json.loads(text)
        doc["generation"] = gen
        return doc

    def command_seed(self, n: int) -> dict[str, Any]:
        doc = copy.deepcopy(self.rng.choice(self.command_seeds))
        doc["id"] = f"fzn{n}"
        r = self.rng.random()
        if r < 0.7:
            doc["time"] = int(time.time() * 1000)
        elif r < 0.85:
            doc["time"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        return doc

    # -- JSON-level mutations ----------------------------------------------------------

    def _special_url(self) -> str:
        rng, port = self.rng, self.port
        host = f"127.0.0.1:{port}"
        m = f"fzn{self.current_n}"
        return rng.choice(
            (
                f"http://{m}:{SECRET}@{host}/counter.wasm?token={SECRET}",
                f"http://{SECRET}@{host}/missing-{m}?token={SECRET}",
                f"http://{m}:{SECRET}@{host}/missing?x=1&token={SECRET}#frag",
                f"https://{m}:{SECRET}@10.255.255.1/x.wasm?token={SECRET}",
                f"http://{m}:{SECRET}@127.0.0.1:{self.closed_port}/x?token={SECRET}",
                f"http://{m}:{SECRET}@{host}:99999/x?token={SECRET}",
                f"http://{m}:{SECRET}@[::1/x?token={SECRET}",
                f"http://{m}:{SECRET}@/x?token={SECRET}",
                f"http://{m}:{SECRET}@localhost:{port}/%2e%2e/%2e%2e/etc/passwd?token={SECRET}",
                f"ftp://{m}:{SECRET}@{host}/x?token={SECRET}",
                f"HTTP://{m}:{SECRET}@{host}/x?token={SECRET}",
                f"file:///etc/passwd?token={SECRET}&m={m}",
                f"file://localhost/{self.www}/fz1?token={SECRET}&m={m}",
                "file:///dev/zero",
                "file:///proc/self/environ",
                "file://../../etc/passwd",
                "mqtt:",
                "mqtt:#",
                "mqtt:edge/+/x",
                f"mqtt:{BASE}/command",
                "mqtt:" + "t/" * 2000,
                "http://" + "a" * 2100,
                "",
                " ",
                "http://\u0000/",
                "http://\udfff/",
                f"http://{m}:{SECRET}@{host}/" + "%" * 50 + f"?token={SECRET}",
            )
        )

    def _gen_special(self, gen: int) -> Any:
        return self.rng.choice(
            (
                -1,
                -(2**63),
                1.5,
                Raw(f"{gen}.0"),
                Raw("1e3"),
                Raw(f"{gen}e0"),
                2**63,
                2**64,
                Raw("1" + "0" * 4299),
                Raw("1" + "0" * 4999),
                Raw("1" + "0" * 5000),
                str(gen),
                True,
                None,
                [],
                {},
                0,
                nan(self.rng),
                Raw("-0"),
                gen - 1,
                gen - GEN0 // 2,
                Raw(f"0{gen}"),
                Raw(f"+{gen}"),
                f" {gen}",
            )
        )

    def mutate_json(self, doc: Any, *, desired: bool) -> tuple[Any, list[str]]:
        rng = self.rng
        labels: list[str] = []

        def skip(path: tuple[Any, ...]) -> bool:
            return desired and len(path) >= 2 and path[0] == "flows" and path[1] == INNOCENT

        for _ in range(rng.choices((1, 2, 3), (6, 3, 1))[0]):
            ops = (
                ["gen", "flow-id", "url", "artifact", "manifest", "surrogate-config"]
                if desired
                else ["name", "id", "time", "payload"]
            )
            ops += [
                "replace",
                "delete",
                "add-key",
                "surrogate",
                "nan",
                "huge-int",
                "long-string",
                "deep",
                "dup-key",
                "whole",
            ]
            op = rng.choice(ops)
            label = self._mutate_once(doc, op, skip, desired)
            if label is None:
                continue
            if label.startswith("whole"):
                return self._whole(rng), [*labels, label]
            labels.append(label)
        return doc, labels or ["noop"]

    @staticmethod
    def _whole(rng: random.Random) -> Any:
        return rng.choice(
            (
                [],
                "text",
                1,
                None,
                True,
                Raw("NaN"),
                deep(rng),
                [{"generation": 1}],
                huge_int(rng),
                Raw('"\\udfff"'),
            )
        )

    def _mutate_once(
        self, doc: Any, op: str, skip: Callable[[tuple[Any, ...]], bool], desired: bool
    ) -> str | None:
        rng = self.rng
        if not isinstance(doc, dict):
            return None
        flows = doc.get("flows") if desired else None
        fuzz_entries = (
            [(k, v) for k, v in flows.items() if k != INNOCENT] if isinstance(flows, dict) else []
        )
        if op == "gen":
            gen = doc.get("generation")
            doc["generation"] = self._gen_special(gen if isinstance(gen, int) else GEN0)
            return "gen"
        if op == "flow-id" and isinstance(flows, dict):
            new_id = rng.choice((".", "..") if rng.random() < 0.4 else FLOW_ID_SPECIALS)
            if fuzz_entries and rng.random() < 0.5:
                old, entry = rng.choice(fuzz_entries)
                del flows[old]
            else:
                entry = json.loads(json.dumps(self._entry()).replace(MARK, f"fzn{self.current_n}"))
            if isinstance(entry, dict) and rng.random() < 0.7:
                entry.setdefault("permissions", {})
                if isinstance(entry["permissions"], dict):
                    entry["permissions"]["dataDir"] = True
                entry["triggers"] = [
                    {"type": "interval", "name": "tick", "ms": 100},
                    {"type": "command", "command": "counter.reset"},
                ]
            flows[new_id] = entry
            return "flow-id"
        if op == "url":
            arts = [
                v["artifact"]
                for _k, v in fuzz_entries
                if isinstance(v, dict) and isinstance(v.get("artifact"), dict)
            ]
            if not arts:
                return None
            rng.choice(arts)["url"] = self._special_url()
            return "url"
        if op == "artifact":
            arts = [
                v["artifact"]
                for _k, v in fuzz_entries
                if isinstance(v, dict) and isinstance(v.get("artifact"), dict)
            ]
            if not arts:
                return None
            art = rng.choice(arts)
            key = rng.choice(("sha256", "size", "kind", "signature"))
            art[key] = rng.choice(
                {
                    "sha256": (" " + "A" * 64 + " ", "0" * 63, "g" * 64, "", None, 5),
                    "size": (0, -1, 1, 2**63, 1.5, huge_int(rng), nan(rng), "10"),
                    "kind": ("eea", "bundle", "WASM", "", None, "wasm\u0000"),
                    "signature": ({"keyId": "0" * 16, "sig": "A" * 86 + "=="}, {}, "x", None),
                }[key]
            )
            return f"artifact.{key}"
        if op == "manifest":
            entries = [v for _k, v in fuzz_entries if isinstance(v, dict)]
            if not entries:
                return None
            entry = rng.choice(entries)
            if rng.random() < 0.5:
                entry["triggers"] = [
                    rng.choice(
                        (
                            {"type": "mqtt", "topic": "#"},
                            {"type": "mqtt", "topic": DESIRED},
                            {"type": "mqtt", "topic": "a/#/b"},
                            {"type": "mqtt", "topic": ""},
                            {"type": "interval", "ms": 0},
                            {"type": "interval", "ms": 10},
                            {"type": "interval", "ms": huge_int(rng)},
                            {"type": "cron"},
                            {"type": "command", "command": ""},
                            {"type": "command", "command": "x" * 300},
                            {"type": "startup", "name": "\udfff"},
                        )
                    )
                    for _ in range(rng.randint(1, 3))
                ]
                return "triggers"
            entry["permissions"] = rng.choice(
                (
                    {"publish": ["#"]},
                    {"publish": ["$SYS/#"]},
                    {"publish": ["/x"]},
                    {"publish": ["../../x"]},
                    {"storageQuota": 2**40},
                    {"storageQuota": -1},
                    {"dataDir": "yes"},
                    {"publishRate": nan(rng)},
                    {"publishRate": 0},
                    {"unknown": 1},
                    [],
                    None,
                )
            )
            return "permissions"
        if op == "surrogate-config":
            entries = [v for _k, v in fuzz_entries if isinstance(v, dict)]
            if not entries:
                return None
            entry = rng.choice(entries)
            cfg = entry.get("config")
            if not isinstance(cfg, dict):
                cfg = entry["config"] = {}
            sur = rng.choice(("\udfff", "\ud800", "a\udc00b", "\ud83d"))
            if rng.random() < 0.5:
                cfg["s"] = sur
            else:
                cfg[sur] = 1
            return "surrogate-config"
        if op == "name":
            doc["name"] = rng.choice(
                (
                    *WEIRD_STRINGS,
                    42,
                    None,
                    ["agent.ping"],
                    "agent." + "x" * 300,
                    "a" * 255,
                    "a" * 256,
                    huge_int(rng),
                    nan(rng),
                )
            )
            return "name"
        if op == "id":
            doc["id"] = rng.choice(
                (
                    5,
                    -1,
                    2**63,
                    2**64,
                    1.5,
                    None,
                    [doc.get("id")],
                    {"id": doc.get("id")},
                    "x" * 257,
                    "\udfff",
                    huge_int(rng),
                    nan(rng),
                )
            )
            return "id"
        if op == "time":
            doc["time"] = rng.choice(
                (
                    0,
                    -1,
                    1.5,
                    2**63,
                    10**20,
                    "",
                    "yesterday",
                    "1" * 30,
                    "2026-13-45T99:99:99Z",
                    "\udfff",
                    nan(rng),
                    huge_int(rng),
                    int(time.time() * 1000) - 10**6,
                    [1],
                    {"t": 1},
                    True,
                    "9" * 400,
                    "+" + "1" * 20,
                    "٣٣٣",
                )
            )
            return "time"
        if op == "payload":
            doc["payload"] = random_json(rng)
            return "payload"
        candidates = slots(doc, skip)
        if op == "replace" and candidates:
            container, key, path = rng.choice(candidates)
            if desired and path == ("generation",):  # 2**63-1 would leave no room
                return self._mutate_once(doc, "gen", skip, desired)
            container[key] = random_json(rng)
            return f"replace@{pathname(path)}"
        if op == "delete":
            ds = [(d, p) for d, p in dicts(doc, skip) if d]
            if not ds:
                return None
            d, path = rng.choice(ds)
            keys = [k for k in d if not skip((*path, k))]
            if not keys:
                return None
            del d[rng.choice(keys)]
            return f"delete@{pathname(path)}"
        if op == "add-key":
            d, path = rng.choice(dicts(doc, skip))
            d[rng.choice(("extra", "\udfff", "", "generation", "x" * 300))] = random_json(rng)
            return f"add-key@{pathname(path)}"
        if op in ("surrogate", "nan", "huge-int", "long-string", "deep") and candidates:
            container, key, path = rng.choice(candidates)
            container[key] = {
                "surrogate": lambda: rng.choice(("\udfff", "\ud800", "x\udc00y", "\ud83d\ud83d")),
                "nan": lambda: nan(rng),
                "huge-int": lambda: huge_int(rng),
                "long-string": lambda: long_string(rng),
                "deep": lambda: deep(rng),
            }[op]()
            return f"{op}@{pathname(path)}"
        if op == "dup-key":
            ds = [(d, p) for d, p in dicts(doc, skip) if d and p]
            if not ds:
                return None
            d, path = rng.choice(ds)
            container = _get(doc, path[:-1])
            pairs = list(d.items())
            k, v = rng.choice(pairs)
            pairs.append((k, random_json(rng) if rng.random() < 0.5 else v))
            container[path[-1]] = Dup(pairs)
            return f"dup-key@{pathname(path)}"
        if op == "whole" and rng.random() < 0.3:
            return "whole"
        return None


# --------------------------------------------------------------------------- processes


class AgentProc:
    """The agent as a subprocess; its stdout and stderr go to one log file."""

    def __init__(self, cmd: list[str], config: Path, log: Path, cwd: Path, src: str | None) -> None:
        self.cmd = [*cmd, "run", "--config", str(config)]
        self.log = log
        self.cwd = cwd
        self.env = os.environ.copy()
        if src:
            self.env["PYTHONPATH"] = os.pathsep.join(
                p for p in (src, self.env.get("PYTHONPATH", "")) if p
            )
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.epoch = 0
        self.log_start = 0

    def start(self) -> None:
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        self.started = time.monotonic()
        self.epoch += 1

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 20) -> list[str]:
        with self.log.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(self.log_start, size - 256 * 1024)
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.strip()][-lines:]


class LogScanner:
    """Reads the agent log incrementally and classifies lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.traceback: list[str] | None = None
        self.context = ""  # the plain line before a traceback ("Task exception was ...")
        self.lines = 0
        self.handled = 0  # "command handled" lines: one per response the agent made

    def read(self, flush: bool = False) -> list[tuple[str, str, str]]:
        """New (kind, signature, line) findings since the last call."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        data = self.partial + data
        chunks = data.split(b"\n")
        self.partial = b"" if flush else chunks.pop()
        out: list[tuple[str, str, str]] = []
        for raw in chunks:
            self.lines += 1
            out.extend(self._classify(raw.decode("utf-8", "replace").rstrip("\r")))
        if flush and self.traceback:
            out.append(("traceback", self.traceback[-1][:120], "\n".join(self.traceback)[-600:]))
            self.traceback = None
        return out

    def _classify(self, line: str) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
        if self.traceback is not None:  # inside a traceback Python printed (not a log line)
            if not line.strip() or line.startswith(
                (
                    " ",
                    "\t",
                    "|",
                    "+",
                    "Traceback",
                    "During handling",
                    "The above exception",
                    "Exception Group",
                )
            ):
                self.traceback.append(line)
                return out
            if not line.startswith("{"):
                self.traceback.append(line)  # its exception line
                out.append(self._end_traceback())
            else:
                out.append(self._end_traceback())
        doc: Any = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError, RecursionError):
                doc = json.loads(line)
        if isinstance(doc, dict):
            event = str(doc.get("event", ""))[:80]
            if event == "command handled":
                self.handled += 1
            exc = doc.get("exception")
            if exc or "Traceback" in line:
                excs = exception_lines(str(exc or line).splitlines())
                sig = f"{event}: {excs[-1][:100] if excs else '?'}"
                out.append(("traceback", sig, line))
            if "internal error" in line.lower():
                out.append(("internal_error", event, line))
            if SECRET in line:
                out.append(("leak", f"log: {event}", line))
            return out
        if "Traceback (most recent call last)" in line:
            self.traceback = [line]
        elif line.strip() and not out and not line.startswith("future:"):
            self.context = line.strip()
        if "internal error" in line.lower():
            out.append(("internal_error", "plain", line))
        if SECRET in line:
            out.append(("leak", "log: plain", line))
        return out

    def _end_traceback(self) -> tuple[str, str, str]:
        block = self.traceback or []
        self.traceback = None
        excs = exception_lines(block)
        last = excs[-1] if excs else (block[-1].strip() if block else "?")
        context = (
            f"{self.context[:60]}: "
            if self.context.startswith(("Task exception", "Exception in", "Unhandled", "Fatal"))
            else ""
        )
        self.context = ""
        return (
            "traceback",
            f"uncaught: {context}{last[:100]}",
            f"{context}{last}\n" + "\n".join(block)[-1500:],
        )


EXC_RE = re.compile(
    r"^[\s|+]*((?:[A-Za-z_][\w.]*)(?:Error|Exception|ExceptionGroup|Exit|Interrupt|Trap)\b.*)$"
)


def exception_type(log_line: str) -> str:
    """The (innermost) exception class named in a JSON log line, or ""."""
    doc: Any = None
    with contextlib.suppress(ValueError, RecursionError):
        doc = json.loads(log_line)
    text = str(doc.get("exception") or "") if isinstance(doc, dict) else log_line
    excs = exception_lines(text.splitlines())
    return excs[-1].split(":")[0].rsplit(".", 1)[-1] if excs else ""


def exception_lines(lines: list[str]) -> list[str]:
    """The "SomeError: message" lines of a traceback, outermost first."""
    return [m.group(1).strip() for m in map(EXC_RE.match, lines) if m]


class FsWatch:
    """Sentinels and a snapshot of the work dir, to detect writes outside a flow's own dir."""

    SKIP = frozenset({"broker", "evidence", "agent.log", "agent.toml", "findings.jsonl"})
    MANAGED_TOP = frozenset(
        {
            "state.json",
            "outbox.sqlite3",
            "outbox.sqlite3-wal",
            "outbox.sqlite3-shm",
            "outbox.sqlite3-journal",
            "artifacts",
            "cache",
            "flows",
        }
    )

    def __init__(self, work: Path, state: Path) -> None:
        self.work = work
        self.state = state
        self.sentinels: dict[str, tuple[str, int]] = {}
        self.own_ids: set[str] = set()
        self.baseline: dict[str, tuple[str, int, int, str | None]] = {}
        self.innocent_planted = False

    @property
    def innocent_data(self) -> Path:
        return self.state / "flows" / INNOCENT / "data"

    def _plant(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(f"sentinel {path.name} {os.urandom(8).hex()}\n".encode())
        st = path.stat()
        self.sentinels[self._rel(path)] = (_sha(path), st.st_mtime_ns)

    def plant(self) -> None:
        for path in (
            self.state / "SENTINEL",
            self.work / "outside-SENTINEL",
            self.work / "neighbour" / "SENTINEL",
            self.state / "artifacts" / "SENTINEL",
        ):
            self._plant(path)
        if self.innocent_data.is_dir():
            self._plant(self.innocent_data / "SENTINEL")
            self.innocent_planted = True
        else:
            self.sentinels.pop(self._rel(self.innocent_data / "SENTINEL"), None)
            self.innocent_planted = False

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.work).as_posix()

    def managed(self, rel: str) -> bool:
        """Whether the agent may legitimately create, change or remove ``rel``."""
        if rel in self.sentinels:
            return False
        parts = rel.split("/")
        if parts[0] != self.state.name or len(parts) == 1:
            return False
        inner = parts[1:]
        top = inner[0]
        if len(inner) == 1:
            return (
                top in self.MANAGED_TOP
                or bool(re.fullmatch(r"\..+\.[^/]*tmp", top))
                or top.startswith("state.json")
            )
        if top == "artifacts":
            return inner[1] in ("sha256", "partial", "tmp")
        if top == "cache":
            return True
        if top == "flows":
            fid = inner[1]
            if fid == INNOCENT:  # its data dir may come and go with it; not its content
                return len(inner) <= 3 or inner[2] != "data"
            return fid in self.own_ids
        return False

    def snapshot(self) -> dict[str, tuple[str, int, int, str | None]]:
        snap: dict[str, tuple[str, int, int, str | None]] = {}
        for dirpath, dirnames, filenames in os.walk(self.work):
            here = Path(dirpath)
            names = dirnames + filenames
            if here == self.work:
                dirnames[:] = [d for d in dirnames if d not in self.SKIP]
                names = [f for f in names if f not in self.SKIP]
            for name in names:
                path = here / name
                rel = self._rel(path)
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                kind = (
                    "dir"
                    if path.is_dir() and not path.is_symlink()
                    else ("link" if path.is_symlink() else "file")
                )
                digest = None
                if kind == "file" and not self.managed(rel):
                    with contextlib.suppress(OSError):
                        digest = _sha(path)
                snap[rel] = (
                    kind,
                    st.st_size if kind != "dir" else 0,
                    st.st_mtime_ns if kind != "dir" else 0,
                    digest,
                )
        return snap

    def rebaseline(self) -> None:
        self.plant()
        self.baseline = self.snapshot()

    def check(self, disturbed: Callable[[], bool]) -> list[tuple[str, str]]:
        """(signature, detail) of every escape since the last baseline; re-baselines.

        ``disturbed()`` says whether the innocent flow was removed (purged) since the last
        check, which excuses changes in its directory; it is asked again after a pause
        when only that directory changed (its "removed" event may still be on its way).
        """
        innocent_prefix = f"{self.state.name}/flows/{INNOCENT}/"
        innocent_disturbed = disturbed()
        found = self._diff(innocent_disturbed)
        if (
            found
            and not innocent_disturbed
            and all(d.startswith(innocent_prefix) for _s, d in found)
        ):
            time.sleep(1.0)
            if disturbed():
                innocent_disturbed = True
                found = []
        if (
            found
            or (not self.innocent_planted and self.innocent_data.is_dir())
            or innocent_disturbed
        ):
            self.rebaseline()
        else:
            self.baseline = self.snapshot()
        return found

    def _diff(self, innocent_disturbed: bool) -> list[tuple[str, str]]:
        now = self.snapshot()
        found: list[tuple[str, str]] = []
        innocent_prefix = f"{self.state.name}/flows/{INNOCENT}/"

        def excused(rel: str) -> bool:
            return self.managed(rel) or (innocent_disturbed and rel.startswith(innocent_prefix))

        for rel, (sha, mtime) in self.sentinels.items():
            cur = now.get(rel)
            if excused(rel) and rel.startswith(innocent_prefix):
                continue
            if cur is None:
                found.append((f"sentinel removed: {_generic(rel)}", rel))
            elif cur[3] != sha or cur[2] != mtime:
                found.append((f"sentinel modified: {_generic(rel)}", rel))
        for rel, before in self.baseline.items():
            if rel in self.sentinels or excused(rel):
                continue
            cur = now.get(rel)
            if cur is None:
                found.append((f"removed: {_generic(rel)}", rel))
            elif cur[0] == "file" and (cur[1], cur[2], cur[3]) != (before[1], before[2], before[3]):
                found.append((f"modified: {_generic(rel)}", rel))
        for rel, cur in now.items():
            if rel in self.baseline or excused(rel):
                continue
            found.append((f"new {cur[0]}: {_generic(rel)}", rel))
        return found


def _generic(rel: str) -> str:
    return re.sub(r"[0-9a-f]{16,}", "<hex>", rel)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- MQTT clients


class Watcher:
    """Subscribes to ``edge/#``: responses, state, events, and a SECRET scan of everything."""

    def __init__(self, port: int, client_id: str) -> None:
        self.lock = threading.Lock()
        self.barriers: dict[bytes, threading.Event] = {}
        self.responses: deque[tuple[str, bytes | None, bytes]] = deque()
        self.leaks: deque[tuple[str, bytes]] = deque()
        self.leaked_topics: set[str] = set()
        self.applied_gen: int | None = None
        self.gen_changed_at = time.monotonic()
        self.in_progress = 0
        self.innocent_removed_at = -1e9
        self.response_messages = 0
        self.messages = 0
        self.subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the watcher's subscription to edge/# was not acknowledged")

    def _on_connect(self, client: paho.Client, *_a: Any) -> None:
        client.subscribe("edge/#", qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        if topic in (DESIRED, COMMAND) or topic.startswith("edge/artifacts/"):
            return  # our own inputs
        payload = bytes(msg.payload)
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None)
        with self.lock:
            self.messages += 1
            if any(s in payload for s in SECRET_ENCODINGS):
                self.leaks.append((topic, payload))
                self.leaked_topics.add(topic)
            if topic in (RESPONSE, REPLIES):
                self.response_messages += 1
            if corr is not None and corr in self.barriers:
                self.barriers[corr].set()
                return
            if topic in (RESPONSE, REPLIES):
                self.responses.append((topic, corr, payload))
            elif topic == STATE:
                doc = lenient_load(payload)
                if isinstance(doc, dict):
                    gen = doc.get("generation")
                    if isinstance(gen, int) and gen != self.applied_gen:
                        self.applied_gen = gen
                        self.gen_changed_at = time.monotonic()
                    flows = doc.get("flows")
                    if isinstance(flows, dict):
                        self.in_progress = sum(
                            1
                            for f in flows.values()
                            if isinstance(f, dict) and f.get("status") in IN_PROGRESS
                        )
            elif topic == EVENTS:
                doc = lenient_load(payload)
                if (
                    isinstance(doc, dict)
                    and doc.get("flowId") == INNOCENT
                    and doc.get("status") == "removed"
                ):
                    self.innocent_removed_at = time.monotonic()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_sweep(port: int, seconds: float = 2.0) -> list[tuple[str, bytes]]:
    """Every retained message under edge/# (read by a fresh client)."""
    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            with lock:
                got.append((msg.topic, bytes(msg.payload)))

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"fuzz-sweep-{os.getpid()}", protocol=paho.MQTTv5
    )
    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe("edge/#", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(seconds)
    client.disconnect()
    client.loop_stop()
    with lock:
        return list(got)


# --------------------------------------------------------------------------- campaign


@dataclass
class Input:
    n: int
    kind: str  # "desired" | "command"
    label: str
    payload: bytes
    gen: int | None = None
    size: int = 0
    corr: bytes | None = None
    plain_id: str | None = None
    epoch: int = 0
    malformed: str | None = None
    sent_at: float = 0.0
    responses: list[Any] = field(default_factory=list)
    flow_ids: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        return f"{self.kind} {self.label.split(':')[0]}"

    def preview(self, limit: int = 200) -> str:
        text = self.payload.decode("utf-8", "backslashreplace")
        more = "…" if len(text) > limit else ""
        return (
            f"#{self.n} {self.kind} [{self.label[:60]}] ({self.size or len(self.payload)} B): "
            f"{text[:limit]!r}{more}"
        )


class Abort(Exception):
    """The campaign cannot go on (the agent cannot be kept running)."""


class Findings:
    """Counts, signatures and examples per kind; every finding also goes to a JSON-lines
    file (up to 1000 per kind) for a closer look."""

    def __init__(self) -> None:
        self.file: Any = None
        self.logged: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.sigs: dict[str, Counter[str]] = {k: Counter() for k, _ in FINDINGS}
        self.examples: dict[str, list[dict[str, str]]] = {k: [] for k, _ in FINDINGS}
        self.fallback: dict[str, list[dict[str, str]]] = {k: [] for k, _ in FINDINGS}

    def add(self, kind: str, sig: str, detail: str = "", inp: str = "") -> None:
        self.counts[kind] += 1
        self.sigs[kind][sig] += 1
        if self.file is not None and self.logged[kind] < 1000:
            self.logged[kind] += 1
            self.file.write(
                json.dumps({"kind": kind, "signature": sig, "input": inp, "detail": detail[:4000]})
                + "\n"
            )
            self.file.flush()

    def wants(self, kind: str, sig: str) -> bool:
        ex = self.examples[kind]
        if kind in ("crash", "escape"):  # rare and worth three attributed examples
            return len(ex) < 3
        return len(ex) < 3 and all(e["signature"] != sig for e in ex)

    def example(self, kind: str, sig: str, detail: str, inp: str) -> None:
        if self.wants(kind, sig):
            self.examples[kind].append({"signature": sig, "input": inp, "detail": detail[:600]})

    def remember(self, kind: str, sig: str, detail: str, inp: str) -> None:
        if len(self.fallback[kind]) < 6:
            self.fallback[kind].append({"signature": sig, "input": inp, "detail": detail[:600]})

    def final_examples(self, kind: str) -> list[dict[str, str]]:
        ex = list(self.examples[kind])
        for e in self.fallback[kind]:
            if len(ex) >= 3:
                break
            if all(x["signature"] != e["signature"] or x["detail"] != e["detail"] for x in ex):
                ex.append(e)
        return ex[:3]


class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.findings = Findings()
        self.sent: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.n = 0
        self.next_gen = GEN0
        self.pending: dict[bytes, Input] = {}  # correlation data -> command
        self.plain: dict[str, Input] = {}  # id -> command sent without a response topic
        self.crashed_epochs: set[int] = set()
        self.recent: dict[int, str] = {}
        self.recent_order: deque[int] = deque()
        self.infos: list[paho.MQTTMessageInfo] = []
        self.barrier_n = 0
        self.restarts = 0
        self.consecutive_loops = 0
        self.state_resets = 0
        self.gen_resets = 0
        self.resets_total = 0
        self.inputs_since_start = 0
        self.killed_hung = False
        self.commands_published = 0
        self.replay_answers: set[bytes] = set()
        self.retained_clears = 0
        self.replays = 0
        self.replay_inputs = 0
        self.replay_started = 0.0
        self.replay_budget = 0.0
        self.lost_in_crash = 0
        self.excused_duplicates = 0
        self.innocent_checked = 0.0
        self.resets_seen = 0
        self.no_replay = False
        self.t0 = time.monotonic()
        self.elapsed = 0.0
        self.elapsed_sending = 0.0
        self.skipped_secret = 0
        self.stopped_early = ""
        self.answered = 0

    # -- set-up --------------------------------------------------------------------------

    def setup(self, stack: contextlib.ExitStack) -> None:
        tests = str(ROOT / "tests" / "support")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        import wat
        from artifact_server import ArtifactServer
        from broker import Broker, free_port

        self.work = Path(tempfile.mkdtemp(prefix="edge-fuzz-"))
        self.state_dir = self.work / "state"
        self.www = self.work / "www"
        self.www.mkdir()
        self.broker = Broker(self.work / "broker")
        self.broker.start()
        stack.callback(self.broker.stop)
        self.server = ArtifactServer().start()
        stack.callback(self.server.stop)
        examples = ROOT / "examples" / "flows"
        artifacts = [Artifact("counter", (examples / "counter" / "counter.wasm").read_bytes())]
        artifacts += [Artifact(f"fz{i}", wat.reactor(f"fuzz{i}")) for i in range(6)]
        artifacts += [
            Artifact("trap", wat.trap_on_start()),
            Artifact("exit0", wat.command(0)),
            Artifact("exit3", wat.command(3)),
            Artifact("spin", wat.spin_on_start()),
            Artifact("greenhouse", (examples / "greenhouse.tar.gz").read_bytes(), "bundle"),
        ]
        for art in artifacts:
            self.server.add(f"/{art.name}", art.data)
            self.server.add(f"/{art.name}.wasm", art.data)
            (self.www / art.name).write_bytes(art.data)
        self.server.add("/counter.wasm", artifacts[0].data)
        self.corpus = Corpus(self.rng, artifacts, self.server.port, free_port(), self.www)

        self.watcher = Watcher(self.broker.port, f"fuzz-watch-{os.getpid()}")
        stack.callback(self.watcher.close)
        self.pub = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fuzz-op-{os.getpid()}", protocol=paho.MQTTv5
        )
        self.pub.max_queued_messages_set(0)
        self.pub.connect("127.0.0.1", self.broker.port)
        self.pub.loop_start()
        stack.callback(self.pub.loop_stop)
        stack.callback(self.pub.disconnect)
        for art in artifacts:
            self.pub.publish(
                f"edge/artifacts/{art.sha}", art.data, qos=1, retain=True
            ).wait_for_publish(10)

        self.config = self.work / "agent.toml"
        self.config.write_text(
            f'device_id = "{DEVICE}"\ndevice_type = "rpi4"\nstate_dir = "{self.state_dir}"\n'
            f'[mqtt]\nbroker = "{self.broker.url}"\nreconnect_min = 0.05\nreconnect_max = 0.5\n'
            "keepalive = 5\n"
            "[artifacts]\nretries = 1\nbackoff_initial = 0.05\nbackoff_max = 0.2\n"
            "connect_timeout = 1.0\nstall_timeout = 2.0\nread_timeout = 2.0\nmin_free_space = 0\n"
            "[sandbox]\ncall_deadline_ms = 1000\n"
            "[reconcile]\nretry_backoff_initial = 0.2\nretry_backoff_max = 1.0\n"
            "state_coalesce_ms = 20\n"
            '[log]\nformat = "json"\nlevel = "info"\n'
        )
        self.findings.file = stack.enter_context((self.work / "findings.jsonl").open("w"))
        self.fs = FsWatch(self.work, self.state_dir)
        self.fs.plant()
        exe = ROOT / ".venv" / "bin" / "edge-agent"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent"]
        self.agent = AgentProc(
            cmd, self.config, self.work / "agent.log", self.work, self.args.agent_src
        )
        self.logs = LogScanner(self.work / "agent.log")
        self.start_agent()
        stack.callback(self.agent.kill)
        if self.barrier(timeout=60) != "ok":
            raise Abort(
                "the agent did not answer agent.ping after starting:\n"
                + "\n".join(self.agent.tail())
            )
        self.deploy_innocent()
        self.fs.own_ids.update(FUZZ_IDS)
        self.fs.rebaseline()
        for kind, sig, line in self.logs.read():
            self.findings.add(kind, sig, line, "(during start-up)")
            self.findings.remember(kind, sig, line, "(during start-up)")

    def deploy_innocent(self, timeout: float = 30.0) -> None:
        """Deploy the innocent flow alone and wait for its data dir."""
        gen = self.take_gen()
        doc = {"generation": gen, "flows": {INNOCENT: self.corpus.innocent_entry}}
        self.publish(DESIRED, encode(dumps(doc)), retain=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fs.innocent_data.is_dir():
                return
            if self.agent.poll() is not None:
                return
            time.sleep(0.05)
        print(
            "warning: the innocent flow did not come up; its data dir is not watched",
            file=sys.stderr,
        )

    # -- sending -------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        corr: bytes | None = None,
        response_topic: str | None = None,
    ) -> None:
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            if corr is not None:
                props.CorrelationData = corr
        if topic == COMMAND:
            self.commands_published += 1
        self.infos.append(self.pub.publish(topic, payload, qos=1, retain=retain, properties=props))

    def take_gen(self) -> int:
        applied = self.watcher.applied_gen
        gen = max(self.next_gen, (applied + 1) if applied is not None else 0)
        self.next_gen = gen + 1
        return gen

    def remember_input(self, inp: Input) -> None:
        self.recent[inp.n] = inp.preview()
        self.recent_order.append(inp.n)
        while len(self.recent_order) > 50_000:
            self.recent.pop(self.recent_order.popleft(), None)

    def make_desired(self) -> Input:
        rng, corpus = self.rng, self.corpus
        for _attempt in range(50):
            self.n += 1
            corpus.current_n = self.n
            gen = self.take_gen()
            doc: Any = corpus.desired_seed(gen, self.n)
            r = rng.random()
            style = {"compact": rng.random() < 0.7, "ascii_only": rng.random() < 0.7}
            if r < 0.15:
                label = "valid"
                payload = encode(dumps(doc, **style))
            elif r < 0.65:
                doc, ops = corpus.mutate_json(doc, desired=True)
                label = "json:" + "+".join(ops)
                payload = encode(dumps(doc, **style))
            else:
                ops = []
                if rng.random() < 0.3:
                    doc, ops = corpus.mutate_json(doc, desired=True)
                payload, op = byte_mutate(rng, encode(dumps(doc, **style)))
                label = "bytes:" + "+".join([op, *ops])
            if secret_placement_ok(payload):
                break
            self.skipped_secret += 1
        parsed = lenient_load(payload)
        ids: tuple[str, ...] = ()
        if isinstance(parsed, dict) and isinstance(parsed.get("flows"), dict):
            ids = tuple(str(k) for k in parsed["flows"])
            self.fs.own_ids.update(
                k
                for k in ids
                if k not in (".", "..", "", INNOCENT) and "/" not in k and "\x00" not in k
            )
        return Input(
            self.n,
            "desired",
            label,
            payload,
            gen=gen,
            epoch=self.agent.epoch,
            size=len(payload),
            flow_ids=ids,
        )

    def make_command(self) -> Input:
        rng, corpus = self.rng, self.corpus
        self.n += 1
        corpus.current_n = self.n
        doc: Any = corpus.command_seed(self.n)
        r = rng.random()
        style = {"compact": rng.random() < 0.7, "ascii_only": rng.random() < 0.7}
        if r < 0.2:
            label = "valid"
            payload = encode(dumps(doc, **style))
        elif r < 0.65:
            doc, ops = corpus.mutate_json(doc, desired=False)
            label = "json:" + "+".join(ops)
            payload = encode(dumps(doc, **style))
        else:
            ops = []
            if rng.random() < 0.3:
                doc, ops = corpus.mutate_json(doc, desired=False)
            payload, op = byte_mutate(rng, encode(dumps(doc, **style)))
            label = "bytes:" + "+".join([op, *ops])
        inp = Input(
            self.n,
            "command",
            label,
            payload,
            epoch=self.agent.epoch,
            size=len(payload),
            malformed=strict_object_problem(payload),
        )
        # Without a response topic a response can only be matched by its id, which the
        # agent echoes only from a request it accepts as JSON: only unmutated commands
        # go without one (the others carry correlation data).
        if label == "valid" and rng.random() < 0.5:
            inp.plain_id = f"fzn{self.n}"
        else:
            inp.corr = f"C{self.n}".encode()
        return inp

    def send(self, inp: Input) -> None:
        inp.sent_at = time.time()
        self.inputs_since_start += 1
        self.sent[inp.family] += 1
        for op in re.split(r"[:+]", inp.label)[1:] or [inp.label]:
            self.ops[f"{inp.kind} {op.split('@')[0]}"] += 1
        self.remember_input(inp)
        if inp.kind == "desired":
            self.publish(DESIRED, inp.payload, retain=True)
        elif inp.plain_id is not None:
            self.plain[inp.plain_id] = inp
            self.publish(COMMAND, inp.payload)
        else:
            assert inp.corr is not None
            self.pending[inp.corr] = inp
            self.publish(
                COMMAND,
                inp.payload,
                corr=inp.corr,
                response_topic=RESPONSE if inp.n % 2 else REPLIES,
            )

    # -- barriers, crashes ---------------------------------------------------------------

    def flush_publishes(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(left)
        self.infos.clear()

    def barrier(self, timeout: float = BARRIER_TIMEOUT) -> str:
        """Ping the agent and wait for the answer: "ok", "crashed" or "stalled"."""
        self.flush_publishes()
        event = threading.Event()
        corrs: list[bytes] = []

        def ping() -> None:
            # sent again every 5 s: a ping published before the agent subscribed is lost
            self.barrier_n += 1
            corr = f"B{self.barrier_n}".encode()
            corrs.append(corr)
            with self.watcher.lock:
                self.watcher.barriers[corr] = event
            doc = {"name": "agent.ping", "id": f"barrier-{self.barrier_n}"}
            self.publish(COMMAND, encode(json.dumps(doc)), corr=corr, response_topic=REPLIES)

        ping()
        start = last = time.monotonic()
        stalled = False
        try:
            while not event.wait(0.02):
                if self.agent.poll() is not None:
                    return "crashed"
                now = time.monotonic()
                if now - last > 5.0:
                    last = now
                    ping()
                if now - start > timeout:
                    stalled = True
                if now - start > HANG_TIMEOUT:
                    self.agent.kill()
                    self.killed_hung = True
                    return "stalled"
            return "stalled" if stalled else "ok"
        finally:
            with self.watcher.lock:
                for corr in corrs:
                    self.watcher.barriers.pop(corr, None)

    def handle_exit(self, replay: bool, batch: list[Input]) -> list[tuple[str, str, str]]:
        """The agent exited: record it, restart it (escalating on a crash loop)."""
        out: list[tuple[str, str, str]] = []
        while True:
            code = self.agent.poll()
            if code is None:
                return out
            uptime = time.monotonic() - self.agent.started
            self.crashed_epochs.add(self.agent.epoch)
            time.sleep(0.05)
            for kind, sig, line in self.logs.read(flush=True):
                out.append((kind, sig, line))
            tail = self.agent.tail(12)
            exc_lines = exception_lines(tail)
            sig = f"exit {code}" + (f": {exc_lines[-1][:100]}" if exc_lines else "")
            detail = (
                f"exit code {code} after {uptime:.1f} s"
                + (f": {exc_lines[-1][:300]}" if exc_lines else "")
                + "; last log lines:\n"
                + "\n".join(t[:300] for t in tail)
            )
            if self.killed_hung:  # not a crash: the harness killed it after a hang
                self.killed_hung = False
                out.append(("stall", "hung: killed after 120 s without answering a ping", detail))
            else:
                out.append(("crash", sig, detail))
            # a loop: it exits soon after a restart with no new input since (so what it
            # read at start-up, the retained desired document or its own state, did it)
            loop = uptime < CRASH_LOOP_S and self.inputs_since_start == 0
            if loop:
                self.consecutive_loops += 1
                out.append(("crash_loop", sig, detail))
                last_desired = next((i for i in reversed(batch) if i.kind == "desired"), None)
                if last_desired is not None and not replay:
                    self.findings.example(
                        "crash_loop",
                        sig,
                        detail,
                        "retained desired document at the time: " + last_desired.preview(),
                    )
            else:
                self.consecutive_loops = 0
            if self.consecutive_loops == 1:
                self.publish(DESIRED, b"", retain=True)  # clear the retained document
                self.flush_publishes()
                self.retained_clears += 1
            elif self.consecutive_loops == 2:
                self.reset_state_dir()
            elif self.consecutive_loops >= 3:
                raise Abort("the agent crash-loops even with a fresh state directory:\n" + detail)
            self.restarts += 1
            self.start_agent()
            status = self.barrier(timeout=60)
            if status == "ok":
                if self.consecutive_loops >= 2 or not self.fs.innocent_data.is_dir():
                    self.deploy_innocent(timeout=15)
                return out

    def start_agent(self) -> None:
        self.agent.start()
        self.inputs_since_start = 0

    def reset_state_dir(self, why: str = "crash") -> None:
        if why == "crash":
            self.state_resets += 1
        self.resets_total += 1
        evidence = self.work / "evidence" / f"state-{self.resets_total}-{why}"
        evidence.parent.mkdir(parents=True, exist_ok=True)
        if self.state_dir.exists():
            shutil.move(str(self.state_dir), str(evidence))
        self.state_dir.mkdir()
        self.fs.sentinels.clear()
        self.fs.rebaseline()
        with self.watcher.lock:
            self.watcher.applied_gen = None
        self.next_gen = GEN0  # a fresh state accepts any generation

    # -- collecting findings -----------------------------------------------------------

    def collect(self) -> list[tuple[str, str, str]]:
        """Findings since the last call: logs, the file system, leaks on the broker."""
        found = self.logs.read()
        with self.watcher.lock:
            leaks = list(self.watcher.leaks)
            self.watcher.leaks.clear()
        for topic, payload in leaks:
            where = re.sub(r"/deployments/[^/]+/log$", "/deployments/+/log", topic)
            text = payload.decode("utf-8", "replace")
            i = text.find(SECRET)
            snippet = text[max(0, i - 250) : i + 250] if i >= 0 else text[:500]
            found.append(("leak", f"broker: {where}", f"{topic}: {snippet}"))
        for sig, rel in self.fs.check(self.innocent_disturbed):
            found.append(("escape", sig, rel))
        return found

    def innocent_disturbed(self) -> bool:
        """Whether the innocent flow was removed (purged) lately, or the state dir reset."""
        with self.watcher.lock:
            removed_at = self.watcher.innocent_removed_at
        now = time.monotonic()
        recent = removed_at > min(self.innocent_checked, now - 5.0)
        reset = self.resets_total != self.resets_seen
        self.resets_seen = self.resets_total
        self.innocent_checked = now
        return recent or reset

    def drain_responses(self) -> None:
        with self.watcher.lock:
            items = list(self.watcher.responses)
            self.watcher.responses.clear()
        for topic, corr, payload in items:
            doc = lenient_load(payload)
            if corr is not None and corr.startswith(b"R"):
                self.replay_answers.add(corr)
                continue
            if not isinstance(doc, dict):
                self.findings.add("bad_response", topic, repr(payload[:1000]))
                self.findings.example(
                    "bad_response", topic, payload[:300].decode("utf-8", "replace"), "?"
                )
                continue
            if corr is not None and corr.startswith(b"B"):
                continue  # an earlier barrier's (a ping sent again)
            rid = doc.get("id")
            inp = None
            if corr is not None:
                inp = self.pending.get(corr)
            elif isinstance(rid, str):
                inp = self.plain.get(rid)
            # an unmutated command's response must carry its own id (and, if it was sent
            # with a response topic, its own correlation data)
            mine = inp is not None and (inp.label != "valid" or rid == f"fzn{inp.n}")
            if not mine:
                m = MARKER_RE.fullmatch(rid) if isinstance(rid, str) else None
                owner = None
                if m is not None:
                    owner = self.plain.get(rid) or self.pending.get(f"C{m.group(1)}".encode())
                how = (
                    "no correlation data"
                    if corr is None
                    else f"correlation data {corr[:20]!r} of another command"
                    if inp is not None
                    else f"unknown correlation data {corr[:20]!r}"
                )
                sig = f"response on {topic.rsplit('/', 1)[-1]} with {how.partition(' of ')[0]}"
                detail = f"{how}: {payload[:500].decode('utf-8', 'replace')}"
                where = owner.preview() if owner is not None else "?"
                self.findings.add("stray_response", sig, detail, where)
                self.findings.example("stray_response", sig, detail, where)
                if owner is None:
                    continue
                inp = owner
            inp.responses.append(doc)
            self.check_response(inp, doc)

    def check_response(self, inp: Input, doc: dict[str, Any]) -> None:
        if len(inp.responses) == 1:
            self.answered += 1
        if len(inp.responses) == 2:
            if inp.epoch in self.crashed_epochs:
                self.excused_duplicates += 1
            else:
                self.findings.add(
                    "duplicate", inp.label.split(":")[0], json.dumps(inp.responses), inp.preview()
                )
                self.findings.example(
                    "duplicate",
                    inp.label.split(":")[0],
                    json.dumps(inp.responses)[:600],
                    inp.preview(),
                )
        if len(inp.responses) > 1:
            return
        error = doc.get("error")
        refused = (
            doc.get("ok") is False and isinstance(error, str) and error.startswith("malformed")
        )
        if inp.malformed is not None and not refused:
            answer = (
                "ok: true"
                if doc.get("ok") is True
                else re.sub(r"'[^']*'|\d+", "…", str(error))[:40]
            )
            sig = f"{inp.malformed} -> {answer}"
            self.findings.add("not_malformed", sig, json.dumps(doc), inp.preview())
            self.findings.example("not_malformed", sig, json.dumps(doc)[:600], inp.preview())
        if isinstance(error, str) and "internal error" in error:
            self.findings.remember(
                "internal_error", "response", json.dumps(doc)[:600], inp.preview()
            )

    def attribute(
        self, kind: str, sig: str, detail: str, batch: list[Input], window: list[Input]
    ) -> str:
        """The input behind a finding, as text for the example."""
        marked = self.marked_input(detail)
        if marked is not None:
            return marked
        if kind in ("traceback", "internal_error") and "command" in detail:
            exc = exception_type(detail)
            for inp in batch:
                if inp.kind == "command" and inp.responses:
                    err = str(inp.responses[0].get("error", ""))
                    if "internal error" in err and exc in err:
                        return inp.preview() + "  (its response says internal error)"
        if kind == "escape":

            def odd_ids(i: Input) -> list[str]:
                return [f for f in i.flow_ids if f in (".", "..", "") or "/" in f]

            odd = [i for i in window if i.kind == "desired" and odd_ids(i)]
            if odd:
                return (
                    odd[-1].preview() + f"  (flow ids {odd_ids(odd[-1])}; the latest of "
                    f"{len(odd)} recent documents with a '.', '..', '' or '/' flow id)"
                )
        candidates = batch
        if "command" in detail and "desired" not in detail:
            candidates = [i for i in batch if i.kind == "command"] or batch
        elif any(w in detail for w in ("desired", "reconcile", "flow_id")):
            candidates = [i for i in batch if i.kind == "desired"] or batch
        replayable = kind in (
            "crash",
            "traceback",
            "internal_error",
            "leak",
            "escape",
        ) and not sig.startswith("uncaught")
        if replayable and candidates:
            found = self.replay(kind, sig, candidates)
            if found is not None:
                return found
        last = batch[-1].preview() if batch else "?"
        return f"(not attributed; {len(batch)} inputs in the batch, the last) {last}"

    def replay(self, kind: str, sig: str, candidates: list[Input]) -> str | None:
        """Send the candidates again one at a time until the finding recurs."""
        if self.no_replay or time.monotonic() - self.replay_started > self.replay_budget:
            return None
        self.replays += 1
        settle = 1.0 if kind in ("leak", "escape") else 0.0
        for idx, inp in enumerate(candidates):
            self.replay_inputs += 1
            self.inputs_since_start += 1
            payload = inp.payload
            if inp.kind == "desired":
                if inp.gen is not None:
                    new = self.take_gen()
                    for enc in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"):
                        old = str(inp.gen).encode(enc)
                        if old in payload:
                            payload = payload.replace(old, str(new).encode(enc), 1)
                            break
                self.publish(DESIRED, payload, retain=True)
            else:
                self.publish(COMMAND, payload, corr=f"R{inp.n}".encode(), response_topic=REPLIES)
            status = self.barrier()
            if inp.kind == "command" and status == "ok":
                self.wait_answers(lambda i=inp: f"R{i.n}".encode() in self.replay_answers)
            if settle:
                time.sleep(settle)
            found: list[tuple[str, str, str]] = []
            if status == "crashed":
                found = self.handle_exit(replay=True, batch=[inp])
                for k, s, d in found:  # a crash is a crash, replay or not
                    if k in ("crash", "crash_loop"):
                        where = inp.preview() + "  (crashed the agent when replayed)"
                        self.findings.add(k, s, d, where)
                        self.findings.example(k, s, d, where)
            found += self.collect()
            if any(k == kind and (s == sig or k == "crash") for k, s, _d in found):
                return (
                    inp.preview() + f"  (reproduced by replaying it, after {idx} earlier input(s) "
                    "of its batch)"
                )
        return None

    # -- the campaign --------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        todo = {"desired": args.desired, "command": args.commands}
        total = args.desired + args.commands
        self.t0 = time.monotonic()
        self.replay_started = self.t0
        self.replay_budget = args.time_limit * 0.25
        window: deque[Input] = deque(maxlen=2 * args.batch)
        next_progress = args.progress
        batches = 0
        while todo["desired"] + todo["command"] > 0:
            if time.monotonic() - self.t0 > args.time_limit:
                self.stopped_early = f"time limit of {args.time_limit:.0f} s reached"
                break
            batch: list[Input] = []
            for _ in range(args.batch):
                left = todo["desired"] + todo["command"]
                if not left:
                    break
                kind = "desired" if self.rng.random() * left < todo["desired"] else "command"
                todo[kind] -= 1
                inp = self.make_desired() if kind == "desired" else self.make_command()
                self.send(inp)
                batch.append(inp)
            window.extend(batch)
            batches += 1
            self.after_batch(batch, list(window), settle=batches % args.settle_every == 0)
            done = total - todo["desired"] - todo["command"]
            if done >= next_progress:
                next_progress += args.progress
                self.progress(done, total)
        self.finish(list(window))

    def wait_answers(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        """Commands run concurrently: the barrier's answer can overtake theirs."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain_responses()
            if done() or time.monotonic() > deadline or self.agent.poll() is not None:
                return
            time.sleep(0.01)

    def after_batch(self, batch: list[Input], window: list[Input], settle: bool) -> None:
        status = self.barrier()
        if status == "ok":
            commands = [i for i in batch if i.kind == "command"]
            self.wait_answers(lambda: all(i.responses for i in commands))
        found: list[tuple[str, str, str]] = []
        if status == "stalled" and self.agent.poll() is None:  # (killed: handle_exit says)
            sig = f"agent.ping answered only after more than {BARRIER_TIMEOUT:.0f} s"
            where = batch[-1].preview() if batch else "?"
            self.findings.add("stall", sig, "\n".join(self.agent.tail(8)), where)
            self.findings.remember("stall", sig, "\n".join(self.agent.tail(8)), where)
        if self.agent.poll() is not None:
            found += self.handle_exit(replay=False, batch=batch)
        elif settle:
            self.settle()
            self.check_generation()
        self.drain_responses()
        found += self.collect()
        self.record(found, batch, window)
        for inp in batch:  # commands are kept until the end (for their responses): keep
            if inp.kind == "command" and inp.responses:  # the answered ones small
                inp.payload = inp.payload[:1024]

    def check_generation(self) -> None:
        """A generation pushed (by a mutation) to the very top of the agent's range leaves
        no room for valid documents: start over with a fresh state directory."""
        applied = self.watcher.applied_gen
        stuck_for = time.monotonic() - self.watcher.gen_changed_at
        if applied is None or applied < 2**62 or stuck_for < 10:
            return
        self.gen_resets += 1
        self.agent.stop()
        self.reset_state_dir("generation")
        self.start_agent()
        if self.barrier(timeout=60) == "ok":
            self.deploy_innocent(timeout=15)
        self.fs.rebaseline()

    def settle(self, timeout: float = 3.0) -> None:
        """Give downloads, installs and retries time to happen (and to show findings)."""
        deadline = time.monotonic() + timeout
        time.sleep(0.2)
        while time.monotonic() < deadline and self.watcher.in_progress:
            time.sleep(0.05)

    def record(
        self, found: list[tuple[str, str, str]], batch: list[Input], window: list[Input]
    ) -> None:
        for kind, sig, detail in found:
            if self.findings.wants(kind, sig) and kind != "crash_loop":
                inp = self.attribute(kind, sig, detail, batch, window)
                self.findings.example(kind, sig, detail, inp)
            else:
                inp = self.marked_input(detail) or (
                    f"(one of #{batch[0].n}..#{batch[-1].n})" if batch else "?"
                )
                self.findings.remember(kind, sig, detail, inp)
            self.findings.add(kind, sig, detail, inp)

    def marked_input(self, detail: str) -> str | None:
        for m in MARKER_RE.finditer(detail):
            n = int(m.group(1))
            if n in self.recent:
                return self.recent[n] + "  (by its fznN marker)"
        return None

    def progress(self, done: int, total: int) -> None:
        elapsed = time.monotonic() - self.t0
        c = self.findings.counts
        print(
            f"[{elapsed:7.1f} s] {done}/{total} inputs, {done / elapsed:.0f}/s; "
            f"crashes {c['crash']}, tracebacks {c['traceback']}, "
            f"internal errors {c['internal_error']}, escapes {c['escape']}, "
            f"leaks {c['leak']}, not-malformed {c['not_malformed']}",
            file=sys.stderr,
            flush=True,
        )

    def finish(self, window: list[Input]) -> None:
        """Wait for outstanding responses, then the last checks."""
        self.elapsed_sending = time.monotonic() - self.t0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                self.record(
                    self.handle_exit(replay=False, batch=window[-self.args.batch :]), window, window
                )
            self.drain_responses()
            waiting = [i for i in (*self.pending.values(), *self.plain.values()) if not i.responses]
            if not waiting:
                break
            time.sleep(0.2)
        self.settle(timeout=5)
        self.barrier()
        self.drain_responses()
        self.record(self.collect(), window, window)
        resent = 0
        for inp in (*self.pending.values(), *self.plain.values()):
            if inp.responses:
                continue
            if inp.epoch in self.crashed_epochs:
                self.lost_in_crash += 1
                continue
            sig = inp.label.split(":")[0] + (f" ({inp.malformed})" if inp.malformed else "")
            sent = time.strftime("%H:%M:%S", time.gmtime(inp.sent_at))
            how = f"to {'/command/response' if inp.corr is None or inp.n % 2 else REPLIES}" + (
                f" with correlation data {inp.corr!r}" if inp.corr else " (matched by id)"
            )
            detail = f"no response (sent at {sent} UTC, answer expected {how})"
            if self.findings.wants("unanswered", sig) and resent < 3:
                resent += 1
                detail += "; " + self.resend(inp)
            self.findings.add("unanswered", sig, detail, inp.preview())
            self.findings.example("unanswered", sig, detail, inp.preview())
        self.no_replay = True
        code = self.agent.stop()
        self.record(self.logs.read(flush=True), window, window)
        if code not in (0, None):
            sig = f"exit {code} on SIGTERM"
            self.findings.add("crash", sig, "\n".join(self.agent.tail(12)), "(SIGTERM)")
            self.findings.example(
                "crash", sig, "\n".join(self.agent.tail(12)), "(SIGTERM at the end)"
            )
        for topic, payload in retained_sweep(self.broker.port):
            if topic in (DESIRED, COMMAND) or topic.startswith("edge/artifacts/"):
                continue
            leaked = any(s in payload for s in SECRET_ENCODINGS)
            if leaked and topic not in self.watcher.leaked_topics:
                text = payload.decode("utf-8", "replace")
                inp = self.attribute("leak", "retained", text, [], [])
                self.findings.add("leak", "retained", f"{topic}: {text}", inp)
                self.findings.example("leak", "retained", f"{topic}: {text[:400]}", inp)
        self.elapsed = time.monotonic() - self.t0

    # -- report --------------------------------------------------------------------------

    def resend(self, inp: Input) -> str:
        """Send an unanswered command once more: is it the input, or was it lost?"""
        if len(inp.payload) < inp.size:
            return "not sent again (its payload was not kept)"
        corr = f"R{inp.n}-again".encode()
        self.publish(COMMAND, inp.payload, corr=corr, response_topic=REPLIES)
        self.flush_publishes()
        self.wait_answers(lambda: corr in self.replay_answers, timeout=10)
        if corr in self.replay_answers:
            return "sent again at the end, it was answered (lost the first time)"
        return "sent again at the end, no response either"

    def summary(self) -> dict[str, Any]:
        total = sum(self.sent.values())
        return {
            "seed": self.args.seed,
            "agent": self.args.agent_src or str(ROOT),
            "work_dir": str(getattr(self, "work", "")),
            "stopped_early": self.stopped_early or None,
            "inputs": dict(sorted(self.sent.items())),
            "inputs_total": total,
            "barriers": self.barrier_n,
            "elapsed_s": round(self.elapsed, 1),
            "inputs_per_s": round(total / self.elapsed_sending, 1) if self.elapsed_sending else 0,
            "restarts": self.restarts,
            "retained_desired_cleared": self.retained_clears,
            "state_dir_resets": self.state_resets,
            "generation_exhausted_resets": self.gen_resets,
            "commands_answered": self.answered,
            "commands_lost_in_crash": self.lost_in_crash,
            "duplicates_after_crash": self.excused_duplicates,
            "inputs_regenerated_for_secret_placement": self.skipped_secret,
            "replays": {"searches": self.replays, "inputs": self.replay_inputs},
            "log_lines": self.logs.lines if hasattr(self, "logs") else 0,
            "command_accounting": {
                "published": self.commands_published,
                "agent_logged_handled": self.logs.handled if hasattr(self, "logs") else 0,
                "responses_received": (
                    self.watcher.response_messages if hasattr(self, "watcher") else 0
                ),
            },
            "broker_messages_seen": self.watcher.messages if hasattr(self, "watcher") else 0,
            "findings": {k: self.findings.counts[k] for k, _ in FINDINGS},
            "signatures": {
                k: dict(self.findings.sigs[k].most_common(8))
                for k, _ in FINDINGS
                if self.findings.sigs[k]
            },
            "examples": {
                k: self.findings.final_examples(k) for k, _ in FINDINGS if self.findings.counts[k]
            },
            "mutations": dict(self.ops.most_common()),
        }

    def print_summary(self, s: dict[str, Any]) -> None:
        print(f"\nedge-agent fuzz campaign: seed {s['seed']}, agent from {s['agent']}")
        print(f"work dir: {s['work_dir']}")
        if s["stopped_early"]:
            print(f"stopped early: {s['stopped_early']}")
        print("\ninputs sent")
        for k, v in s["inputs"].items():
            print(f"  {k:<22} {v:>8}")
        print(
            f"  {'total':<22} {s['inputs_total']:>8}   (+ {s['barriers']} barrier pings, "
            f"{s['replays']['inputs']} replayed in {s['replays']['searches']} searches)"
        )
        print(
            f"\nelapsed {s['elapsed_s']:.1f} s, {s['inputs_per_s']:.0f} inputs/s; "
            f"{s['log_lines']} agent log lines, {s['broker_messages_seen']} agent messages"
        )
        print(
            f"after crash loops: retained desired cleared {s['retained_desired_cleared']}, "
            f"state dir reset {s['state_dir_resets']}; state dir reset because a mutated "
            f"generation left no room: {s['generation_exhausted_resets']}"
        )
        acc = s["command_accounting"]
        print(
            f"command messages published {acc['published']} (pings and replays included), "
            f"'command handled' in the agent log {acc['agent_logged_handled']}, responses "
            f"received {acc['responses_received']}"
        )
        print(
            f"commands answered {s['commands_answered']}, lost in a crash "
            f"{s['commands_lost_in_crash']}, answered twice after a crash "
            f"{s['duplicates_after_crash']}"
        )
        print(f"\n  {'finding':<28} {'count':>8}")
        for key, title in FINDINGS:
            print(f"  {title:<28} {s['findings'][key]:>8}")
            if key == "crash_loop":
                print(f"  {'(restarts)':<28} {s['restarts']:>8}")
        for key, title in FINDINGS:
            if not s["findings"][key]:
                continue
            print(f"\n== {title}: {s['findings'][key]}")
            for sig, count in s["signatures"].get(key, {}).items():
                print(f"   {count:>7} × {sig[:150]}")
            for i, ex in enumerate(s["examples"].get(key, []), 1):
                print(f"  {i}. input: {ex['input']}")
                detail = ex["detail"].replace("\n", "\n        ")
                print(f"     log/detail: {detail[:600]}")
        verdict = "FINDINGS" if any(s["findings"].values()) else "no findings"
        print(f"\nresult: {verdict}")


def _interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--desired", type=int, default=100_000, help="desired documents to send")
    ap.add_argument("--commands", type=int, default=100_000, help="commands to send")
    ap.add_argument("--quick", action="store_true", help="2,000 of each (a smoke run)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    ap.add_argument("--batch", type=int, default=50, help="inputs between two ping barriers")
    ap.add_argument(
        "--settle-every",
        type=int,
        default=10,
        help="every N batches, wait for downloads and installs to finish",
    )
    ap.add_argument(
        "--time-limit", type=float, default=3600.0, help="stop sending after this many seconds"
    )
    ap.add_argument("--progress", type=int, default=10_000, help="progress line every N inputs")
    ap.add_argument(
        "--agent-src",
        default=None,
        help="directory holding the agent package to run (prepended to PYTHONPATH)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir even without findings")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    if args.quick:
        args.desired = args.commands = 2000
        args.progress = min(args.progress, 1000)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    campaign = Campaign(args)
    aborted = ""
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.ExitStack() as stack:
        try:
            campaign.setup(stack)
            campaign.run()
        except KeyboardInterrupt:
            campaign.stopped_early = "interrupted"
            campaign.elapsed = campaign.elapsed_sending = time.monotonic() - campaign.t0
        except Abort as exc:
            aborted = str(exc)
            campaign.stopped_early = f"aborted: {aborted.splitlines()[0]}"
            campaign.findings.add("crash_loop", "campaign aborted")
            campaign.elapsed = time.monotonic() - getattr(campaign, "t0", time.monotonic())
            campaign.elapsed_sending = campaign.elapsed
    summary = campaign.summary()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        campaign.print_summary(summary)
    failed = any(summary["findings"].values())
    work = getattr(campaign, "work", None)
    if work is not None and not failed and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed or aborted else 0


if __name__ == "__main__":
    sys.exit(main())
