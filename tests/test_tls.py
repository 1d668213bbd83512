"""Encrypted links bound to node identities, and signatures that name their audience.

Unit tests check the certificate binding, its file, and the audience/reply fields of signatures. The
process tests run real nodes (one TLS, one --insecure) behind a recording TCP proxy: the prompt's
embeddings cross the wire readable only with --insecure; a man in the middle with his own certificate
is refused, before and after the client's certificate check; a request replayed to another node is
refused; and a client and node that disagree on --insecure fail fast with a clear error.
"""

from __future__ import annotations

import asyncio
import datetime
import stat
import time

import grpc
import pytest
import swarm as procs  # the process helpers; tests that start processes are marked `swarm` below
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio
from tcp_proxy import TcpProxy
from transformers import AutoModelForCausalLM

from torchnode import DistributedModel
from torchnode.protocol.wire import signing, tensor_codec, tls
from torchnode.protocol.wire import torchnode_pb2 as pb
from torchnode.protocol.wire import torchnode_pb2_grpc as pb_grpc
from torchnode.protocol.wire.grpc_node import GrpcNodeClient
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeError

HIDDEN = 64  # tiny llama


# ---- the binding, unit level
def _certificate_with(key, extensions) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2000, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    from cryptography.hazmat.primitives import serialization

    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_certificate_is_bound_to_its_identity():
    me = Identity.generate()
    cert = tls.make_certificate(me)
    assert tls.bound_key(cert.cert_pem) == me.public_key
    assert x509.load_pem_x509_certificate(cert.cert_pem).subject.rfc4514_string() == f"CN={me.peer_id}"


def test_unbound_and_transplanted_bindings_are_refused():
    with pytest.raises(tls.BindingError, match="no torchnode identity binding"):
        tls.bound_key(_certificate_with(ec.generate_private_key(ec.SECP256R1()), []))
    # the binding of a real node copied into a certificate for another TLS key: its signature fails
    real = x509.load_pem_x509_certificate(tls.make_certificate(Identity.generate()).cert_pem)
    binding = real.extensions.get_extension_for_oid(tls.BINDING_OID).value
    with pytest.raises(tls.BindingError, match="bad signature"):
        tls.bound_key(_certificate_with(ec.generate_private_key(ec.SECP256R1()), [binding]))


