"""A node's limits and a relay's, each a CLI flag with a default: what one volunteer machine promises to serve."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any


@functools.cache
def _byte_size() -> Any:
    """pydantic's ByteSize parser, made on first use: the CLI imports this module to read defaults, and
    `torchnode --help` should not wait for pydantic."""
    from pydantic import ByteSize, TypeAdapter

    return TypeAdapter(ByteSize)


def parse_bytes(text: str | int) -> int:
    """'1GiB', '512MB', '1048576' -> bytes (pydantic's ByteSize rules)."""
    return int(_byte_size().validate_python(text))


@dataclass(frozen=True)
class Limits:
    """What one node serves at most. Each field is a `join` flag whose default and help are these (the flag may
    take another unit: sizes as text such as 1GiB, the batch wait in ms)."""

    max_sessions: int = field(default=64, metadata={"help": "concurrent inference sessions"})
    cache_bytes: int = field(default=1 << 30, metadata={"help": "KV cache budget over all sessions"})
    max_session_tokens: int = field(default=4096, metadata={"help": "max_length one session may ask for"})
    session_idle_timeout: float = field(default=300.0, metadata={"help": "seconds idle before a session closes"})
    max_message_bytes: int = field(default=64 << 20, metadata={"help": "largest gRPC message accepted or sent"})
    max_clock_skew: float = 30.0  # seconds a signature timestamp may differ from the node's clock
    max_batch_tokens: int = field(
        default=256,
        metadata={"help": "tokens of all sessions in one pass over the span; longer prefills run in chunks"},
    )
    batch_wait: float = field(
        default=0.005, metadata={"help": "ms to wait for more sessions' steps to fill a batch"}
    )  # seconds here, ms on the command line (--batch-wait-ms)
    push_timeout: float = field(
        default=5.0, metadata={"help": "seconds to reach the next node when pushing an output to it"}
    )  # to open a Push stream to the next node (TLS included) and write to it
    push_wait: float = field(default=60.0, metadata={"help": "seconds a pushed input waits for the client's step"})
    max_pushed: int = field(default=4096, metadata={"help": "pushed inputs kept while their steps have not arrived"})
    slab_slots: int = field(
        default=32,
        metadata={
            "help": "single-sequence sessions per shared KV cache slab (their decode steps attend in one call per"
            " block; a slot is max_length rounded up to 64 tokens); 0: every session's cache on its own"
        },
    )
    fair_share: bool = field(
        default=True,
        metadata={
            "help": "divide session slots, KV cache and compute among client keys: a full node evicts the least"
            " recently used idle session of the key holding the most beyond its share for a newcomer;"
            " --no-fair-share: first come, first served (a private swarm)"
        },
    )

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
        if self.slab_slots < 0:
            raise ValueError(f"slab_slots must not be negative, got {self.slab_slots}")
        if self.session_idle_timeout <= 0 or self.max_clock_skew <= 0:
            raise ValueError("timeouts must be positive")
        if not 0 <= self.batch_wait <= 1:
            raise ValueError(f"batch_wait must be in 0..1 seconds, got {self.batch_wait}")


@dataclass(frozen=True)
class RelayLimits:
    """What a relay (`--relay` on `join` or `coordinator`) carries at most; each field a flag."""

    max_nodes: int = field(default=32, metadata={"help": "nodes relayed at once (with --relay)"})
    max_streams: int = field(default=256, metadata={"help": "client streams relayed at once (with --relay)"})
    bytes_per_second: int = field(
        default=16 << 20, metadata={"help": "bytes per second per relayed node, both ways (with --relay)"}
    )  # per relayed node, both directions together

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_streams", "bytes_per_second"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
