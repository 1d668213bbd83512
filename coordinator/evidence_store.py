"""Fraud proofs the health monitor holds: uploaded by the clients that caught a node, served to anyone, and
re-checked here where the monitor has the weights.

A fraud report in the DHT is a claim anyone can sign (protocol/dht/fraud_reports.py); the evidence file it
names by sha256 is what proves it (client/verification/evidence.py). A reporter uploads that file here
(`POST /api/v1/evidence`, coordinator/dashboard_app.py); anyone fetches it back by its hash (`GET
/api/v1/evidence/{sha256}`), and a monitor started with `--check-model MODEL` replays it with `torchnode
check-evidence FILE MODEL` in a subprocess (the coordinator never loads a model itself, nor imports the
client), one file at a time. Each file ends up `proven` (the node signed a wrong output), `not proven`
(every output it signed is right: the reporter lied, or erred), `invalid` (not a proof: bad signatures, a
pushed input that is not what the node signed, another revision), or `unchecked` (no weights here). Only
`proven` files mark a node dishonest on the dashboard.

Bounded: a file of at most `max_bytes`; one file per (reporter key, accused node), the latest replacing the
one before, as in the DHT; at most `max_files` in all (the oldest go first), and at most `max_pending`
waiting for a check (more are refused, with 503, until the queue drains).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..protocol.dht.fraud_reports import unpack_evidence
from ..protocol.wire.identity import PUBLIC_KEY_BYTES, peer_id_of

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_FILES = 256
DEFAULT_MAX_PENDING = 16
DEFAULT_CHECK_TIMEOUT = 600.0  # seconds one `check-evidence` may take
STATUSES = ("pending", "proven", "not proven", "invalid", "unchecked")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class EvidenceRejected(ValueError):
    """An upload that is not kept; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EvidenceLimits:
    max_bytes: int = DEFAULT_MAX_BYTES  # one file (--evidence-max-bytes)
    max_files: int = DEFAULT_MAX_FILES  # kept at once (--evidence-max-files)
    max_pending: int = DEFAULT_MAX_PENDING  # files waiting for a re-check
    check_timeout: float = DEFAULT_CHECK_TIMEOUT

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_files < 1 or self.max_pending < 1 or self.check_timeout <= 0:
            raise ValueError("evidence limits must be positive")


@dataclass(frozen=True)
class Evidence:
    sha256: str
    node_peer_id: str  # the accused node (its key signed the replies in the file)
    reporter_peer_id: str  # the client that wrote the file
    model: str
    start: int
    end: int
    received: float  # unix time
    status: str = "pending"
    message: str = ""  # check-evidence's verdict line, or why it was not checked


@dataclass
class EvidenceStore:
    folder: Path
    check_models: Sequence[str] = ()  # checkpoints (`check-evidence`'s MODEL) this monitor re-checks with
    limits: EvidenceLimits = field(default_factory=EvidenceLimits)

    def __post_init__(self):
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.entries: dict[str, Evidence] = {}  # sha256 -> evidence, oldest first
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    # ---- uploads
    def add(self, data: bytes) -> Evidence:
        """Keeps an uploaded file (if well-formed enough to name its node and reporter) and queues its check."""
        if len(data) > self.limits.max_bytes:
            raise EvidenceRejected(f"evidence is {len(data)} bytes, more than {self.limits.max_bytes}", 413)
        sha = hashlib.sha256(data).hexdigest()
        if sha in self.entries:
            return self.entries[sha]
        entry = _header(data, sha)
        checkable = bool(self.check_models)
        if checkable and sum(e.status == "pending" for e in self.entries.values()) >= self.limits.max_pending:
            raise EvidenceRejected(f"{self.limits.max_pending} files are waiting for a check: try again later", 503)
        for old in [e for e in self.entries.values() if (e.reporter_peer_id, e.node_peer_id) == _pair(entry)]:
            self._drop(old.sha256)  # one live file per reporter and node: the latest wins
        while len(self.entries) >= self.limits.max_files:
            self._drop(next(iter(self.entries)))
        self.path(sha).write_bytes(data)
        if not checkable:
            entry = replace(entry, status="unchecked", message="this monitor holds no weights (--check-model)")
        self.entries[sha] = entry
        if checkable:
            self.queue.put_nowait(sha)
        return entry

    def path(self, sha: str) -> Path:
        if not _SHA256.fullmatch(sha):
            raise ValueError(f"not a sha256: {sha!r}")
        return self.folder / f"{sha}.evidence"

    def about(self, node_peer_id: str) -> list[Evidence]:
        return [e for e in self.entries.values() if e.node_peer_id == node_peer_id]

    def _drop(self, sha: str) -> None:
        self.entries.pop(sha, None)
        with contextlib.suppress(OSError):
            self.path(sha).unlink()

    # ---- re-checks
    async def run_checks(self) -> None:
        """Re-checks queued files one at a time, forever (the monitor's task)."""
        while True:
            sha = await self.queue.get()
            try:
                entry = self.entries.get(sha)
                if entry is None:  # replaced or evicted meanwhile
                    continue
                status, message = await self._check(self.path(sha))
                if sha in self.entries:
                    self.entries[sha] = replace(entry, status=status, message=message)
                    log.info("evidence %s against %s: %s", sha[:12], entry.node_peer_id, message)
            finally:
                self.queue.task_done()  # `queue.join()`: every upload so far re-checked

    async def _check(self, path: Path) -> tuple[str, str]:
        """`torchnode check-evidence FILE MODEL` with each model held, until one is about the file's revision."""
        last = "no model to check with"
        for model in self.check_models:
            code, out = await _run([sys.executable, "-m", "torchnode", "check-evidence", str(path), model], self.limits)
            if code == 0:
                return "proven", out
            if code == 2:
                return "not proven", out
            last = out
            if "revision" not in out:  # about this model's revision, and no proof: nothing else will do better
                return "invalid", out
        return ("unchecked" if "revision" in last else "invalid"), last


async def _run(cmd: list[str], limits: EvidenceLimits) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limits.check_timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 1, f"check-evidence took longer than {limits.check_timeout:.0f} s"
    lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    return proc.returncode, (lines[-1].strip() if lines else f"check-evidence exited with {proc.returncode}")


def _pair(entry: Evidence) -> tuple[str, str]:
    return entry.reporter_peer_id, entry.node_peer_id


def _header(data: bytes, sha: str) -> Evidence:
    """Who a file accuses and who wrote it: enough to keep and bound it. Signatures are check-evidence's job."""
    try:
        record = unpack_evidence(data)
    except ValueError as e:
        raise EvidenceRejected(str(e)) from None
    node, reporter = record.get("public_key"), record.get("reporter")
    if not all(isinstance(k, bytes) and len(k) == PUBLIC_KEY_BYTES for k in (node, reporter)):
        raise EvidenceRejected("the evidence must name the node's and the reporter's 32-byte public keys")
    model, start, end = record.get("model"), record.get("start"), record.get("end")
    if not isinstance(model, str) or not isinstance(start, int) or not isinstance(end, int):
        raise EvidenceRejected("the evidence must name its model and blocks")
    return Evidence(sha, peer_id_of(node), peer_id_of(reporter), model[:128], start, end, time.time())
