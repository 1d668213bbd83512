"""Fraud reports: a client that caught a node lying says so in the DHT, signed, for dashboards to count.

A report is only a claim: anyone can generate a key and sign one. What makes it worth reading is the
evidence file it names by hash (client/verification/evidence.py): its holder can hand it over, and anyone with the
weights re-checks it with `torchnode check-evidence FILE MODEL`. The dashboard shows the count and the
hashes, nothing more.

DHT key `report_key(accused peer id)`, subkey = the reporter's peer id (one live report per reporter and
node: the latest wins), value = the same signed envelope as server records (dht_records.sign_fields):

    msgpack({"record": <msgpack map of the FraudReport fields>, "signature": <Ed25519 by the reporter>})

`record_validator.FraudReportValidator` keeps anything else out of these keys: a valid signature, the key
of the node the report names, the subkey of its signer, an expiration no later than signed and at most
MAX_REPORT_LIFETIME ahead. Store and lookup run inside the DHT's own process, as in `dht_network.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from functools import partial

import hivemind
import msgpack
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import DHTExpiration, get_dht_time

from ..wire.identity import Identity
from .records import (
    RecordError,
    check_span,
    decode_signed,
    encode_signed,
    host_port,
    non_negative_float,
    record_model,
    signer_key,
)
from .store import read_signed, store_signed

EVIDENCE_FORMAT = "torchnode-evidence/1"  # the file a report names (client/verification/evidence.py writes it)


def unpack_evidence(data: bytes) -> dict:
    """An evidence file's record, read by the client's check-evidence and by a monitor's evidence store alike;
    ValueError (starting "not an evidence file") for anything else. Signatures are check-evidence's job."""
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as e:
        raise ValueError(f"not an evidence file: {e}") from None
    if not isinstance(record, dict) or record.get("format") != EVIDENCE_FORMAT:
        raise ValueError(f"not an evidence file (format {EVIDENCE_FORMAT!r})")
    return record


REPORT_PREFIX = "_torchnode.reports:"  # never a block key (those end in ".{digits}"), nor another fixed key
DEFAULT_REPORT_LIFETIME = 24 * 3600.0  # seconds a client's report lives in the DHT
MAX_REPORT_LIFETIME = 7 * 24 * 3600.0  # validators refuse reports that claim to live longer from now
_PEER_ID = re.compile(r"[0-9a-f]{32}")  # identity.peer_id_of: 32 hex chars
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FraudReport:
    peer_id: str  # the reporter's peer id (the signer)
    public_key: bytes  # the reporter's raw Ed25519 key, 32 bytes
    node_peer_id: str  # the node caught lying
    node_address: str  # "host:port" it was reached at
    model: str
    start: int  # blocks [start, end) it lied about
    end: int
    evidence_sha256: str  # hex sha256 of the evidence file (client/verification/evidence.py) that proves it
    expiration: float  # absolute DHT time, equal to the DHT entry's expiration_time


_FIELD_NAMES = tuple(f.name for f in fields(FraudReport))


def report_key(node_peer_id: str) -> str:
    """The DHT key under which reports about `node_peer_id` are stored."""
    if not isinstance(node_peer_id, str) or not _PEER_ID.fullmatch(node_peer_id):
        raise ValueError(f"not a peer id (32 hex chars): {node_peer_id!r}")
    return REPORT_PREFIX + node_peer_id


def encode_report(identity: Identity, report: FraudReport) -> bytes:
    """Signs `report` with the reporter's `identity`: the bytes to store under its node's report key."""
    body_fields = asdict(report) | {"expiration": float(report.expiration)}
    return encode_signed(identity, report, body_fields, check_report_fields)


def decode_report(value: object) -> FraudReport:
    """Parses and verifies a report value; raises RecordError saying what is wrong with it."""
    return decode_signed(value, check_report_fields, "fraud report")


def check_report_fields(raw: dict) -> FraudReport:
    """Type and range checks of a decoded field map; unknown extra fields are ignored (newer versions)."""
    missing = [name for name in _FIELD_NAMES if name not in raw]
    if missing:
        raise RecordError(f"fraud report lacks fields {missing}")
    public_key = signer_key(raw)
    node = raw["node_peer_id"]
    if not isinstance(node, str) or not _PEER_ID.fullmatch(node):
        raise RecordError(f"node_peer_id {node!r} is not a peer id (32 hex chars)")
    if node == raw["peer_id"]:
        raise RecordError("a report cannot name its own reporter")
    address, model = host_port(raw, "node_address"), record_model(raw)
    start, end = raw["start"], raw["end"]
    check_span(start, end)
    evidence = raw["evidence_sha256"]
    if not isinstance(evidence, str) or not _SHA256.fullmatch(evidence):
        raise RecordError(f"evidence_sha256 {evidence!r} is not 64 lowercase hex digits")
    return FraudReport(
        peer_id=raw["peer_id"],
        public_key=public_key,
        node_peer_id=node,
        node_address=address,
        model=model,
        start=start,
        end=end,
        evidence_sha256=evidence,
        expiration=non_negative_float(raw["expiration"], "expiration"),
    )


def parse_report(
    subkey: object,
    value: object,
    node_peer_id: str,
    expiration_time: DHTExpiration | None = None,
    now: DHTExpiration | None = None,
) -> FraudReport | None:
    """One entry under `report_key(node_peer_id)` read back safely: the report if it is signed, stored under
    its reporter's id, names that node, is unexpired; None otherwise."""
    report = read_signed(subkey, value, decode_report, "fraud report", expiration_time, now)
    return report if report is not None and report.node_peer_id == node_peer_id else None


def publish_report(dht: hivemind.DHT, identity: Identity, report: FraudReport, return_future: bool = False) -> bool:
    """Stores the signed `report` under its node's report key (subkey = the reporter's peer id)."""
    if report.expiration <= get_dht_time():
        raise ValueError("report.expiration is in the past")
    value = encode_report(identity, report)
    return store_signed(dht, report_key(report.node_peer_id), report.peer_id, value, report.expiration, return_future)


def find_reports(
    dht: hivemind.DHT, node_peer_ids: Iterable[str], return_future: bool = False
) -> dict[str, list[FraudReport]]:
    """{node peer id: its valid, unexpired reports, by reporter} for each of `node_peer_ids`, in one lookup."""
    peers = list(dict.fromkeys(node_peer_ids))
    for peer in peers:
        report_key(peer)  # validates
    return dht.run_coroutine(partial(_find_reports, peers=peers), return_future=return_future)


# Coroutines below run inside the DHT process (they must be module-level to be picklable).


async def _find_reports(_dht: hivemind.DHT, node: DHTNode, peers: list[str]) -> dict[str, list[FraudReport]]:
    if not peers:
        return {}
    keys = [report_key(peer) for peer in peers]
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # = get(latest=True)
    now, reports = get_dht_time(), {}
    for peer, key in zip(peers, keys, strict=True):
        entries = found.get(key)
        parsed = []
        if entries is not None and isinstance(entries.value, dict):  # a plain value under a report key is junk
            for subkey, entry in entries.value.items():
                report = parse_report(subkey, entry.value, peer, entry.expiration_time, now)
                if report is not None:
                    parsed.append(report)
        reports[peer] = sorted(parsed, key=lambda r: r.peer_id)
    return reports
