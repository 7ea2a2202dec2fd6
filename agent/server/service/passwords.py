"""Password hashes: scrypt with a salt of its own per password, the parameters kept in
the hash (``scrypt$n$r$p$salt$hash``, salt and hash in unpadded URL-safe base64), so
they can be raised later without making the stored hashes unreadable.

The default costs 32 MiB and some 100 ms of one core per hash: a login is slow on
purpose, a stolen table is slow to guess through.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass

#: The cost of a new hash (scrypt's N, r, p).
N = 1 << 15
R = 8
P = 1
#: Bounds of what a stored hash may ask for (a hash is data: it must not be able to
#: make a login take a minute or a gigabyte).
MAX_N = 1 << 20
MAX_MEMORY = 1 << 30
SALT_BYTES = 16
KEY_BYTES = 32
#: The longest password accepted (hashing is linear in it; longer is not stronger).
MAX_PASSWORD = 1024
PREFIX = "scrypt"


@dataclass(frozen=True)
class Cost:
    n: int = N
    r: int = R
    p: int = P

    @property
    def memory(self) -> int:
        return 128 * self.r * (self.n + self.p + 2)

    def valid(self) -> bool:
        return (
            1 < self.n <= MAX_N
            and self.n & (self.n - 1) == 0
            and 1 <= self.r <= 32
            and 1 <= self.p <= 16
            and self.memory <= MAX_MEMORY
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(password: str, salt: bytes, cost: Cost, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=cost.n,
        r=cost.r,
        p=cost.p,
        maxmem=cost.memory + (1 << 20),
        dklen=length,
    )


def hash_password(password: str, cost: Cost | None = None) -> str:
    """The stored form of ``password`` (a new random salt each time)."""
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"a password is at most {MAX_PASSWORD} characters")
    cost = cost or Cost()
    salt = secrets.token_bytes(SALT_BYTES)
    key = _derive(password, salt, cost, KEY_BYTES)
    return f"{PREFIX}${cost.n}${cost.r}${cost.p}${_b64(salt)}${_b64(key)}"


@dataclass(frozen=True)
class _Parsed:
    cost: Cost
    salt: bytes
    key: bytes


def _parse(stored: str) -> _Parsed | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != PREFIX or not all(p.isdigit() for p in parts[1:4]):
        return None
    cost = Cost(int(parts[1]), int(parts[2]), int(parts[3]))
    try:
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except (binascii.Error, ValueError):
        return None
    if not cost.valid() or not 8 <= len(salt) <= 64 or not 16 <= len(key) <= 64:
        return None
    return _Parsed(cost, salt, key)


@functools.cache
def _decoy() -> str:
    """A hash of nothing anyone knows, at the default cost: what a login for an
    unknown email is checked against, so it takes as long as a wrong password."""
    return hash_password(secrets.token_urlsafe(16))


def verify_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` is the one ``stored`` was made from. ``None`` (no such
    user) costs the same scrypt as a real hash and is never a match."""
    parsed = _parse(stored if stored is not None else _decoy())
    if parsed is None:
        parsed = _parse(_decoy())
        stored = None
    assert parsed is not None
    if len(password) > MAX_PASSWORD:
        password = ""
        stored = None
    key = _derive(password, parsed.salt, parsed.cost, len(parsed.key))
    return hmac.compare_digest(key, parsed.key) and stored is not None
