"""API keys (`torchnode api --api-key`): `/v1/*` answers only requests with `Authorization: Bearer KEY`.

Keys come from `--api-key` (repeatable), `--api-key-file` (one per line, `#` comments) and TORCHNODE_API_KEY
(several separated by spaces). Each is compared in constant time (hmac.compare_digest) against every key,
so the time taken tells nothing of how much of a guess was right. A missing or wrong key is a 401 in
OpenAI's error shape. No keys: the API is open, as before (and listens on 127.0.0.1 by default).
"""

from __future__ import annotations

import hmac
import os
import string
from collections.abc import Iterable
from pathlib import Path

from .errors import ApiError

API_KEY_ENV = "TORCHNODE_API_KEY"
KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + string.punctuation)  # what a Bearer token may hold
MAX_KEY_LENGTH = 512


class ApiKeyError(ValueError):
    """A key or key file that cannot be used, said in a line naming where it came from."""


def check_key(key: str, where: str) -> str:
    """The key, if it can travel in an `Authorization: Bearer` header; else ApiKeyError naming `where`."""
    if not key:
        raise ApiKeyError(f"{where}: an API key cannot be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ApiKeyError(f"{where}: an API key is at most {MAX_KEY_LENGTH} characters, got {len(key)}")
    if not set(key) <= KEY_CHARACTERS:
        raise ApiKeyError(f"{where}: an API key holds printable ASCII without spaces only")
    return key


def keys_from_environment() -> list[str]:
    """Keys in $TORCHNODE_API_KEY, separated by spaces (none when unset)."""
    return [check_key(k, f"${API_KEY_ENV}") for k in os.environ.get(API_KEY_ENV, "").split()]


def read_key_file(path: Path) -> list[str]:
    """Keys of a file: one per line; blank lines and `#` comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ApiKeyError(f"cannot read the API key file {path}: {e}") from None
    keys = [check_key(k, f"{path}:{n}") for n, line in enumerate(lines, 1) if (k := line.split("#", 1)[0].strip())]
    if not keys:
        raise ApiKeyError(f"the API key file {path} holds no key")
    return keys


class ApiKeys:
    """The keys a request may present; empty: every request is let in."""

    def __init__(self, keys: Iterable[str] = ()):
        self.keys = tuple(dict.fromkeys(check_key(k, "--api-key") for k in keys))

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None) -> None:
        """Raises a 401 (OpenAI's shape) unless `authorization` is `Bearer KEY` with a known KEY."""
        if not self.keys:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise unauthorized(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        candidate = given.strip().encode()
        matched = False
        for key in self.keys:  # every key compared, in constant time each
            matched |= hmac.compare_digest(candidate, key.encode())
        if not matched:
            raise unauthorized("Incorrect API key provided. The server's keys are set with torchnode api --api-key.")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
