"""The only place that creates a hivemind DHT, plus announcing and finding servers in it.

Every DHT is started by `start_dht`: its p2pd listens and announces only on the given host, with no
relays, AutoNAT, UPnP or public bootstrap peers, a fresh libp2p identity per process, and the
`SwarmValidator` (server records, model index entries) as the DHT's only validator.

`announce` and `find_servers` run inside the DHT's own process (`dht.run_coroutine`). They block by
default; pass `return_future=True` to get a hivemind MPFuture instead, which asyncio code can `await`.
Expirations are absolute DHT times from `get_dht_time()` (hivemind's clock).
"""

from __future__ import annotations

import gc
import ipaddress
import socket
from collections.abc import Awaitable, Iterable
from functools import partial
from typing import Literal, overload

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

from ..wire.identity import Identity
from .records import ServerRecord, block_key, encode_record
from .validator import AllowListValidator, SwarmValidator, parse_entry


def start_dht(
    initial_peers: list[str],
    host: str = "127.0.0.1",
    port: int = 0,
    announce_host: str | None = None,
    client_mode: bool = False,
    allow_keys: frozenset[bytes] | None = None,
) -> hivemind.DHT:
    """Starts a DHT peer (a child process with its p2pd) and waits until it has joined `initial_peers`.

    `host` must be an IP address; `announce_host` (default `host`) may be an IP or a DNS name. Port 0
    picks a free port now, because p2pd needs an explicit port in its announce address.
    """
    listen_ip = ipaddress.ip_address(host)  # ValueError for anything that is not an IP literal
    if port == 0:
        port = _free_port(str(listen_ip))
    # hivemind's DHT is a *forked* process. A child that garbage-collects objects it inherited (gRPC channels
    # of a process that already talked to nodes) can crash in their finalizers (seen: a segfault in the
    # child's GC). Freezing moves everything that exists now out of the collector's reach, in the child
    # too; the parent unfreezes once the child has started.
    gc.freeze()
    try:
        return _new_dht(initial_peers, host, port, announce_host, client_mode, allow_keys)
    finally:
        gc.unfreeze()


def _new_dht(initial_peers, host, port, announce_host, client_mode, allow_keys) -> hivemind.DHT:
    return hivemind.DHT(
        initial_peers=list(initial_peers),
        start=True,
        client_mode=client_mode,
        # server records and model index entries; in a private swarm (--allow-keys) only from listed keys
        record_validators=[SwarmValidator(), *([AllowListValidator(allow_keys)] if allow_keys else [])],
        # forwarded by DHTNode.create to hivemind.P2P.create, i.e. to the p2pd command line:
        host_maddrs=[_maddr(host, port)],  # -hostAddrs: listen only here (hivemind's own default is 127.0.0.1)
        announce_maddrs=[_maddr(announce_host or host, port)],  # -announceAddrs: no observed/other addrs
        use_ipfs=False,  # no IPFS bootstrap peers; p2pd bootstraps from initial_peers only
        use_relay=False,  # -relay=0: no circuit relay transport (on by default in hivemind)
        use_auto_relay=False,  # -autoRelay=0
        auto_nat=False,  # -autonat=0 (on by default in hivemind)
        nat_port_map=False,  # -natPortMap=0: no UPnP/NAT-PMP port mapping on the router (on by default)
        identity_path=None,  # p2pd generates a fresh key: no identity shared between processes
    )


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The multiaddrs others pass as --initial-peers to join through this peer."""
    return [str(maddr) for maddr in dht.get_visible_maddrs()]


def announce(
    dht: hivemind.DHT,
    identity: Identity,
    record: ServerRecord,
    blocks: Iterable[int] | None = None,
    return_future: bool = False,
) -> dict[int, bool]:
    """Stores the signed `record` under each of `blocks` (default: its whole span) with subkey = peer id
    and expiration_time = record.expiration. Returns {block: stored}, where, as in hivemind's store_many,
    "stored" is the answer of the last replica to reply (honest replicas all answer alike)."""
    blocks = list(record.blocks if blocks is None else blocks)
    if not set(blocks) <= set(record.blocks):
        raise ValueError(f"blocks {blocks} are outside the record's span [{record.start}, {record.end})")
    if record.expiration <= get_dht_time():
        raise ValueError("record.expiration is in the past")
    value = encode_record(identity, record)
    store = partial(
        _store_blocks,
        model=record.model,
        blocks=blocks,
        peer_id=record.peer_id,
        value=value,
        expiration=record.expiration,
    )
    return dht.run_coroutine(store, return_future=return_future)


@overload
def find_servers(
    dht: hivemind.DHT, model: str, total_blocks: int, return_future: Literal[False] = False
) -> dict[int, list[ServerRecord]]: ...


@overload
def find_servers(
    dht: hivemind.DHT, model: str, total_blocks: int, return_future: Literal[True]
) -> Awaitable[dict[int, list[ServerRecord]]]: ...


def find_servers(
    dht: hivemind.DHT, model: str, total_blocks: int, return_future: bool = False
) -> dict[int, list[ServerRecord]] | Awaitable[dict[int, list[ServerRecord]]]:
    """{block: valid, unexpired server records} for every block in range(total_blocks), in one batched
    latest-value lookup. Blocks nobody serves map to an empty list."""
    return find_blocks(dht, model, range(total_blocks), return_future=return_future)


def find_blocks(
    dht: hivemind.DHT, model: str, blocks: Iterable[int], return_future: bool = False
) -> dict[int, list[ServerRecord]]:
    """As `find_servers`, for any set of block indices (e.g. a window when the block count is unknown)."""
    blocks = list(blocks)
    keys = [block_key(model, block) for block in blocks]  # validates model and block indices
    return dht.run_coroutine(partial(_find_blocks, model=model, blocks=blocks, keys=keys), return_future=return_future)


# Coroutines below run inside the DHT process (they must be module-level to be picklable).


async def _store_blocks(
    _dht: hivemind.DHT, node: DHTNode, model: str, blocks: list[int], peer_id: str, value: bytes, expiration: float
) -> dict[int, bool]:
    keys = [block_key(model, block) for block in blocks]
    store_ok = await node.store_many(keys, [value] * len(keys), expiration, subkeys=[peer_id] * len(keys))
    return {block: bool(store_ok[key, peer_id]) for block, key in zip(blocks, keys, strict=True)}


async def _find_blocks(
    _dht: hivemind.DHT, node: DHTNode, model: str, blocks: list[int], keys: list[str]
) -> dict[int, list[ServerRecord]]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # = get(latest=True)
    now = get_dht_time()
    servers: dict[int, list[ServerRecord]] = {}
    for block, key in zip(blocks, keys, strict=True):
        entries = found.get(key)
        records = []
        if entries is not None and isinstance(entries.value, dict):  # a plain value under a block key is junk
            for subkey, entry in entries.value.items():
                record = parse_entry(subkey, entry.value, entry.expiration_time, model=model, block=block, now=now)
                if record is not None:
                    records.append(record)
        servers[block] = sorted(records, key=lambda r: r.peer_id)
    return servers


def _maddr(host: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"/dns/{host}/tcp/{port}"
    return f"/ip{ip.version}/{ip}/tcp/{port}"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
