"""TLS for node links: each node makes its own certificate and binds it to its Ed25519 identity.

No certificate authority and no hostnames: identities are the keys. gRPC's TLS (BoringSSL) refuses
Ed25519 certificates (NO_COMMON_SIGNATURE_ALGORITHMS with grpcio 1.85), so a node's TLS key is ECDSA
P-256, and its self-signed certificate carries a binding extension: the node's Ed25519 public key and
that key's signature over the certificate's public key (SubjectPublicKeyInfo).

A client first fetches the certificate in a plain TLS handshake and checks the binding against the key
it expects (from the DHT record, or learned here on first use). It then gives exactly that certificate
to gRPC as the channel's only root, so gRPC's own handshake proves the node holds the TLS private key.
A man in the middle can present neither his own certificate (not bound to the expected key) nor the
node's (he lacks its TLS key); one who steps in after the check fails gRPC's handshake against the pin.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_of, verify

# An OID made from a random UUID (ITU-T X.667 arc 2.25): no registration needed, no collision expected.
BINDING_OID = x509.ObjectIdentifier("2.25.327692169720070077065061731590641723522")
BINDING_CONTEXT = b"torchnode tls binding v1\0"  # the identity signs this + the TLS public key (SPKI DER)
NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC)  # the binding, not a date, is what counts
DEFAULT_FETCH_TIMEOUT = 5.0
# extnValue: SEQUENCE { OCTET STRING (32) identity key, OCTET STRING (64) signature }, in fixed-length DER
_DER_PREFIX = bytes([0x30, 2 + PUBLIC_KEY_BYTES + 2 + SIGNATURE_BYTES, 0x04, PUBLIC_KEY_BYTES])
_DER_MIDDLE = bytes([0x04, SIGNATURE_BYTES])


class BindingError(Exception):
    """A certificate that is not bound to an Ed25519 identity (no binding, or a forged one)."""


@dataclass(frozen=True)
class NodeCertificate:
    """A node's TLS private key and certificate, both PEM."""

    key_pem: bytes
    cert_pem: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def server_name(public_key: bytes) -> str:
    """The name in a node's certificate, and the name a client checks: the node's peer id."""
    return peer_id_of(public_key)


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_certificate(identity: Identity) -> NodeCertificate:
    """A fresh ECDSA P-256 key and a self-signed certificate bound to `identity`."""
    key = ec.generate_private_key(ec.SECP256R1())
    signature = identity.sign(BINDING_CONTEXT + _spki(key.public_key()))
    binding = _DER_PREFIX + identity.public_key + _DER_MIDDLE + signature
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name(identity.public_key))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name(identity.public_key))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # it is its own root
        .add_extension(x509.UnrecognizedExtension(BINDING_OID, binding), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return NodeCertificate(key_pem, cert.public_bytes(serialization.Encoding.PEM))


def bound_key(cert_pem: bytes) -> bytes:
    """The Ed25519 public key `cert_pem` is bound to; BindingError if it is bound to none."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise BindingError(f"unreadable certificate: {e}") from None
    try:
        extension = cert.extensions.get_extension_for_oid(BINDING_OID).value
    except x509.ExtensionNotFound:
        raise BindingError("the certificate carries no torchnode identity binding") from None
    if not isinstance(extension, x509.UnrecognizedExtension):  # cryptography parses no extension of ours
        raise BindingError("the certificate's identity binding is not an opaque extension")
    binding = extension.value
    n = len(_DER_PREFIX)
    if len(binding) != n + PUBLIC_KEY_BYTES + len(_DER_MIDDLE) + SIGNATURE_BYTES or not (
        binding.startswith(_DER_PREFIX) and binding[n + PUBLIC_KEY_BYTES :].startswith(_DER_MIDDLE)
    ):
        raise BindingError("malformed identity binding in the certificate")
    public_key = binding[n : n + PUBLIC_KEY_BYTES]
    signature = binding[n + PUBLIC_KEY_BYTES + len(_DER_MIDDLE) :]
    if not verify(public_key, signature, BINDING_CONTEXT + _spki(cert.public_key())):
        raise BindingError(f"the certificate's binding to peer {peer_id_of(public_key)} has a bad signature")
    return public_key


def certificate_path(identity_path: Path) -> Path:
    """Where a node keeps its TLS key and certificate: next to its identity key (node-31330.tls.pem)."""
    return identity_path.with_name(identity_path.stem + ".tls.pem")


def load_or_create(identity: Identity, path: Path) -> NodeCertificate:
    """The certificate at `path` (key + certificate, mode 0600), made anew if missing or bound to
    another identity (the identity key was replaced)."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"TLS key {path} is readable by others; run: chmod 600 {path}")
        pem = path.read_bytes()
        marker = b"-----BEGIN CERTIFICATE-----"
        if marker in pem:
            key_pem, cert_pem = pem.split(marker, 1)
            cert = NodeCertificate(key_pem, marker + cert_pem)
            try:
                if bound_key(cert.cert_pem) == identity.public_key:
                    return cert
            except BindingError:
                pass
        path.unlink()
    cert = make_certificate(identity)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.key_pem + cert.cert_pem)
    return cert


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"node address {address!r} is not host:port")
    return host.strip("[]"), int(port)


async def fetch_certificate(address: str, timeout: float | None = DEFAULT_FETCH_TIMEOUT) -> bytes:
    """The certificate (PEM) a node presents, unverified: the caller checks its binding.

    Raises ssl.SSLError when the peer does not speak TLS, OSError when it cannot be reached, and
    TimeoutError when the handshake does not finish in `timeout` seconds.
    """
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # no CA: trust comes from the binding, checked by the caller
    context.set_alpn_protocols(["h2"])
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context), timeout)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    if not der:
        raise ssl.SSLError(f"{address} presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode()


@dataclass(frozen=True)
class Pin:
    """A node's certificate, checked to be bound to `key`: all that a channel to the node trusts."""

    cert_pem: bytes
    key: bytes  # the node's Ed25519 public key

    def credentials(self) -> grpc.ChannelCredentials:
        """Trust exactly this certificate, nothing else."""
        return grpc.ssl_channel_credentials(root_certificates=self.cert_pem)

    def options(self) -> list[tuple[str, str]]:
        """The name gRPC checks is the node's peer id (the certificate's name), not a hostname."""
        return [("grpc.ssl_target_name_override", server_name(self.key))]


async def pin(address: str, expected_key: bytes | None = None, timeout: float | None = DEFAULT_FETCH_TIMEOUT) -> Pin:
    """The certificate of the node at `address`, bound to `expected_key` (any key when None: trust on
    first use). Raises BindingError when it is not, and what `fetch_certificate` raises when the node
    cannot be reached or does not speak TLS."""
    cert = await fetch_certificate(address, timeout)
    key = bound_key(cert)
    if expected_key is not None and key != expected_key:
        raise BindingError(f"bound to peer {peer_id_of(key)}, expected peer {peer_id_of(expected_key)}")
    return Pin(cert, key)
