"""Hand-made node records and node infos, as the health monitor and the dashboard read them from the DHT
and from a node's Info reply (no network): the unit tests' stand-ins for what a swarm announces."""

from __future__ import annotations

from hivemind.utils.timed_storage import get_dht_time

from torchnode.protocol.dht.records import ServerRecord
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeInfo


def record_of(identity: Identity, start=0, end=2, total_blocks=0, **kw) -> ServerRecord:
    """An online record of model "m" signed by nobody (the monitor reads records already validated)."""
    fields = dict(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        address="127.0.0.1:9",
        model="m",
        revision="r1",
        start=start,
        end=end,
        state="online",
        throughput=1.0,
        cache_bytes_free=0,
        version="0.1.0",
        expiration=get_dht_time() + 30,
        total_blocks=total_blocks,
    )
    return ServerRecord(**(fields | kw))


def info_of(record: ServerRecord, total_blocks: int, **kw) -> NodeInfo:
    """The Info reply of the node that announced `record`."""
    fields = dict(
        model=record.model,
        revision=record.revision,
        start_block=record.start,
        end_block=record.end,
        total_blocks=total_blocks,
        hidden_size=64,
        dtype="float32",
        throughput=2.0,
        cache_bytes_free=1,
        sessions_free=1,
        version="0.1.0",
        public_key=record.public_key,
    )
    return NodeInfo(**(fields | kw))
