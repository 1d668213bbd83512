"""The member list of a private swarm: one file, one public key per line, shared by every member.

Format: each key as `torchnode identity` prints it (64 hex digits of the raw Ed25519 public key); `#`
starts a comment; blank lines are ignored. Nodes serve only listed clients and accept DHT records only
from listed keys; clients use only listed nodes (node/allow_list.py, record_validator.AllowListValidator,
client/discovery.py).
"""

from __future__ import annotations

from pathlib import Path

from .identity import PUBLIC_KEY_BYTES


def load_allow_keys(path: Path | str) -> frozenset[bytes]:
    """The raw public keys listed in `path`; ValueError naming the file and line for anything else."""
    keys = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != PUBLIC_KEY_BYTES:
            raise ValueError(
                f"{path}:{number}: {text!r} is not a public key (64 hex digits, as `torchnode identity` prints)"
            )
        keys.add(key)
    if not keys:
        raise ValueError(f"{path} lists no keys: a private swarm needs at least its own members")
    return frozenset(keys)