def test_certificate_file_next_to_key(tmp_path):
    key_path = tmp_path / "node-31330.key"
    me = Identity.load_or_create(key_path)
    path = tls.certificate_path(key_path)
    assert path == tmp_path / "node-31330.tls.pem"
    first = tls.load_or_create(me, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tls.load_or_create(me, path) == first  # kept across restarts
    path.unlink()
    again = tls.load_or_create(me, path)  # regenerated when missing
    assert again != first and tls.bound_key(again.cert_pem) == me.public_key
    other = Identity.generate()
    assert tls.bound_key(tls.load_or_create(other, path).cert_pem) == other.public_key  # new identity, new cert
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        tls.load_or_create(other, path)


def test_signature_names_audience_and_request():
    client, node_a, node_b = Identity.generate(), Identity.generate(), Identity.generate()
    request = signing.sign(client, "Forward", pb.ForwardRequest(start_block=0, end_block=1), audience=node_a.public_key)
    assert signing.check("Forward", request, audience=node_a.public_key) == client.public_key
    with pytest.raises(signing.AuthError, match="addressed to another node"):
        signing.check("Forward", request, audience=node_b.public_key)
    unaddressed = signing.sign(client, "Forward", pb.ForwardRequest())
    with pytest.raises(signing.AuthError, match="names no node"):
        signing.check("Forward", unaddressed, audience=node_a.public_key)
    request.auth.audience = node_b.public_key  # re-addressed after signing
    with pytest.raises(signing.AuthError, match="bad signature"):
        signing.check("Forward", request)

    asked = signing.sign(client, "Forward", pb.ForwardRequest(), audience=node_a.public_key)
    other = signing.sign(client, "Forward", pb.ForwardRequest(), audience=node_a.public_key)
    reply = signing.sign(node_a, "Forward", pb.ForwardResponse(), in_reply_to=asked.auth.signature)
    assert signing.check("Forward", reply, reply_to=asked) == node_a.public_key
    with pytest.raises(signing.AuthError, match="answers another request"):
        signing.check("Forward", reply, reply_to=other)


# ---- real nodes
@pytest.fixture(scope="module")
def swarm_of_two(tiny_llama):
    """(coordinator multiaddr, {"tls": a node with the defaults, "plain": one with --insecure}), both on all
    4 blocks."""
    coordinator, maddr = procs.start_coordinator()
    model, join = str(tiny_llama), ("--blocks", "0:4", "--initial-peers", maddr)
    started = [procs.start_node(model, *join, wait=False), procs.start_node(model, *join, "--insecure", wait=False)]
    try:
        for node in started:
            procs.wait_ready(node)
        yield maddr, {"tls": started[0], "plain": started[1]}
    finally:
        procs.stop_all([*started, coordinator])


@pytest.fixture(scope="module")
def nodes(swarm_of_two):
    return swarm_of_two[1]


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def run(coro):
    return asyncio.run(coro)


async def info_via(address: str, expected_key: bytes | None = None, insecure: bool = False):
    client = GrpcNodeClient(address, Identity.generate(), expected_key, insecure=insecure)
    try:
        return await client.info(timeout=5)
    finally:
        await client.close()


@pytest.mark.swarm
@pytest.mark.swarm
@pytest.mark.parametrize("insecure", [True, False], ids=["insecure", "tls"])
def test_recording_proxy_reads_embeddings_only_without_tls(nodes, tiny_llama, hf, insecure):
    node = nodes["plain" if insecure else "tls"]
    ids = torch.tensor([[1, 5, 9, 14, 3, 27]])
    with TcpProxy(node.address) as proxy:
        with DistributedModel.from_pretrained(str(tiny_llama), peers=[proxy.address], insecure=insecure) as model:
            out = model.generate(ids, max_new_tokens=8)
        captured = proxy.captured
    expected = hf.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.tolist() == expected.tolist()  # the link changes nothing in the result
    with torch.no_grad():
        rows = [row.numpy().tobytes() for row in hf.get_input_embeddings()(ids)[0]]  # (T, H) float32, 256 bytes each
    assert len(captured) > len(b"".join(rows))  # the whole generation went through the proxy
    seen = [row in captured for row in rows]
    assert seen == [insecure] * len(rows)


@pytest.mark.swarm
@pytest.mark.swarm
def test_man_in_the_middle_with_own_certificate_is_refused(nodes):
    node = nodes["tls"]
    key = run(tls.pin(node.address)).key
    for certificate in (tls.make_certificate(Identity.generate()), None):  # bound to his own key; unbound
        forged = certificate or _unbound_certificate()
        with TcpProxy(node.address, forged) as mitm:
            with pytest.raises(NodeError, match="not bound to the expected key") as error:
                run(info_via(mitm.address, key))
            assert mitm.address in str(error.value)
            assert b"torchnode.Node" not in mitm.captured  # no request reached him in the clear
    # trust on first use (--peers) learns the key from the certificate: the node's own, through an honest relay
    with TcpProxy(node.address) as relay:
        assert run(info_via(relay.address)).public_key == key


def _unbound_certificate() -> tls.NodeCertificate:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return tls.NodeCertificate(pem, _certificate_with(key, []))


@pytest.mark.swarm
@pytest.mark.swarm
def test_man_in_the_middle_after_the_check_fails_the_pinned_handshake(nodes):
    node = nodes["tls"]
    key = run(tls.pin(node.address)).key
    # the certificate check sees the real node; the gRPC connection after it meets the man in the middle
    with TcpProxy(node.address, tls.make_certificate(Identity.generate()), honest=1) as mitm:
        with pytest.raises(NodeError, match="TLS handshake failed"):
            run(info_via(mitm.address, key))
        assert mitm.connections >= 2 and b"torchnode.Node" not in mitm.captured


@pytest.mark.swarm
@pytest.mark.swarm
def test_request_replayed_to_another_node_is_refused(nodes):
    tls_node, plain_node = nodes["tls"], nodes["plain"]
    me = Identity.generate()

    async def forward(address: str, request: pb.ForwardRequest, secure: bool) -> pb.ForwardResponse:
        if secure:
            pin = await tls.pin(address)
            channel = aio.secure_channel(address, pin.credentials(), options=pin.options())
        else:
            channel = aio.insecure_channel(address)
        async with channel:
            return await pb_grpc.NodeStub(channel).Forward(request, timeout=10)

    key = run(tls.pin(tls_node.address)).key
    x = torch.randn(1, 3, HIDDEN)
    request = signing.sign(
        me, "Forward", pb.ForwardRequest(hidden=tensor_codec.encode(x), start_block=0, end_block=4), audience=key
    )
    reply = run(forward(tls_node.address, request, secure=True))
    assert reply.auth.in_reply_to == request.auth.signature  # the reply names the request it answers
    with pytest.raises(aio.AioRpcError) as refused:  # captured, and sent to another node: a nonce it has never seen
        run(forward(plain_node.address, request, secure=False))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "addressed to another node" in refused.value.details()


@pytest.mark.swarm
@pytest.mark.swarm
def test_disagreeing_on_insecure_fails_fast_with_a_clear_error(nodes):
    for address, insecure, words in [
        (nodes["plain"].address, False, "does not speak TLS"),
        (nodes["tls"].address, True, "speaks TLS but this client runs with --insecure"),
    ]:
        started = time.monotonic()
        with pytest.raises(NodeError, match=words) as error:
            run(info_via(address, insecure=insecure))
        assert time.monotonic() - started < 3.0
        assert "--insecure" in str(error.value) and address in str(error.value)


@pytest.mark.swarm
@pytest.mark.swarm
def test_cli_names_the_flag_and_warns(nodes, tiny_llama):
    assert "warning: --insecure" in nodes["plain"].log and "plaintext, --insecure" in nodes["plain"].log
    assert "warning" not in nodes["tls"].log and "(TLS)" in nodes["tls"].log
    result = procs.run_cli(
        "generate", str(tiny_llama), "--peers", nodes["plain"].address, "--max-new-tokens", "2", "hi"
    )
    assert result.returncode == 1
    assert "does not speak TLS" in result.stderr and "--insecure" in result.stderr


@pytest.mark.swarm
@pytest.mark.swarm
def test_swarm_command_shows_each_link(swarm_of_two, tiny_llama):
    maddr, nodes = swarm_of_two
    result = procs.run_cli("swarm", str(tiny_llama), "--initial-peers", maddr)
    assert result.returncode == 0, result.stderr
    rows = {
        name: next(line for line in result.stdout.splitlines() if node.peer_id[:12] in line)
        for name, node in nodes.items()
    }
    assert "TLS" in rows["tls"] and "plaintext" not in rows["tls"]
    assert "plaintext" in rows["plain"] and "unhealthy" in rows["plain"]  # encrypted clients cannot use it
