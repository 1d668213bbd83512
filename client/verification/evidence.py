"""Fraud proofs: when a node is caught lying, the client keeps what the node signed, so anyone holding the
weights can check the accusation without trusting the client.

A proof is the whole stream of one inference session with the node: every request (signed by the client,
addressed to the node's key, carrying the inputs and positions) and every reply (signed by the node,
naming the request it answers). `check_evidence` verifies every signature, replays the requests through
its own copy of the blocks exactly as the node received them, and says at which step the node's signed
output differs from the right one beyond the tolerance of the node's dtype.

File: `$TORCHNODE_HOME/evidence/{peer id}-{UTC time}.evidence`, msgpack (no pickle):
    {"format": FORMAT, "model", "revision", "address", "public_key", "dtype", "start", "end", "position",
     "reporter", "created", "exchanges": [[request bytes, reply bytes], ...], "adapter", "adapter_sha256"}

A session with a LoRA adapter is replayed with it: the node's first signed request names the adapter (so
the node cannot deny it was asked for it), and the file adds the sha256 of the adapter's weights file the
reporter checked with ("" if its judges were other nodes), since a name alone does not pin the weights.
Whoever checks the proof gives the adapter's files (`check-evidence --adapter`); other files are refused.

A client that reads the DHT also publishes a signed report naming the node and the file's sha256
(`fraud_report`, protocol/dht/fraud_reports.py), which dashboards count: a claim whose proof is the file.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch
from hivemind.utils.timed_storage import get_dht_time

from ...models.checkpoint import Checkpoint
from ...models.families import load_span
from ...models.lora import AdapterBank, AdapterSource, find_adapter
from ...protocol.dht.fraud_reports import DEFAULT_REPORT_LIFETIME, FraudReport
from ...protocol.wire import signing, tensor_codec
from ...protocol.wire import torchnode_pb2 as pb
from ...protocol.wire.identity import Identity, peer_id_of, torchnode_home
from .opinions import run_span
from .verifier import Finding, first_mismatch, tolerance

FORMAT = "torchnode-evidence/1"
MAX_EVIDENCE_BYTES = 1 << 30


class EvidenceError(ValueError):
    """A file that is not a well-formed, correctly signed fraud proof."""


def evidence_dir() -> Path:
    return torchnode_home() / "evidence"


def write_evidence(finding: Finding, model: str, revision: str, reporter: bytes) -> Path | None:
    """Writes the node's signed exchanges as a fraud proof; None when there are none (an in-process node)."""
    if not finding.exchanges:
        return None
    record = {
        "format": FORMAT,
        "model": model,
        "revision": revision,
        "address": finding.node.address,
        "public_key": finding.public_key,
        "dtype": finding.dtype,
        "start": finding.start,
        "end": finding.end,
        "position": finding.position,
        "reporter": reporter,
        "created": time.time(),
        "exchanges": [list(e) for e in finding.exchanges],
        "adapter": finding.adapter,
        "adapter_sha256": adapter_digest(finding.adapter_files) if finding.adapter_files is not None else "",
    }
    folder = evidence_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{finding.peer_id}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{finding.position}.evidence"
    path.write_bytes(msgpack.packb(record, use_bin_type=True))
    return path


