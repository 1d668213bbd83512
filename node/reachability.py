"""Can this node be dialled from outside? Asked at `join`, answered by a relay dialling it back.

AutoNAT-style: the node asks up to `MAX_ASKED` relays from the DHT's relay directory to dial its gRPC
port back, at the address its request came from (a node whose announced address is not where its
connections come from sits behind a NAT), and to check that the certificate found there is bound to
the node's key. Any success means reachable; failures from every relay asked mean not. With no relay
to ask, the node assumes it is reachable and says so. `--reachable yes|no` skips the question.

A node that is not reachable serves through a relay (protocol/wire/relay_link.py): `establish` registers it
with one and returns the link, whose address and relay the node then announces.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hivemind

from ..protocol.dht.relay_directory import find_relays
from ..protocol.wire.identity import Identity
from ..protocol.wire.relay_link import Registration, RelayError, RelayLink, dialback

log = logging.getLogger(__name__)

MODES = ("auto", "yes", "no")
MAX_ASKED = 3


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    reason: str


async def check(dht: hivemind.DHT, identity: Identity, host: str, port: int, public_key: bytes) -> Reachability:
    """Asks relays in the DHT to dial host:port back. `public_key`: the key the node's TLS certificate is
    bound to (empty for a plaintext node)."""
    relays = [r for r in await find_relays(dht, return_future=True) if r.peer_id != identity.peer_id][:MAX_ASKED]
    if not relays:
        return Reachability(True, "no relay in the swarm to check with: assuming reachable")
    reasons, answered = [], 0
    for relay in relays:
        try:
            reachable, reason = await dialback(relay, host, port, public_key)
        except RelayError as e:
            reasons.append(f"relay {relay.peer_id[:12]}: {e}")
            continue
        answered += 1
        if reachable:
            return Reachability(True, f"relay {relay.peer_id[:12]} {reason}")
        reasons.append(f"relay {relay.peer_id[:12]}: {reason}")
    if not answered:
        return Reachability(True, f"no relay answered ({'; '.join(reasons)}): assuming reachable")
    return Reachability(False, "; ".join(reasons))


async def establish(
    mode: str,
    dht: hivemind.DHT,
    identity: Identity,
    announced: str,
    local: str,
    public_key: bytes,
    on_change: Callable[[Registration], Awaitable[None]],
    on_status: Callable[[str], None],
) -> RelayLink | None:
    """Decides reachability (`mode`: auto/yes/no) and, when not reachable, registers with a relay.

    `announced`: the host:port others would dial; `local`: where relayed streams reach the gRPC server.
    Returns the link to run (its `current` registration is set), or None when the node is dialled directly.
    """
    if mode not in MODES:
        raise ValueError(f"--reachable must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "yes":
        return None
    if mode == "auto":
        host, _, port = announced.rpartition(":")
        result = await check(dht, identity, host, int(port), public_key)
        on_status(f"reachability: {'reachable' if result.reachable else 'NOT reachable'} ({result.reason})")
        if result.reachable:
            return None
    link = RelayLink(dht, identity, local, on_change, on_status)
    try:
        registration = await link.register()
    except RelayError as e:
        raise RuntimeError(f"this node cannot be dialled and {e}: start a relay (coordinator --relay)") from None
    on_status(f"relayed: reachable through relay {registration.relay.peer_id} at {registration.address}")
    return link
