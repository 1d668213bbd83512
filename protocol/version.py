"""The package version and the protocol version: leaves every folder may import.

The package version (`__version__`) says which release a node runs; the protocol version (`PROTOCOL`,
"MAJOR.MINOR") says who can talk to whom. Nodes of different releases share a swarm for days: a change that
old peers can ignore (a new optional field) bumps the minor, and every minor of one major talks to every
other; a change old peers would misread bumps the major. A client routes only through nodes of its own
major, and a node refuses a session from a client of another major (FAILED_PRECONDITION, with both versions
in the message). Nodes that predate the field said nothing: they speak UNSAID_PROTOCOL.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("torchnode")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

PROTOCOL = "1.1"  # read through `protocol()`, at call time (tests/helpers/versioned_cli.py runs another)
UNSAID_PROTOCOL = "1.0"  # what a DHT record or an Info without the field speaks
STEP_BATCHES = "1.1"  # the first protocol with the StepBatches RPC (many sessions' steps per message)
_PROTOCOL = re.compile(r"(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})")


def protocol() -> str:
    """The protocol version this process speaks."""
    return PROTOCOL


def protocol_major(protocol_version: str) -> int:
    """3 for "3.1"; ValueError for anything not "MAJOR.MINOR" (each 0..9999, no sign or leading zeros)."""
    return _parts(protocol_version)[0]


def supports(theirs: str, since: str) -> bool:
    """Whether a peer speaking `theirs` has what the protocol gained in `since`: the same major, a minor at least
    as new ("1.3" supports "1.1"; "2.0" does not: another major is another protocol)."""
    (major, minor), (since_major, since_minor) = _parts(theirs), _parts(since)
    return major == since_major and minor >= since_minor


def _parts(protocol_version: str) -> tuple[int, int]:
    """(MAJOR, MINOR); ValueError for anything not "MAJOR.MINOR"."""
    m = _PROTOCOL.fullmatch(protocol_version) if isinstance(protocol_version, str) else None
    if m is None:
        raise ValueError(f"protocol version {protocol_version!r} is not MAJOR.MINOR")
    return int(m[1]), int(m[2])


def speaks(theirs: str, ours: str | None = None) -> bool:
    """Whether a peer speaking `theirs` can talk to this process (or to `ours`): the same major."""
    return protocol_major(theirs) == protocol_major(ours or protocol())


def upgrade_advice(other: str, reader: str, other_name: str) -> str:
    """The end of a mismatch message read by one side (`reader` is the protocol it speaks): "upgrade" when the
    other side (`other`) speaks the newer major, else that the other side must."""
    return "upgrade" if protocol_major(other) > protocol_major(reader) else f"{other_name} must upgrade"
