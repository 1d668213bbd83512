"""A fair share of a node for every client key: session slots and KV cache memory divided among the keys
that want them, so a client holding everything cannot shut a newcomer out.

First come, first served lets one client open every slot (`--max-sessions`) or fill the cache budget
(`--cache-memory`) and sit on it. With the fair share on (the default; `join --no-fair-share` turns it
off, for a private swarm whose members trust each other), a key's share is

    slots: max(1, max_sessions // keys)      cache: cache_bytes // keys

where `keys` counts the client keys holding sessions here plus the one asking. A client that asks for a
session on a full node (no free slot, or not enough free cache) is served if that session keeps it within
its share: the node evicts sessions of the key that holds the most beyond its own share, least recently
stepped first, never one whose step is queued or running. Otherwise the client is refused.

What clients see (gRPC statuses):
- refused: RESOURCE_EXHAUSTED `node is full: ... your key holds N of its fair share of M ...`; the client's
  router tries another node;
- evicted: the session's next step gets ABORTED `session evicted ... (fair share, --max-sessions)`; the
  client's failover replays the session's history on another node serving those blocks (client/session.py),
  so its output is unchanged. A client within its share is never evicted.

Compute is shared too: the scheduler interleaves the keys' steps in every batch (node/scheduler.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Holding:
    """What the fair share needs to know of one open session."""

    client: bytes  # the key that opened it
    nbytes: int  # its KV cache reservation
    last_used: float  # time.monotonic() of its latest step (or of its opening)
    busy: bool  # a step of it is queued or running: never evicted


@dataclass(frozen=True)
class Shares:
    keys: int  # client keys counted: those holding sessions plus the one asking
    slots: int  # sessions each key may hold when the node is full
    cache_bytes: int  # KV cache bytes each key may hold when the budget is spent


def shares(holdings: Sequence[Holding], asking: bytes, max_sessions: int, cache_bytes: int) -> Shares:
    keys = len({h.client for h in holdings} | {asking})
    return Shares(keys, max(1, max_sessions // keys), cache_bytes // keys)


def refusal(holdings: Sequence[Holding], asking: bytes, nbytes: int, max_sessions: int, cache_bytes: int) -> str | None:
    """Why `asking` may not make room for a session of `nbytes` by eviction (None: it may): it would go
    beyond its share. Its first session is always within its share of slots; of cache, when no larger than
    the share itself (a key alone gets the whole budget)."""
    share = shares(holdings, asking, max_sessions, cache_bytes)
    mine = [h for h in holdings if h.client == asking]
    if len(mine) + 1 > share.slots:
        return (
            f"your key holds {len(mine)} of its fair share of {share.slots} sessions "
            f"({share.keys} client keys share {max_sessions}, --max-sessions)"
        )
    held = sum(h.nbytes for h in mine)
    if mine and held + nbytes > share.cache_bytes:
        return (
            f"your key holds {held} KV cache bytes; {nbytes} more would pass its fair share of "
            f"{share.cache_bytes} ({share.keys} client keys share {cache_bytes}, --cache-memory)"
        )
    return None


def victim(
    holdings: Sequence[Holding], asking: bytes, need_slot: bool, need_bytes: bool, max_sessions: int, cache_bytes: int
) -> int | None:
    """The index in `holdings` of the session to evict for `asking`: of the key holding the most beyond its
    share (of slots if `need_slot`, else of cache bytes), the least recently used one that is not busy.
    None: no key other than the asker is beyond its share (or all its sessions are busy)."""
    share = shares(holdings, asking, max_sessions, cache_bytes)
    count: Counter[bytes] = Counter(h.client for h in holdings)
    held: Counter[bytes] = Counter()
    for h in holdings:
        held[h.client] += h.nbytes
    if need_slot:
        over = {k: count[k] - share.slots for k in count if k != asking and count[k] > share.slots}
    elif need_bytes:
        over = {k: held[k] - share.cache_bytes for k in held if k != asking and held[k] > share.cache_bytes}
    else:
        return None
    for key in sorted(over, key=lambda k: (count[k], held[k]), reverse=True):
        idle = [i for i, h in enumerate(holdings) if h.client == key and not h.busy]
        if idle:
            return min(idle, key=lambda i: holdings[i].last_used)
    return None
