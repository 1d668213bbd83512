"""A node's limits, each a CLI flag with a default: what one volunteer machine promises to serve."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ByteSize, TypeAdapter

_BYTES = TypeAdapter(ByteSize)


def parse_bytes(text: str | int) -> int:
    """'1GiB', '512MB', '1048576' -> bytes (pydantic's ByteSize rules)."""
    return int(_BYTES.validate_python(text))


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 64
    cache_bytes: int = 1 << 30  # KV cache budget over all sessions
    max_session_tokens: int = 4096  # max_length a session may ask for
    session_idle_timeout: float = 300.0  # seconds without a step before a session is closed
    max_message_bytes: int = 64 << 20  # gRPC send/receive message limit
    max_clock_skew: float = 30.0  # seconds a signature timestamp may differ from the node's clock
    max_batch_tokens: int = 256  # tokens of all sessions in one pass over the span; longer prefills run in chunks
    batch_wait: float = 0.005  # seconds the runner may wait for more sessions' steps to fill a batch
    push_timeout: float = 5.0  # seconds to open a Push stream to the next node (TLS included) and write to it
    push_wait: float = 60.0  # seconds a pushed input waits for the client's step that names it
    max_pushed: int = 4096  # pushed inputs kept while their steps have not arrived

    def __post_init__(self) -> None:
        for name in (
            "max_sessions",
            "cache_bytes",
            "max_session_tokens",
            "max_message_bytes",
            "max_batch_tokens",
            "max_pushed",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.session_idle_timeout <= 0 or self.max_clock_skew <= 0:
            raise ValueError("timeouts must be positive")
        if not 0 <= self.batch_wait <= 1:
            raise ValueError(f"batch_wait must be in 0..1 seconds, got {self.batch_wait}")
