"""Don't trust, verify: every hop's outputs are recomputed elsewhere, window by window, before use.

Signing proves who answered, not what. With verification on, the session reports each hop's outputs
here (`observe`). Once W new positions have gone through the chain, each hop's kept inputs of that window
(`Hop.history`) are run as ONE prefill by an *opinion*: an ordinary inference session on another node
or chain covering the same blocks (the checked node never sees anything unusual, so a node that lies
only on decode steps, at random, or when it thinks nobody looks is caught all the same), or the
client's own copy of the blocks when it holds the weights. Opinions are of like precision (client/precision.py):
an int8 node is judged by int8 nodes or by the client recomputing in int8, never by float32 weights, whose
outputs differ from any int8 node's far beyond rounding. The two are compared within a tolerance derived
from the dtypes on both sides (`precision.tolerance`). A mismatch gets a third opinion (the client's own
computation if it can, else another route); whoever disagrees with it lied. The liar is reported to
the caller (`on_dishonest`: ban, warning, evidence), its hop is re-routed, and `check` returns the
first wrong position so that generation rewinds there. Nothing is released before its window passed.

A prefill of W tokens costs far less than W decode steps (on a GPU about one), so checking every
token is affordable: see scripts/bench_verify.py.

A session with a LoRA adapter is checked with the same adapter, or its check would compare two different
models: remote opinions are sessions naming the adapter (so only nodes serving it are asked), and the
client's own copy applies the adapter's LoRA to its blocks (models/lora.py), which it can do only when it
has the adapter's files (`adapter_files`); without them it is no judge for that session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ...models.checkpoint import Checkpoint
from ...models.lora import AdapterSource
from ...protocol.wire import tensor_codec
from ...protocol.wire.identity import peer_id_of
from ...protocol.wire.node_client import NodeClient, NodeError, NodeInfo
from ..config import DEFAULT_WINDOW  # tokens per check: each hop's window is one prefill on another node
from ..precision import Precision, tolerance
from ..routing import NoRouteError
from ..session import Hop, InferenceSession
from .opinions import LocalOpinion, Opinion, RemoteOpinion

log = logging.getLogger(__name__)

UNKNOWN = Precision("bfloat16")  # a node whose Info cannot be read: the loosest float tolerance


class Router(Protocol):
    """Hops over blocks [start, end) avoiding the addresses in `avoid`, through nodes whose precision is
    comparable with `like` (client/precision.py)."""

    def __call__(self, start: int, end: int, avoid: set[str], like: Precision) -> Awaitable[list[Hop]]: ...


class VerificationError(RuntimeError):
    """Outputs could not be verified: no other opinion exists, or opinions disagree with no way to decide."""


def first_mismatch(claimed: torch.Tensor, reference: torch.Tensor, tol: float) -> tuple[int | None, float]:
    """Index along T of the first position where claimed and reference (B, T, H) differ beyond `tol`, and
    the largest error. The error of an element is |claimed - reference| / (|reference| + rms of its
    position): relative for the residual stream's huge outlier channels, absolute-ish for the rest."""
    ref, got = reference.float(), claimed.float()
    scale = ref.abs() + ref.pow(2).mean(-1, keepdim=True).sqrt()  # (B, T, H)
    error = ((got - ref).abs() / scale.clamp_min(1e-30)).nan_to_num(float("inf")).amax(dim=(0, 2))  # (T,)
    bad = (~(error <= tol)).nonzero()
    return (int(bad[0, 0]) if len(bad) else None), float(error.max()) if error.numel() else 0.0


# ---- what each hop answered


