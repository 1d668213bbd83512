"""Fraud proofs: when a node is caught lying, the client keeps what the node signed, so anyone holding the
weights can check the accusation without trusting the client.

A proof is the whole stream of one inference session with the node: every request (signed by the client,
addressed to the node's key, carrying the inputs and positions) and every reply (signed by the node,
naming the request it answers). `check_evidence` verifies every signature, replays the requests through
its own copy of the blocks exactly as the node received them, and says at which step the node's signed
output differs from the right one beyond the tolerance of the node's dtype.

File: `$TORCHNODE_HOME/evidence/{peer id}-{UTC time}.evidence`, msgpack (no pickle):
    {"format": EVIDENCE_FORMAT, "model", "revision", "address", "public_key", "dtype", "quant", "info", "start", "end",
     "position", "reporter", "created", "exchanges": [[request bytes, reply bytes, pushed input bytes], ...],
     "adapter", "adapter_sha256"}

`info` is the node's signed Info reply (its dtype and quantization, so the replay uses the weights the node
said it has). A step whose input came by node-to-node push carries a token instead of the input: the
client's copy ships beside it (tensor_codec bytes) and must hash to the `input_digest` the node signed in
its reply; b"" for a step whose input is in its request.

A session with a LoRA adapter is replayed with it: the node's first signed request names the adapter (so
the node cannot deny it was asked for it), and the file adds the sha256 of the adapter's weights file the
reporter checked with ("" if its judges were other nodes), since a name alone does not pin the weights.
Whoever checks the proof gives the adapter's files (`check-evidence --adapter`); other files are refused.

A client that reads the DHT also publishes a signed report naming the node and the file's sha256
(`fraud_report`, protocol/dht/fraud_reports.py), which dashboards count: a claim whose proof is the file.
With `--report-to URL` it also uploads the file to that health monitor (`upload_evidence`), which serves it
to anyone and re-checks it: only proofs found proven there mark the node dishonest on its dashboard.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch
from hivemind.utils.timed_storage import get_dht_time

from ...models.checkpoint import Checkpoint
from ...models.families import load_span
from ...models.lora import AdapterBank, AdapterSource, find_adapter
from ...models.quantization import QUANT_MODES
from ...protocol.dht.fraud_reports import DEFAULT_REPORT_LIFETIME, EVIDENCE_FORMAT, FraudReport, unpack_evidence
from ...protocol.wire import signing, tensor_codec
from ...protocol.wire import torchnode_pb2 as pb
from ...protocol.wire.identity import Identity, peer_id_of, torchnode_home
from ...protocol.wire.node_client import tensor_digest
from ..precision import Precision, tolerance
from .opinions import run_span
from .verifier import Finding, first_mismatch

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
        "format": EVIDENCE_FORMAT,
        "model": model,
        "revision": revision,
        "address": finding.node.address,
        "public_key": finding.public_key,
        "dtype": finding.dtype,
        "quant": finding.quant,
        "info": finding.signed_info,
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


DEFAULT_UPLOAD_TIMEOUT = 30.0


def upload_evidence(monitor: str, path: Path, timeout: float = DEFAULT_UPLOAD_TIMEOUT) -> dict:
    """POSTs an evidence file to a health monitor (`--report-to`: its dashboard URL), which keeps it, serves it
    to anyone and re-checks it where it holds the weights (coordinator/evidence_store.py). Returns the
    monitor's answer (the file's sha256 and status); raises OSError (urllib's errors are) when it refuses."""
    url = monitor.rstrip("/") + "/api/v1/evidence"
    request = urllib.request.Request(
        url, data=Path(path).read_bytes(), method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.load(reply)


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
        return unpack_evidence(data)
    except ValueError as e:
        raise EvidenceError(f"{path} is {e}") from None


def _exchanges(record: dict) -> list[tuple[pb.Step, pb.StepResult, torch.Tensor | None]]:
    """Parses the stream and checks every signature and that it is one session, step by step."""
    key = record["public_key"]
    pairs: list[tuple[pb.Step, pb.StepResult, torch.Tensor | None]] = []
    for i, exchange in enumerate(record["exchanges"]):
        if (
            not isinstance(exchange, list)
            or len(exchange) not in (2, 3)
            or not all(isinstance(e, bytes) for e in exchange)
        ):
            raise EvidenceError(f"exchange {i} is not [request, reply] or [request, reply, pushed input] bytes")
        raw_request, raw_reply, pushed = (*exchange, b"")[:3]
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
        pairs.append((request, reply, _input(i, request, reply, pushed)))
    if not pairs:
        raise EvidenceError("no exchanges in the evidence")
    for i, (request, _, x) in enumerate(pairs):  # a step with no input counts only if the next one overwrites it
        if x is None and request.push_token and (i + 1 == len(pairs) or pairs[i + 1][0].position > request.position):
            raise EvidenceError(f"step {i} got its input by push and the evidence does not ship the client's copy")
    return pairs


def _input(i: int, request: pb.Step, reply: pb.StepResult, pushed: bytes) -> torch.Tensor | None:
    """Step i's input (B, T, H): in its signed request, or (pushed from another node) the client's copy shipped
    beside it, which must be what the node signed the digest of (`input_digest` in its reply)."""
    if request.HasField("hidden"):
        return tensor_codec.decode(request.hidden)
    if not pushed:
        return None
    try:
        x = tensor_codec.from_bytes(pushed)
    except tensor_codec.TensorFormatError as e:
        raise EvidenceError(f"step {i}: the pushed input is malformed: {e}") from None
    if not request.push_token or tensor_digest(x) != reply.input_digest:
        raise EvidenceError(
            f"step {i}: the pushed input shipped with the evidence is not the one the node signed it received "
            "(its digest differs from the reply's input_digest)"
        )
    return x


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
    precision = _precision(record)  # what the node signed it computes in (its Info), else what the file says
    span = load_span(ckpt, start, end, torch.float32, precision.quant)  # the node's weights, as it said it has them
    lora = AdapterBank(span, start, end, [source]).get(source.name) if source is not None else None
    caches = span.new_caches(start, end, opening.batch_size or 1, opening.max_length)
    peer = peer_id_of(record["public_key"])
    for request, reply, x in pairs:
        if x is None:  # the opening step without input, or a pushed step the next one overwrites
            continue
        x = x.float()  # (B, T, H)
        right = run_span(span, lora, x, request.position, start, end, caches)
        claimed = tensor_codec.decode(reply.hidden)
        tol = tolerance(precision, Precision("float32", precision.quant), wire=claimed.dtype)
        assert tol is not None  # the same quantization on both sides: always comparable
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


def _precision(record: dict) -> Precision:
    """The precision the node said it computes in: its signed Info reply when the file has one (so a reporter
    cannot judge an int8 node as if it had said float32), else the file's fields (older files: unquantized)."""
    dtype, quant = record.get("dtype", "float32"), record.get("quant", "none")
    if record.get("info"):
        try:
            info = pb.InfoResponse.FromString(record["info"])
            signing.check("Info", info, expected_key=record["public_key"])
        except (signing.AuthError, ValueError, TypeError) as e:
            raise EvidenceError(f"the node's Info in the evidence is not signed by it: {e}") from None
        dtype, quant = info.dtype, info.quant or "none"
    if dtype not in ("float32", "bfloat16", "float16") or quant not in QUANT_MODES:
        raise EvidenceError(f"the evidence names an unknown precision: dtype {dtype!r}, quant {quant!r}")
    return Precision(dtype, quant)


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
