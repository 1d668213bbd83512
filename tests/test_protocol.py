"""Identities, tensor codec and signing envelope, without a network."""

from __future__ import annotations

import stat

import pytest
import torch

from torchnode.protocol.wire import signing, tensor_codec
from torchnode.protocol.wire import torchnode_pb2 as pb
from torchnode.protocol.wire.identity import Identity, peer_id_of


def test_identity_is_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "node.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).public_key == first.public_key
    assert first.peer_id == peer_id_of(first.public_key)


def test_identity_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "node.key"
    Identity.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        Identity.load_or_create(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codec_roundtrip(dtype):
    x = torch.randn(2, 3, 8).to(dtype)
    assert torch.equal(tensor_codec.decode(tensor_codec.encode(x)), x)


def test_codec_casts_on_the_way_out():
    x = torch.randn(1, 2, 4)
    y = tensor_codec.decode(tensor_codec.encode(x, torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), x, atol=1e-2)


def test_signature_covers_every_field_and_refuses_replay():
    me = Identity.generate()
    message = signing.sign(me, "Forward", pb.ForwardRequest(start_block=1, end_block=2))
    guard = signing.ReplayGuard()
    assert signing.check("Forward", message, replay_guard=guard) == me.public_key
    with pytest.raises(signing.AuthError, match="replayed"):
        signing.check("Forward", message, replay_guard=guard)
    message.end_block = 3
    with pytest.raises(signing.AuthError, match="bad signature"):
        signing.check("Forward", message)
    with pytest.raises(signing.AuthError, match="bad signature"):  # same bytes, other method
        signing.check("Info", signing.sign(me, "Forward", pb.ForwardRequest()))
    with pytest.raises(signing.AuthError, match="unexpected key"):
        signing.check(
            "Forward", signing.sign(me, "Forward", pb.ForwardRequest()), expected_key=Identity.generate().public_key
        )
