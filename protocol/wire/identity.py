"""Ed25519 identities: one key file per node or client, peer id = hash of the public key.

Keys live on disk with 0600 permissions so a node keeps its peer id (and its reputation in the swarm)
across restarts; two processes on one machine get different identities unless told to share a file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def torchnode_home() -> Path:
    """Where keys live: $TORCHNODE_HOME, default ~/.torchnode."""
    return Path(os.environ.get("TORCHNODE_HOME", Path.home() / ".torchnode"))


def default_identity_path() -> Path:
    return torchnode_home() / "identity.key"


PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def peer_id_of(public_key: bytes) -> str:
    """A short, stable, printable name for a public key (hex of its sha256, 32 chars)."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path | str | None = None) -> Identity:
        """Loads the key at `path`, creating it (mode 0600, parent 0700) if it does not exist yet."""
        path = Path(path) if path is not None else default_identity_path()
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise PermissionError(f"identity key {path} is readable by others; run: chmod 600 {path}")
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return identity

    @cached_property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @cached_property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)
