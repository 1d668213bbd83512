"""The SDK: a model whose blocks run on the swarm while tokenizer, embeddings and LM head run here.

`AsyncDistributedModel` is the asyncio core; `DistributedModel` (client/sync_model.py) offers the same
calls to synchronous code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoTokenizer
from typing_extensions import TypeIs

from ..models import torch_threads
from ..models.checkpoint import Checkpoint, resolve
from ..models.devices import place, resolve_device
from ..models.families import load_head, num_blocks
from ..protocol.dht.network import start_dht
from ..protocol.wire.allow_keys import load_allow_keys
from ..protocol.wire.identity import Identity
from ..protocol.wire.node_client import NodeClient
from .ban_list import BanList
from .chat_session import AsyncChatSession
from .config import ClientConfig, GenerationOptions, split_options
from .discovery import DhtPeers, PeerSource, StaticPeers, unspoken_route_error
from .generation import generate_ids
from .head_batcher import HeadBatcher
from .precision import Precision
from .routing import Candidate, NoRouteError, find_route
from .sampling import SamplingParams
from .session import Hop, InferenceSession
from .speculative import Drafter, load_drafter
from .speed_book import SpeedBook
from .text_stream import TextPiece, text_only, text_pieces
from .verification.evidence import DEFAULT_UPLOAD_TIMEOUT, fraud_report, upload_evidence, write_evidence
from .verification.opinions import adapter_files, holds_blocks
from .verification.verifier import Finding, Verifier

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
T = TypeVar("T")
Prompt = str | Sequence[dict] | torch.Tensor  # text, chat messages, or token ids (B, T)


def _texts(prompt: Prompt | list[str]) -> TypeIs[list[str]]:
    """A batch of text prompts (a list of chat messages is one prompt)."""
    return isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)


class AsyncDistributedModel:
    def __init__(
        self,
        ckpt: Checkpoint,
        source: PeerSource,
        config: ClientConfig | None = None,
        generation: GenerationOptions | None = None,
        **options: Any,
    ):
        """config: how this client reaches and trusts the nodes; generation: every call's defaults (draft,
        draft_tokens, prefill_chunk, adapter). options: any field of either by keyword (wire_dtype=..., verify=...,
        draft=...), laid over them: the keywords users have always passed."""
        self.config, self.generation = split_options(options, config, generation)
        self.ckpt, self.source = ckpt, source
        self.bans = BanList()
        self.speeds = SpeedBook(self.config.speed)  # each node's speed as this client timed it: routing weighs it
        self._probing: dict[tuple, asyncio.Future] = {}  # candidates() in flight, shared by identical calls
        self.uploads: list[asyncio.Future] = []  # fraud proofs being uploaded (config.report_to), awaited on close
        self.dishonest: set[str] = set()  # addresses caught lying: never used again by this client
        # where the head (embeddings, final norm, LM head) computes, in float32 (exact logits) wherever it is
        self.device = resolve_device(self.config.device)
        self.head = place(load_head(ckpt, device=self.device), self.device)
        self.heads = HeadBatcher(self.head)  # every session's LM-head calls, merged when they coincide
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
        self.total_blocks = num_blocks(ckpt)
        self._drafters: dict[tuple[str, str], Drafter] = {}  # (draft, draft_quant) -> the loaded drafter
        self.drafter(self.generation)  # a bad draft fails here, not at the first request

    @classmethod
    async def from_pretrained(
        cls,
        model: str,
        peers: Sequence[str] = (),
        initial_peers: Sequence[str] = (),
        identity_path: Path | None = None,
        expected_keys: dict[str, bytes] | None = None,
        insecure: bool = False,
        allow_keys: Path | str | frozenset[bytes] | None = None,
        **options: Any,
    ) -> AsyncDistributedModel:
        """Nodes come from the DHT reached through `initial_peers`, or from fixed `peers` (host:port).

        Channels are TLS bound to each node's key (from its DHT record, `expected_keys`, or learned on
        first use); `insecure=True` speaks plaintext to nodes started with --insecure (debugging only).
        allow_keys: a private swarm's member list (file or keys): only listed nodes are used.
        options: `config=ClientConfig(...)`, `generation=GenerationOptions(...)` (client/config.py), or any of
        their fields by keyword: wire_dtype (float32: lossless; bfloat16: half the bytes), step_timeout, retry;
        verify=True recomputes every node's outputs elsewhere before use, window by window (verify_window
        tokens, default 32; verify_local=False never computes blocks on this client); device ("auto": CUDA,
        else MPS, else CPU; or "cpu", "cuda:N", "mps") for the head; push (default True): each node sends its
        output straight to the next (hops + 1 one-way legs per token instead of 2 x hops; False: the client
        drives every hop); fp32_only: only float32 nodes with unquantized weights; report_to: health monitors
        (dashboard URLs) each fraud proof is uploaded to; and the defaults of every generation: draft ("ngram"
        or a draft model), draft_tokens, prefill_chunk, adapter (a LoRA adapter served by nodes started with
        --adapters).
        """
        identity = Identity.load_or_create(identity_path)
        allowed = load_allow_keys(allow_keys) if isinstance(allow_keys, (str, Path)) else allow_keys
        if initial_peers:
            dht = await asyncio.to_thread(start_dht, list(initial_peers), client_mode=True, allow_keys=allowed)
            source: PeerSource = DhtPeers(identity, dht, insecure)
        else:
            source = StaticPeers(identity, peers, expected_keys, insecure)
        source.allow_keys = allowed
        return cls(await torch_threads.in_passing_thread(resolve, model), source, **options)

    # ---- routing and sessions
    async def candidates(
        self, exclude: AbstractSet[str] = frozenset(), adapter: str | None = None, like: Precision | None = None
    ) -> list[tuple[Candidate, NodeClient]]:
        """The live nodes of this checkpoint routing may use: allowed keys, none that failed recently or lied,
        nor in `exclude`; with `adapter`, only those serving it; with `like`, only those whose outputs compare
        with a node of that precision (the verifier's opinions); with `fp32_only`, only exact float32 nodes. Their
        throughput is what this client believes (client/speed_book.py: measured, or a fair trial), not what they
        announce."""
        exclude = self.bans.banned() | self.dishonest | exclude

        def suits(p: Precision) -> bool:
            return (p.exact or not self.config.fp32_only) and (like is None or like.comparable(p))

        def probe() -> asyncio.Future:
            return asyncio.ensure_future(
                self.source.candidates(
                    self.ckpt.name,
                    self.ckpt.revision,
                    self.total_blocks,
                    exclude=exclude,
                    adapter=adapter,
                    precision=suits,
                )
            )

        # Sessions opened together (generate([...]), an API server's burst) share one probe of the swarm: they
        # then get their routes, and send their prefills, at the same moment (the nodes batch them as one)
        key = (frozenset(exclude), adapter) if like is None else None
        probing = self._probing.get(key) if key is not None else None
        if probing is None:
            probing = probe()
            if key is not None:
                self._probing[key] = probing
                probing.add_done_callback(lambda _: self._probing.pop(key, None))
        found = await asyncio.shield(probing)  # a caller cancelled leaves the probe to the others
        for candidate, _ in found:
            self.speeds.observe(candidate)
        return [(self.speeds.believed(candidate), node) for candidate, node in found]

    async def route(
        self,
        start: int = 0,
        end: int | None = None,
        exclude: AbstractSet[str] = frozenset(),
        like: Precision | None = None,
        adapter: str | None = None,
    ) -> list[Hop]:
        """Fresh hops covering blocks [start, end), avoiding nodes that failed recently or lied, and `exclude`;
        with `like`, only nodes of a precision comparable with it; with `adapter`, only nodes that serve that
        LoRA adapter."""
        found = await self.candidates(exclude, adapter, like)
        nodes = {candidate.key: node for candidate, node in found}
        end = self.total_blocks if end is None else end
        try:
            route = find_route([candidate for candidate, _ in found], end, start=start)
        except NoRouteError as no_route:
            e = unspoken_route_error(no_route, list(self.source.unspoken.values()))
            if adapter:
                e.args = (f"{e} with adapter {adapter!r} (a node serves it when started with --adapters)",)
            if self.config.fp32_only:
                e.args = (f"{e.args[0]} in float32 with unquantized weights (fp32_only)",)
            raise e from None
        return [Hop(nodes[r.key], r.start, r.end, rtt=self.speeds.rtt(r.key)) for r in route]

    async def open_session(
        self, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 1, options: GenerationOptions | None = None
    ) -> InferenceSession:
        """A session over a fresh route with `options`' adapter (default: this model's generation options).

        The adapter is the name of a LoRA adapter the nodes serve (`join --adapters`), or its directory (or hub
        id), which --verify recomputes with; "" or None: the base model (see config.chosen_adapter)."""
        config, options = self.config, options or self.generation
        adapter = options.adapter or ""
        files = adapter_files(adapter, fetch=config.verify and config.verify_local) if adapter else None
        adapter = files.name if files else adapter  # a directory: nodes know the adapter by its base name
        router = functools.partial(self.route, adapter=adapter)  # failover finds replacements serving it too
        session = InferenceSession(
            await router(),
            max_length,
            batch_size,
            config.torch_wire_dtype,
            config.step_timeout,
            router=router,
            on_failure=lambda node: self.bans.ban(node.address),
            retry=config.retry,
            prefill_chunk=options.prefill_chunk,
            adapter=adapter,
            push=config.push,  # with --verify too: a pushed step's proof ships the client's copy of its input
            speeds=self.speeds,
            push_min_rtt=config.push_min_rtt_ms / 1000,
            batch_steps=config.batch_steps,
        )
        if config.verify:
            local = self.ckpt if config.verify_local and holds_blocks(self.ckpt) else None
            session.verifier = Verifier(session, router, self.caught, config.verify_window, local, files)
        return session

    def caught(self, finding: Finding) -> None:
        """A node returned wrong outputs: banned for good, named in a warning, its signed replies kept."""
        self.dishonest.add(finding.node.address)
        where = f" at position {finding.position}" + (" while checking another node" if finding.checker else "")
        log.warning(
            "dishonest node %s (peer %s) returned wrong outputs for blocks %d:%d%s (error %.3g > tolerance %.3g, "
            "judged by %s); banned, re-routing",
            finding.node.address,
            finding.peer_id,
            finding.start,
            finding.end,
            where,
            finding.error,
            finding.tolerance,
            finding.judge,
        )
        path = write_evidence(finding, self.ckpt.name, self.ckpt.revision, self.source.identity.public_key)
        if path is not None:
            log.warning(
                "evidence against peer %s written to %s (torchnode check-evidence FILE MODEL)", finding.peer_id, path
            )
            self.source.publish(fraud_report(finding, self.ckpt.name, path, self.source.identity))  # DHT only
            for monitor in self.config.report_to:  # the proof itself, to monitors that serve and re-check it
                self.uploads.append(asyncio.ensure_future(asyncio.to_thread(upload_evidence, monitor, path)))

    def drafter(self, options: GenerationOptions) -> tuple[Drafter | None, int]:
        """The drafter and K of `options` (None, 0: plain decoding).

        draft: "ngram" (prompt lookup) or a draft model with this model's tokenizer, loaded once (with its linears
        in options.draft_quant's bits) and kept.
        """
        if not options.draft or options.draft_tokens == 0:
            return None, 0
        key = (options.draft, options.draft_quant)
        if key not in self._drafters:
            vocab = self.ckpt.hf_config.vocab_size
            self._drafters[key] = load_drafter(options.draft, self.tokenizer, vocab, options.draft_quant)
        return self._drafters[key], options.draft_tokens

    def session(
        self,
        max_length: int = DEFAULT_MAX_LENGTH,
        draft: str | None = None,
        draft_tokens: int | None = None,
        adapter: str | None = None,
    ) -> AsyncChatSession:
        """A multi-turn session: the KV cache stays on the nodes between `generate` calls (with `adapter`'s LoRA).

        draft, draft_tokens, adapter: this conversation's (None: the model's; adapter "": the base model)."""
        return AsyncChatSession(self, max_length, self.generation.override(draft, draft_tokens, adapter))

    # ---- prompts
    def encode(self, prompt: Prompt, chat: bool = False) -> torch.Tensor:
        """Token ids (B, T) of text (wrapped in the chat template if `chat`), chat messages, or ids."""
        if isinstance(prompt, torch.Tensor):
            return prompt if prompt.dim() == 2 else prompt[None]
        if not isinstance(prompt, str):
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        if chat:
            return self.encode([{"role": "user", "content": prompt}])
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    @property
    def eos_ids(self) -> list[int]:
        ids = set()
        for eos in (self.tokenizer.eos_token_id, getattr(self.ckpt.hf_config, "eos_token_id", None)):
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return sorted(ids)

    # ---- generation
    async def generate_ids(
        self,
        input_ids: torch.Tensor,
        params: SamplingParams,
        session: InferenceSession | None = None,
        cached: int = 0,
        options: GenerationOptions | None = None,
    ) -> AsyncGenerator[torch.Tensor, None]:
        """Next token ids (B,) step by step; opens (and closes) a session unless given one.

        options: speculative decoding (see `drafter`; greedy output is plain greedy's) and, for the session
        opened here, the adapter (a given session has its own); None: this model's generation options.
        """
        if input_ids.shape[1] <= cached:
            raise ValueError(f"nothing to generate from: {input_ids.shape[1]} prompt tokens, {cached} of them cached")
        options = options or self.generation
        drafter, k = self.drafter(options)
        own = session is None
        if session is None:
            session = await self.open_session(input_ids.shape[1] + params.max_new_tokens, input_ids.shape[0], options)
        new_ids = generate_ids(
            self.heads, session, input_ids, params, self.eos_ids, cached, drafter, k, options.draft_ahead
        )
        try:
            async with contextlib.aclosing(new_ids):  # closed here, not when collected: its step in flight lands
                async for new in new_ids:
                    yield new
        finally:
            if own:
                await session.close()

    async def generate(
        self,
        prompt: Prompt | list[str],
        chat: bool = False,
        draft: str | None = None,
        draft_tokens: int | None = None,
        adapter: str | None = None,
        **sampling: Any,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Like transformers' generate: prompt ids followed by the new ids, (B, T + new).

        A list of strings runs as concurrent sessions and returns one tensor (1, T_i + new_i) each.
        sampling: max_new_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, seed,
        stop, ignore_eos. draft: "ngram" or a draft model; draft_tokens: at most this many per pass.
        adapter: the name of a LoRA adapter the nodes serve (None: the model's default; "": the base model).
        """
        options = self.generation.override(draft, draft_tokens, adapter)
        params = SamplingParams(**sampling)
        if _texts(prompt):
            return list(await asyncio.gather(*(self._generate(p, chat, params, options) for p in prompt)))
        return await self._generate(prompt, chat, params, options)

    async def _generate(
        self, prompt: Prompt, chat: bool, params: SamplingParams, options: GenerationOptions
    ) -> torch.Tensor:
        ids = self.encode(prompt, chat)
        new = [n async for n in self.generate_ids(ids, params, options=options)]
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids

    async def generate_text(
        self, prompt: Prompt, params: SamplingParams, chat: bool = False, options: GenerationOptions | None = None
    ) -> AsyncGenerator[TextPiece, None]:
        """One prompt's new text as it is generated: pieces, the last with the finish reason ("stop": EOS or
        a stop string, "length": max_new_tokens) and the number of tokens generated (see text_pieces)."""
        ids = self.encode(prompt, chat)
        if ids.shape[0] != 1:
            raise ValueError("generate_text and stream take one prompt (batch size 1)")
        new_ids = self.generate_ids(ids, params, options=options)
        pieces = text_pieces(self.tokenizer, new_ids, params, self.eos_ids)
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                yield piece

    def stream(
        self,
        prompt: Prompt,
        chat: bool = False,
        draft: str | None = None,
        draft_tokens: int | None = None,
        adapter: str | None = None,
        **sampling: Any,
    ) -> AsyncGenerator[str, None]:
        """Text pieces as they are generated (stop strings end the stream and are not included)."""
        options = self.generation.override(draft, draft_tokens, adapter)
        return text_only(self.generate_text(prompt, SamplingParams(**sampling), chat, options))

    async def logits(self, input_ids: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of every position: scoring, perplexity, checks against a local model."""
        options = self.generation.override(adapter=adapter)
        session = await self.open_session(input_ids.shape[1], input_ids.shape[0], options)
        try:
            out = await session.step(self.head.embed(input_ids))
            while session.verifier is not None and (rewind := await session.verifier.check(final=True)) is not None:
                out = torch.cat(
                    [out[:, :rewind], await session.step(self.head.embed(input_ids[:, rewind:]), rewind)], 1
                )
            return await self.heads.logits(out)
        finally:
            await session.close()

    async def close(self) -> None:
        if self.uploads:
            done, pending = await asyncio.wait(self.uploads, timeout=DEFAULT_UPLOAD_TIMEOUT)
            for task in pending:
                task.cancel()
            failed = [str(t.exception()) for t in done if t.exception() is not None] + ["timed out"] * len(pending)
            if failed:
                log.warning("fraud proofs not uploaded (%d of %d): %s", len(failed), len(self.uploads), failed)
            else:
                log.warning("fraud proofs uploaded to %s", ", ".join(self.config.report_to))
        await self.source.close()

    async def __aenter__(self) -> AsyncDistributedModel:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
