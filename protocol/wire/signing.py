"""The signature envelope carried by every request and response.

The signed bytes are sha256(method | timestamp | nonce | audience | in_reply_to | message serialized
deterministically without its `auth` field), so every field a peer sends (tensors, session id, step
index, span) is covered, and the same envelope serves unary calls and stream messages alike. Replays are
refused by remembering each nonce for as long as its timestamp stays inside the clock-skew window.

Captured messages must not work anywhere else either: a request names its audience (the public key of
the node it is for) and a node refuses one addressed to another node; a reply names the request it
answers (that request's signature), and the client refuses a reply to anything else.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from dataclasses import dataclass, field

from google.protobuf.message import Message

from . import torchnode_pb2 as pb
from .identity import Identity, peer_id_of, verify

DEFAULT_MAX_CLOCK_SKEW = 30.0
NONCE_BYTES = 16


class AuthError(Exception):
    """A message whose envelope is missing, forged, stale, replayed or from an unexpected key."""


def _signed_bytes(
    method: str, message: Message, timestamp: float, nonce: bytes, audience: bytes, in_reply_to: bytes
) -> bytes:
    # A copy, not a clear-and-restore of `message.auth`: that would detach sub-message references that
    # callers hold (`message.auth.CopyFrom(...)` evaluates `message.auth` before its argument).
    unsigned = type(message)()
    unsigned.CopyFrom(message)
    unsigned.ClearField("auth")
    body = unsigned.SerializeToString(deterministic=True)
    h = hashlib.sha256()
    h.update(method.encode())
    h.update(b"\0")
    h.update(struct.pack("<d", timestamp))
    for part in (nonce, audience, in_reply_to):  # length-prefixed: no two splits hash alike
        h.update(struct.pack("<H", len(part)))
        h.update(part)
    h.update(body)
    return h.digest()


def sign(
    identity: Identity,
    method: str,
    message: Message,
    *,
    audience: bytes = b"",
    in_reply_to: bytes = b"",
    timestamp: float | None = None,
    nonce: bytes | None = None,
) -> Message:
    """Fills `message.auth` in place and returns the message, for use in expressions.

    A request names its `audience` (the node's public key); a reply names the request it answers
    (`in_reply_to`: that request's signature). timestamp and nonce default to now and fresh random bytes;
    tests pass old or reused ones to check that nodes refuse stale and replayed messages.
    """
    timestamp = time.time() if timestamp is None else timestamp
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    message.ClearField("auth")
    signature = identity.sign(_signed_bytes(method, message, timestamp, nonce, audience, in_reply_to))
    message.auth.CopyFrom(
        pb.Auth(
            public_key=identity.public_key,
            timestamp=timestamp,
            nonce=nonce,
            signature=signature,
            audience=audience,
            in_reply_to=in_reply_to,
        )
    )
    return message


@dataclass
class ReplayGuard:
    """Remembers recent nonces; a nonce older than the skew window is rejected by its timestamp instead."""

    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW
    _seen: dict[bytes, float] = field(default_factory=dict)
    _next_prune: float = 0.0

    def check_and_remember(self, auth: pb.Auth, now: float) -> None:
        if not math.isfinite(auth.timestamp):  # NaN compares false to everything: it would never be stale
            raise AuthError(f"bad timestamp {auth.timestamp}: must be a finite number of unix seconds")
        if abs(now - auth.timestamp) > self.max_clock_skew:
            raise AuthError(
                f"stale signature: timestamp is {now - auth.timestamp:+.1f}s from the node's clock "
                f"(allowed skew {self.max_clock_skew:.0f}s)"
            )
        key = auth.public_key + auth.nonce
        if key in self._seen:
            raise AuthError("replayed request: this nonce was already used")
        self._seen[key] = auth.timestamp + self.max_clock_skew
        if now >= self._next_prune:
            self._seen = {k: expiry for k, expiry in self._seen.items() if expiry >= now - self.max_clock_skew}
            self._next_prune = now + self.max_clock_skew


def check(
    method: str,
    message: Message,
    *,
    expected_key: bytes | None = None,
    replay_guard: ReplayGuard | None = None,
    audience: bytes | None = None,
    reply_to: Message | None = None,
) -> bytes:
    """Verifies the envelope of `message` and returns the signer's public key; raises AuthError.

    audience: the checker's own key; the message must be addressed to it. reply_to: the signed request
    this message must answer.
    """
    if not message.HasField("auth") or not message.auth.signature:
        raise AuthError(f"unsigned {method} message: every message must carry an Ed25519 signature envelope")
    auth = message.auth
    if len(auth.nonce) != NONCE_BYTES:
        raise AuthError(f"bad nonce: expected {NONCE_BYTES} bytes, got {len(auth.nonce)}")
    if expected_key is not None and auth.public_key != expected_key:
        raise AuthError("message signed by an unexpected key (not the key this peer is known by)")
    if audience is not None and auth.audience != audience:
        if not auth.audience:
            raise AuthError(f"{method} request names no node: sign it for its audience (the node's public key)")
        raise AuthError(
            f"{method} request addressed to another node (peer {peer_id_of(auth.audience)}), not to this one "
            f"(peer {peer_id_of(audience)}): a request signed for one node is refused by every other"
        )
    if reply_to is not None and auth.in_reply_to != reply_to.auth.signature:
        raise AuthError(f"{method} reply answers another request than the one sent")
    signed = _signed_bytes(method, message, auth.timestamp, auth.nonce, auth.audience, auth.in_reply_to)
    if not verify(auth.public_key, auth.signature, signed):
        raise AuthError(f"bad signature on {method} message")
    if replay_guard is not None:
        replay_guard.check_and_remember(auth, time.time())
    return bytes(auth.public_key)