@dataclass
class Record:
    """Outputs one hop's node returned, from position `first` on (B, 1, H) each, and its signed exchanges."""

    hop: Hop
    first: int
    outputs: list[torch.Tensor] = field(default_factory=list)  # outputs[i]: position first + i
    # (signed request, signed reply, the input as tensor_codec bytes if the step's came by push, else b"")
    exchanges: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.first + len(self.outputs)

    def add(self, position: int, out: torch.Tensor) -> None:
        self.forget_from(position)
        self.outputs.extend(out[:, i : i + 1] for i in range(out.shape[1]))

    def forget_from(self, position: int) -> None:
        """Drops outputs from `position` on; a rewind below `first` (speculative decoding steps back over rejected
        drafts that were already checked) makes the outputs from `position` on the ones to check again."""
        del self.outputs[max(position - self.first, 0) :]
        self.first = min(self.first, position)

    def drop_before(self, position: int) -> None:
        cut = min(max(position - self.first, 0), len(self.outputs))
        del self.outputs[:cut]
        self.first += cut

    def claimed(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat(self.outputs[start - self.first : stop - self.first], dim=1)  # (B, stop - start, H)

    def inputs(self, stop: int) -> torch.Tensor:
        """The inputs the node was given for positions [0, stop), from the hop's kept history."""
        return torch.cat([h for _, h in self.hop.history], dim=1)[:, :stop]  # (B, stop, H)


@dataclass(frozen=True)
class Finding:
    """A node caught returning wrong outputs: first wrong `position` on blocks [start, end)."""

    node: NodeClient
    peer_id: str
    start: int
    end: int
    position: int
    error: float
    tolerance: float
    judge: str  # who decided (the third opinion)
    public_key: bytes = b""
    dtype: str = "float32"  # what the node says it computes in (its Info)
    exchanges: tuple[tuple[bytes, ...], ...] = ()  # its signed requests, replies (and pushed inputs): a fraud proof
    adapter: str = ""  # the session's LoRA adapter ("": the base model): the right outputs depend on it
    adapter_files: AdapterSource | None = None  # the client's copy of it, if it had one (evidence: its digest)
    quant: str = "none"  # its weights' quantization (its Info): the proof is replayed with the same
    signed_info: bytes = b""  # its Info reply as it signed it (what a proof's replay trusts for dtype and quant)
    checker: bool = False  # caught while checking another node (its own session's replies are not kept)


class Verifier:
    """One per inference session; `check` after each step says where to rewind, if anywhere."""

    def __init__(
        self,
        session: InferenceSession,
        route: Router,
        on_dishonest: Callable[[Finding], None],
        window: int = DEFAULT_WINDOW,
        local: Checkpoint | None = None,
        adapter: AdapterSource | None = None,
    ):
        """route: finds hops for a span; for an adapter session, only nodes serving `session.adapter`.
        adapter: the files of the session's adapter (`adapter_files`); without them `local` is not used for
        an adapter session, since the base blocks alone would compute another model."""
        if window < 1:
            raise ValueError(f"verify_window must be >= 1 token, got {window}")
        if adapter is not None and adapter.name != session.adapter:
            raise ValueError(f"adapter files {adapter.name!r} are not the session's adapter {session.adapter!r}")
        self.session, self.route, self.on_dishonest = session, route, on_dishonest
        self.adapter = adapter
        self.window, self.local = window, local if adapter is not None or not session.adapter else None
        self.verified = 0  # outputs at positions < verified are checked, or were never used
        self.records: dict[int, Record] = {}  # id(hop) -> what it answered
        self.checkers: dict[tuple[int, int, str], Opinion] = {}  # (start, end, checked node) -> opinion
        self.locals: dict[tuple[int, int, str], LocalOpinion] = {}  # (start, end, quantization) -> own copy
        self.infos: dict[str, NodeInfo] = {}

    # ---- the session's hook
    def observe(self, hop: Hop, position: int, out: torch.Tensor, pushed: torch.Tensor | None = None) -> None:
        """Called by the session with every output a hop returns (steps and replays alike); `pushed`: the
        client's copy of the step's input when the node got it by push (its signed reply names its digest)."""
        record = self.records.get(id(hop))
        if record is None:
            first = max(position, self.verified)  # a replay's older outputs were never used downstream
            record = self.records[id(hop)] = Record(hop, first)
        elif position < record.end:
            self.forget_from(position)  # the session rewound
        exchanges = hop.stream.take_exchanges() if hop.stream is not None else []
        for i, (request, reply) in enumerate(exchanges):  # earlier ones: a pushed step the session stepped again
            last = i == len(exchanges) - 1
            record.exchanges.append(
                (request, reply, tensor_codec.to_bytes(pushed) if last and pushed is not None else b"")
            )
        skip = max(record.first - position, 0)
        if skip < out.shape[1]:
            record.add(position + skip, out[:, skip:])

    def forget_from(self, position: int) -> None:
        self.verified = min(self.verified, position)
        for record in self.records.values():
            record.forget_from(position)
        for opinion in [*self.checkers.values(), *self.locals.values()]:
            opinion.forget_from(position)

    # ---- checks
    async def check(self, final: bool = False) -> int | None:
        """Checks the outputs of [verified, session.position) once a window is full (or `final`).

        Returns None when all are right (verified moves on), or the first wrong position: the liar is
        reported and re-routed, and the caller must rewind generation there."""
        stop = self.session.position
        if stop <= self.verified or (not final and stop - self.verified < self.window):
            return None
        start = self.verified
        records = [r for r in self.records.values() if r.first < stop and r.end > start]
        findings = await asyncio.gather(*(self._check_record(r, start, stop) for r in records))
        liars = [(r, f) for r, f in zip(records, findings, strict=True) if f is not None]
        if not liars:
            self._advance(stop)
            return None
        rewind = min(f.position for _, f in liars)
        named: set[str] = set()
        for record, finding in liars:
            if finding.node.address not in named:  # one node may hold several hops of the window (re-routed back)
                named.add(finding.node.address)
                self.on_dishonest(finding)
            await self._drop_checkers_of(finding.node)
            if any(hop is record.hop for hop in self.session.hops):
                await self.session.replace(record.hop, rewind)
            del self.records[id(record.hop)]
        self.forget_from(rewind)
        self._advance(rewind)
        return rewind

    def _advance(self, position: int) -> None:
        self.verified = position
        live = {id(hop) for hop in self.session.hops}
        for key, record in list(self.records.items()):
            record.drop_before(position)
            if key not in live and record.end <= position:
                del self.records[key]

    async def _check_record(self, record: Record, start: int, stop: int) -> Finding | None:
        start, stop = max(start, record.first), min(stop, record.end)
        if start >= stop:
            return None
        hop = record.hop
        inputs, claimed = record.inputs(stop), record.claimed(start, stop)
        precision = await self._precision(hop.node)
        checker = await self._checker(hop, precision)
        reference = await checker.outputs(inputs, start)
        tol = self._tolerance(precision, checker)
        wrong, error = first_mismatch(claimed, reference, tol)
        if wrong is None:
            return None
        log.warning(
            "verification: %s and %s disagree on blocks %d:%d at position %d (error %.3g > %.3g); "
            "asking a third opinion",
            hop.node.address,
            checker.name,
            hop.start,
            hop.end,
            start + wrong,
            error,
            tol,
        )
        if checker.trusted:
            return await self._finding(record, start, start + wrong, error, tol, checker.name)
        third = await self._third(hop, checker, precision)
        try:
            judged = await third.outputs(inputs, start)
        finally:
            if not third.trusted:
                await third.close()
        tol3 = self._tolerance(precision, checker, third)
        node_wrong, node_error = first_mismatch(claimed, judged, tol3)
        checker_wrong, checker_error = first_mismatch(reference, judged, tol3)
        if checker_wrong is not None and (node_wrong is None or third.trusted):
            await self._checker_lied(hop, checker, third.name, start + checker_wrong, checker_error, tol3)
        if node_wrong is not None and (checker_wrong is None or third.trusted):
            return await self._finding(record, start, start + node_wrong, node_error, tol3, third.name)
        if node_wrong is not None:
            raise VerificationError(
                f"blocks {hop.start}:{hop.end}: {hop.node.address}, {checker.name} and {third.name} all disagree; "
                "no two opinions agree, so no output can be trusted"
            )
        return None

    async def _finding(self, record: Record, start: int, wrong: int, error: float, tol: float, judge: str) -> Finding:
        node = record.hop.node
        info = self.infos.get(node.address)
        key = info.public_key if info is not None else getattr(node, "expected_key", None) or b""
        return Finding(
            node,
            peer_id_of(key) if key else "unknown",
            record.hop.start,
            record.hop.end,
            wrong,
            error,
            tol,
            judge,
            key,
            info.dtype if info is not None else "float32",
            tuple(record.exchanges),
            self.session.adapter,
            self.adapter,
            quant=Precision.of(info).quant if info is not None else "none",
            signed_info=getattr(node, "signed_info", b""),
        )

    async def _precision(self, node: NodeClient) -> Precision:
        """What a node computes in, from its Info (an ordinary call), asked once."""
        if node.address not in self.infos:
            try:
                self.infos[node.address] = await node.info()
            except NodeError:
                return UNKNOWN  # unknown: the loosest dtype we accept, never a false accusation
        return Precision.of(self.infos[node.address])

    def _tolerance(self, precision: Precision, *opinions: Opinion) -> float:
        """The tolerance between a node of `precision` and `opinions` (all of its quantization, as routed)."""
        tol = tolerance(precision, *(p for o in opinions for p in o.precisions), wire=self.session.wire_dtype)
        if tol is None:
            raise AssertionError(f"opinions of another quantization than {precision.name}: routing let them in")
        return tol

    async def _checker(self, hop: Hop, precision: Precision) -> Opinion:
        key = (hop.start, hop.end, hop.node.address)
        if key not in self.checkers:
            self.checkers[key] = await self._opinion(hop, precision, {hop.node.address}, prefer_local=False)
        return self.checkers[key]

    async def _third(self, hop: Hop, checker: Opinion, precision: Precision) -> Opinion:
        avoid = {hop.node.address} | {n.address for n in getattr(checker, "nodes", [])}
        try:
            return await self._opinion(hop, precision, avoid, prefer_local=True)
        except VerificationError:
            raise VerificationError(
                f"{hop.node.address} and {checker.name} disagree on blocks {hop.start}:{hop.end} and there is no "
                f"third opinion (no other node serves these blocks{_with_weights(precision)} and the client holds "
                f"no local weights{self._with_adapter()}); refusing to return an unverified answer"
            ) from None

    async def _opinion(self, hop: Hop, precision: Precision, avoid: set[str], prefer_local: bool) -> Opinion:
        """Someone to recompute `hop`'s blocks with the weights of `precision`: other nodes, or this client."""
        if prefer_local and self.local is not None:
            return self._local(hop, self.local, precision)
        try:
            hops = await self.route(hop.start, hop.end, avoid, precision)
        except NoRouteError:
            if self.local is not None:
                return self._local(hop, self.local, precision)
            raise VerificationError(
                f"cannot verify blocks {hop.start}:{hop.end} served by {hop.node.address}: no other node serves them"
                f"{_with_weights(precision)} and the client holds no local weights for them{self._with_adapter()}"
            ) from None
        s = self.session
        session = InferenceSession(
            hops,
            s.max_length,
            s.batch_size,
            s.wire_dtype,
            s.step_timeout,
            router=lambda a, b: self.route(a, b, avoid, precision),
            on_failure=s.on_failure,
            retry=s.retry,
            adapter=s.adapter,
        )
        return RemoteOpinion(session, [await self._precision(h.node) for h in hops])

    def _local(self, hop: Hop, local: Checkpoint, precision: Precision) -> LocalOpinion:
        """The client's own copy of the hop's blocks, in float32, with weights quantized as the node's are."""
        key = (hop.start, hop.end, precision.quant)
        if key not in self.locals:
            s = self.session
            self.locals[key] = LocalOpinion(
                local, hop.start, hop.end, s.batch_size, s.max_length, self.adapter, precision.quant
            )
        return self.locals[key]

    def _with_adapter(self) -> str:
        """For error messages: an adapter session's opinions must serve, or hold, its adapter."""
        if not self.session.adapter:
            return ""
        missing = "" if self.adapter else ", which it has no copy of (give --adapter as its directory or hub id)"
        return f" with adapter {self.session.adapter!r}{missing}"

    async def _checker_lied(
        self, hop: Hop, checker: Opinion, judge: str, position: int, error: float, tol: float
    ) -> None:
        """The checker, not the checked node, was wrong (first at `position`, by `error` > `tol`): a lone checker
        node is named; a chain is dropped."""
        nodes = getattr(checker, "nodes", [])
        if len(nodes) == 1:
            node = nodes[0]
            precision = await self._precision(node)
            info = self.infos.get(node.address)
            peer = peer_id_of(info.public_key) if info is not None else "unknown"
            self.on_dishonest(
                Finding(
                    node,
                    peer,
                    hop.start,
                    hop.end,
                    position,
                    error,
                    tol,
                    judge,
                    info.public_key if info else b"",
                    precision.dtype,
                    quant=precision.quant,
                    checker=True,
                )
            )
        else:
            log.warning(
                "verification: the chain %s gave wrong outputs for blocks %d:%d; not using it again",
                checker.name,
                hop.start,
                hop.end,
            )
        await self._drop_checkers_of(*nodes)

    async def _drop_checkers_of(self, *nodes: NodeClient) -> None:
        addresses = {n.address for n in nodes}
        for key, opinion in list(self.checkers.items()):
            if key[2] in addresses or addresses & {n.address for n in getattr(opinion, "nodes", [])}:
                del self.checkers[key]
                await opinion.close()

    async def close(self) -> None:
        for opinion in self.checkers.values():
            await opinion.close()
        self.checkers.clear()
        self.locals.clear()


def _with_weights(precision: Precision) -> str:
    """For error messages: the only nodes that can judge a quantized node have its quantization."""
    return "" if precision.quant == "none" else f" with {precision.quant} weights (only those compare with it)"
