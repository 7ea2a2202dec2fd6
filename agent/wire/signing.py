"""Ed25519 artifact signatures: keys, key ids, signing (operator) and trust (agent).

What is signed is the artifact's SHA-256 digest: the 32 raw bytes, not the hex text.
The digest is what the desired document names and what the agent checks the
downloaded bytes against, so a valid signature over it vouches for the content.
The same operation with OpenSSL 3::

    sha256sum flow.wasm | cut -c1-64 | xxd -r -p > digest.bin
    openssl pkeyutl -sign -inkey ops.key -rawin -in digest.bin | base64 -w0

A key id is the first 16 hex digits of the SHA-256 of the raw 32-byte public key,
so it follows from the key and cannot be chosen to collide with another key's id.
Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), the format
``openssl genpkey -algorithm ed25519`` writes.

An agent trusts every public key in its ``artifacts.trusted_keys`` list: while keys
are rotated, it lists the old and the new one. With ``require_signature`` it refuses
unsigned artifacts; without it, it accepts unsigned ones but still refuses a
signature that does not verify. An agent with no trusted keys ignores signatures.

cryptography is imported by the functions that need it, not with this module: its
native part costs the agent ~8 MiB of memory and ~40 ms of start-up, and an agent
with no trusted keys never uses it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError, ConfigError
from agent.wire.protocol import ArtifactRef, ArtifactSignature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )


class KeyFileError(AgentError):
    """A key file that cannot be read or is not an ed25519 key."""


def key_id(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an ed25519 key ({type(key).__name__})")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an ed25519 key ({type(key).__name__})")
    return key


def generate(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (the private key readable by its owner only); its key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} exists; not overwriting a key")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_id(key.public_key())


def sign(key: Ed25519PrivateKey, sha256_hex: str) -> ArtifactSignature:
    """The signature of an artifact, given its SHA-256 (hex)."""
    sig = key.sign(bytes.fromhex(sha256_hex))
    return ArtifactSignature(keyId=key_id(key.public_key()), sig=base64.b64encode(sig).decode())


@dataclass(frozen=True)
class Trust:
    """The agent's signature policy: trusted keys by id, and whether one is required."""

    keys: dict[str, Ed25519PublicKey]
    require: bool = False

    @property
    def policy(self) -> tuple[frozenset[str], bool]:
        """What the policy is, comparable (the key ids and whether one is required)."""
        return frozenset(self.keys), self.require

    @classmethod
    def from_files(cls, paths: Iterable[Path], *, require: bool) -> Trust:
        """Raises :class:`ConfigError` for a key file that is unreadable or not ed25519."""
        keys = {}
        for path in paths:
            try:
                key = load_public_key(path)
            except KeyFileError as exc:
                raise ConfigError("config", "artifacts.trusted_keys", str(exc)) from None
            keys[key_id(key)] = key
        return cls(keys, require)

    def check(self, artifact: ArtifactRef) -> str | None:
        """None if the artifact is acceptable, else the reason (one line)."""
        sig = artifact.signature
        if not self.keys and not self.require:
            return None  # signatures are not checked on this device
        if sig is None:
            return (
                "artifact is not signed and this device requires signed artifacts"
                if (self.require)
                else None
            )
        key = self.keys.get(sig.key_id)
        if key is None:
            known = ", ".join(sorted(self.keys)) or "none"
            return f"artifact signed by unknown key {sig.key_id} (trusted: {known})"
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(base64.b64decode(sig.sig, validate=True), bytes.fromhex(artifact.sha256))
        except (InvalidSignature, binascii.Error, ValueError):
            return f"artifact signature by key {sig.key_id} does not verify"
        return None