def adapter_digest(adapter: AdapterSource) -> str:
    """sha256 of the adapter's weights file: what pins an adapter, whose name anyone may reuse."""
    h = hashlib.sha256()
    with open(adapter.weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fraud_report(
    finding: Finding, model: str, path: Path, reporter: Identity, lifetime: float = DEFAULT_REPORT_LIFETIME
) -> FraudReport | None:
    """The signed DHT report naming the liar and the hash of the evidence file at `path`; None when the
    node's key is unknown (nothing to name it by)."""
    if len(finding.public_key) == 0:
        return None
    return FraudReport(
        peer_id=reporter.peer_id,
        public_key=reporter.public_key,
        node_peer_id=peer_id_of(finding.public_key),
        node_address=finding.node.address,
        model=model,
        start=finding.start,
        end=finding.end,
        evidence_sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        expiration=get_dht_time() + lifetime,
    )


@dataclass(frozen=True)
class Verdict:
    proven: bool  # the node signed an output that is wrong for the inputs it signed a reply to
    message: str
    step: int | None = None
    position: int | None = None


def read_evidence(path: Path) -> dict:
    data = Path(path).read_bytes()
    if len(data) > MAX_EVIDENCE_BYTES:
        raise EvidenceError(f"{path} is larger than {MAX_EVIDENCE_BYTES} bytes")
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as e:
        raise EvidenceError(f"{path} is not an evidence file: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise EvidenceError(f"{path} is not an evidence file (format {FORMAT!r})")
    return record


def _exchanges(record: dict) -> list[tuple[pb.Step, pb.StepResult]]:
    """Parses the stream and checks every signature and that it is one session, step by step."""
    key = record["public_key"]
    pairs: list[tuple[pb.Step, pb.StepResult]] = []
    for i, (raw_request, raw_reply) in enumerate(record["exchanges"]):
        request, reply = pb.Step.FromString(raw_request), pb.StepResult.FromString(raw_reply)
        try:
            signing.check("Inference", request, audience=key)
            signing.check("Inference", reply, expected_key=key, reply_to=request)
        except signing.AuthError as e:
            raise EvidenceError(f"step {i}: {e}") from None
        if pairs and request.session_id != pairs[0][0].session_id:
            raise EvidenceError(f"step {i} belongs to another session")
        if request.step != i or reply.step != i or reply.session_id != request.session_id:
            raise EvidenceError(f"exchange {i} is not step {i} of the session")
        pairs.append((request, reply))
    if not pairs:
        raise EvidenceError("no exchanges in the evidence")
    return pairs


def check_evidence(path: Path, ckpt: Checkpoint, adapter: str | None = None) -> Verdict:
    """Verifies signatures, replays the session through the blocks locally and compares every reply.

    adapter: the directory or hub id of the LoRA adapter the session named, needed (and only accepted) when
    it named one; its weights must be those the reporter checked with, when the file records them."""
    record = read_evidence(path)
    if record["revision"] != ckpt.revision:
        raise EvidenceError(f"the evidence is about revision {record['revision']}, MODEL is {ckpt.revision}")
    pairs = _exchanges(record)
    opening = pairs[0][0]
    start, end = opening.start_block, opening.end_block
    source = _session_adapter(record, opening.adapter, adapter)
    span = load_span(ckpt, start, end, torch.float32)
    lora = AdapterBank(span, start, end, [source]).get(source.name) if source is not None else None
    caches = span.new_caches(start, end, opening.batch_size or 1, opening.max_length)
    peer = peer_id_of(record["public_key"])
    for request, reply in pairs:
        if not request.HasField("hidden"):
            continue
        x = tensor_codec.decode(request.hidden).float()  # (B, T, H)
        right = run_span(span, lora, x, request.position, start, end, caches)
        claimed = tensor_codec.decode(reply.hidden)
        tol = tolerance(tensor_codec.dtype_from_name(record["dtype"]), claimed.dtype, x.dtype)
        wrong, error = first_mismatch(claimed, right, tol)
        if wrong is not None:
            position = request.position + wrong
            return Verdict(
                True,
                f"PROVEN: node {record['address']} (peer {peer}) signed a wrong output for blocks {start}:{end} at "
                f"step {request.step}, position {position} (error {error:.3g} > tolerance {tol:.3g})",
                request.step,
                position,
            )
    return Verdict(False, f"NOT PROVEN: every output node {peer} signed is right within tolerance ({len(pairs)} steps)")


def _session_adapter(record: dict, named: str, given: str | None) -> AdapterSource | None:
    """The adapter files to replay with: those `given`, checked against what the signed session named and
    the digest the reporter recorded."""
    if not named:
        if given:
            raise EvidenceError("the evidence is about a session without an adapter: check it without --adapter")
        return None
    if not given:
        raise EvidenceError(
            f"the evidence is about a session with adapter {named!r}: give its files with --adapter"
            " (its directory or hub id)"
        )
    source = find_adapter(given)
    if source.name != named:
        raise EvidenceError(f"--adapter {given} is adapter {source.name!r}, the session named {named!r}")
    recorded = record.get("adapter_sha256", "")
    if recorded and adapter_digest(source) != recorded:
        raise EvidenceError(
            f"--adapter {given} holds other weights than the reporter's {named!r} (sha256 {recorded}): the proof "
            "holds only for the reporter's adapter files"
        )
    return source
