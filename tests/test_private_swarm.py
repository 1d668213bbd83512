"""Process tier: a private swarm (--allow-keys) and a public node on the same machine, through one DHT.

The private coordinator and node accept DHT records only from listed keys and the node serves only listed
clients: a private client uses only the private node, a public client only the public one, and a stranger
dialling the private node directly is refused with PERMISSION_DENIED on Info, Inference, Forward and Push.
(DHT records from unlisted keys: tests/test_dht_records.py, refused by every listed peer itself.)"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from grpc import aio
from swarm import start_coordinator, start_node, stop_all, wait_ready

from torchnode.client.sync_model import DistributedModel
from torchnode.protocol.wire import tensor_codec
from torchnode.protocol.wire import torchnode_pb2 as pb
from torchnode.protocol.wire.allow_keys import load_allow_keys
from torchnode.protocol.wire.grpc_node import GrpcNodeClient
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeError, SessionSpec

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers


def write_allow_file(path, *keys: bytes) -> None:
    path.write_text("# members of the private swarm\n" + "".join(f"{k.hex()}  # member\n" for k in keys) + "\n")


def test_allow_file_format(tmp_path):
    key = Identity.generate().public_key
    write_allow_file(tmp_path / "ok", key)
    assert load_allow_keys(tmp_path / "ok") == {key}
    (tmp_path / "bad").write_text("not-a-key\n")
    with pytest.raises(ValueError, match=r"bad:1: 'not-a-key' is not a public key"):
        load_allow_keys(tmp_path / "bad")


async def stranger_calls(address: str, key_file, node_key: bytes) -> list[tuple[str, str, str]]:
    """(method, status, message) of a stranger's signed Info, Inference, Forward and Push to the node at
    `address`, each a call of its own, addressed to the node's key (no Info needed first)."""
    x = torch.zeros(1, 2, 64)
    node = GrpcNodeClient(address, Identity.load_or_create(key_file), expected_key=node_key)
    calls = {
        "Info": lambda: node.info(),
        "Inference": lambda: node.open_session(SessionSpec(uuid.uuid4().hex, 0, 4, 16)).step(x, 0, 10.0),
        "Forward": lambda: node.train_forward(x, 0, 4, {}, 1.0, 10.0),
    }
    results = []
    try:
        for method, call in calls.items():
            try:
                await call()
                results.append((method, "OK", ""))
            except NodeError as e:
                results.append((method, e.status, str(e)))
        push = (await node.stub(10.0)).Push()  # a raw stream: the client's own push reads its acks later
        await push.write(node.sign("Push", pb.Pushed(token=b"t" * 16, hidden=tensor_codec.encode(x))))
        await push.done_writing()
        try:
            async for _ in push:
                pass
            results.append(("Push", "OK", ""))
        except aio.AioRpcError as e:
            results.append(("Push", e.code().name, e.details() or ""))
    finally:
        await node.close()
    return results


def test_private_and_public_swarms_do_not_see_each_other(tiny_llama, tmp_path):
    model = str(tiny_llama)
    member, node_key, stranger = (tmp_path / name for name in ("member.key", "node.key", "stranger.key"))
    members = tmp_path / "members.txt"
    write_allow_file(members, Identity.load_or_create(member).public_key, Identity.load_or_create(node_key).public_key)

    processes = []
    try:
        coordinator, maddr = start_coordinator("--allow-keys", str(members))
        processes.append(coordinator)
        common = ("--blocks", "0:4", "--initial-peers", maddr)
        private = start_node(model, *common, "--allow-keys", str(members), "--identity", str(node_key), wait=False)
        public = start_node(model, *common, wait=False)  # a public node knocking on the private swarm's DHT
        processes += [private, public]
        wait_ready(private), wait_ready(public)

        def visible(**kwargs) -> set[str]:
            client = DistributedModel.from_pretrained(model, initial_peers=[maddr], **kwargs)
            try:
                core = client.async_model
                found = client.run(core.source.candidates(core.ckpt.name, core.ckpt.revision, core.total_blocks))
                return {candidate.key for candidate, _ in found}
            finally:
                client.close()

        assert visible(identity_path=member, allow_keys=members) == {private.address}
        assert visible(identity_path=stranger) == {public.address}

        node_public_key = Identity.load_or_create(node_key).public_key
        for method, status, message in asyncio.run(stranger_calls(private.address, stranger, node_public_key)):
            assert status == "PERMISSION_DENIED" and "not on this node's allow list" in message, (method, message)
    finally:
        stop_all(processes)
