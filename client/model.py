"""The SDK: a model whose blocks run on the swarm while tokenizer, embeddings and LM head run here.

`AsyncDistributedModel` is the asyncio core; `DistributedModel` (client/sync_model.py) offers the same
calls to synchronous code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoTokenizer

from ..models.checkpoint import Checkpoint, resolve
from ..models.devices import place, resolve_device
from ..models.families import load_head, num_blocks
from ..protocol.dht.network import start_dht
from ..protocol.wire.allow_keys import load_allow_keys
from ..protocol.wire.identity import Identity
from ..protocol.wire.node_client import NodeClient
from .ban_list import BanList
from .chat_session import AsyncChatSession
from .discovery import DhtPeers, PeerSource, StaticPeers
from .generation import generate_ids
from .head_batcher import HeadBatcher
from .routing import Candidate, NoRouteError, find_route
from .sampling import SamplingParams
from .session import DEFAULT_PREFILL_CHUNK, DEFAULT_PUSH, DEFAULT_STEP_TIMEOUT, Hop, InferenceSession, RetryPolicy
from .speculative import DEFAULT_DRAFT_TOKENS, Drafter, load_drafter
from .text_stream import TextPiece, text_only, text_pieces
from .verification.evidence import fraud_report, write_evidence
from .verification.opinions import adapter_files, holds_blocks
from .verification.verifier import DEFAULT_WINDOW, Finding, Verifier

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
T = TypeVar("T")
Prompt = str | Sequence[dict] | torch.Tensor  # text, chat messages, or token ids (B, T)


class AsyncDistributedModel:
    def __init__(
        self,
        ckpt: Checkpoint,
        source: PeerSource,
        wire_dtype: torch.dtype = torch.float32,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
        draft: str | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        verify: bool = False,
        verify_window: int = DEFAULT_WINDOW,
        verify_local: bool = True,
        device: str = "auto",
        adapter: str | None = None,
        push: bool = DEFAULT_PUSH,
    ):
        self.push = push  # node-to-node push for plain steps (client/session.py); False: the client drives every hop
        self.adapter = adapter  # the LoRA adapter of every call that names none ("" in a call: the base model)
        self.ckpt, self.source, self.wire_dtype, self.step_timeout = ckpt, source, wire_dtype, step_timeout
        self.retry, self.bans = retry, BanList()
        if verify_window < 1:
            raise ValueError(f"verify_window must be >= 1 token, got {verify_window}")
        # verify: recompute every hop's outputs elsewhere before using them (client/verification/verifier.py);
        # verify_local: the client may recompute blocks itself from its local checkpoint (third opinion)
        self.verify, self.verify_window, self.verify_local = verify, verify_window, verify_local
        self.dishonest: set[str] = set()  # addresses caught lying: never used again by this client
        # device: where the head (embeddings, final norm, LM head) computes, in float32 (exact logits) wherever it is
        self.device = resolve_device(device)
        self.head = place(load_head(ckpt, device=self.device), self.device)
        self.heads = HeadBatcher(self.head)  # every session's LM-head calls, merged when they coincide
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
        self.total_blocks = num_blocks(ckpt)
        if prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0 (0 = the whole prompt in one step)")
        self.prefill_chunk = prefill_chunk
        self.draft, self.draft_tokens = draft, draft_tokens  # defaults of every generation (the api's --draft)
        self._drafters: dict[str, Drafter] = {}
        self.drafter(draft, draft_tokens)  # a bad draft fails here, not at the first request

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
        **kwargs,
    ) -> AsyncDistributedModel:
        """Nodes come from the DHT reached through `initial_peers`, or from fixed `peers` (host:port).

        Channels are TLS bound to each node's key (from its DHT record, `expected_keys`, or learned on
        first use); `insecure=True` speaks plaintext to nodes started with --insecure (debugging only).
        allow_keys: a private swarm's member list (file or keys): only listed nodes are used.
        verify=True recomputes every node's outputs elsewhere before use, window by window (verify_window
        tokens, default 32; verify_local=False never computes blocks on this client).
        kwargs: wire_dtype (float32: lossless; bfloat16: half the bytes), step_timeout, retry, and the
        defaults of every generation: draft ("ngram" or a draft model), draft_tokens, prefill_chunk;
        device ("auto": CUDA, else MPS, else CPU; or "cpu", "cuda:N", "mps") for the head;
        adapter: the LoRA adapter (served by nodes started with --adapters) of every call that names none;
        push (default True): each node sends its output straight to the next (hops + 1 one-way legs per
        token instead of 2 x hops); False: the client drives every hop, as it always does with verify.
        """
        identity = Identity.load_or_create(identity_path)
        allowed = load_allow_keys(allow_keys) if isinstance(allow_keys, (str, Path)) else allow_keys
        if initial_peers:
            dht = await asyncio.to_thread(start_dht, list(initial_peers), client_mode=True, allow_keys=allowed)
            source: PeerSource = DhtPeers(identity, dht, insecure)
        else:
            source = StaticPeers(identity, peers, expected_keys, insecure)
        source.allow_keys = allowed
        return cls(await asyncio.to_thread(resolve, model), source, **kwargs)

    # ---- routing and sessions
    async def candidates(
        self, exclude: set[str] = frozenset(), adapter: str | None = None
    ) -> list[tuple[Candidate, NodeClient]]:
        """The live nodes of this checkpoint routing may use: allowed keys, none that failed recently or lied,
        nor in `exclude`; with `adapter`, only those serving it."""
        exclude = self.bans.banned() | self.dishonest | exclude
        return await self.source.candidates(
            self.ckpt.name, self.ckpt.revision, self.total_blocks, exclude=exclude, adapter=adapter
        )

    async def route(
        self, start: int = 0, end: int | None = None, exclude: set[str] = frozenset(), adapter: str | None = None
    ) -> list[Hop]:
        """Fresh hops covering blocks [start, end), avoiding nodes that failed recently or lied, and `exclude`;
        with `adapter`, only nodes that serve that LoRA adapter."""
        found = await self.candidates(exclude, adapter)
        nodes = {candidate.key: node for candidate, node in found}
        end = self.total_blocks if end is None else end
        try:
            route = find_route([candidate for candidate, _ in found], end, start=start)
        except NoRouteError as e:
            if adapter:
                e.args = (f"{e} with adapter {adapter!r} (a node serves it when started with --adapters)",)
            raise
        return [Hop(nodes[r.key], r.start, r.end) for r in route]

    async def open_session(
        self, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 1, adapter: str | None = None
    ) -> InferenceSession:
        """adapter: the name of a LoRA adapter the nodes serve (`join --adapters`), or its directory (or hub id),
        which --verify recomputes with; None: the model's default (from_pretrained's `adapter`); "": the base model."""
        adapter = self.adapter if adapter is None else adapter
        files = adapter_files(adapter, fetch=self.verify and self.verify_local) if adapter else None
        adapter = files.name if files else adapter  # a directory: nodes know the adapter by its base name
        router = functools.partial(self.route, adapter=adapter)  # failover finds replacements serving it too
        session = InferenceSession(
            await router(),
            max_length,
            batch_size,
            self.wire_dtype,
            self.step_timeout,
            router=router,
            on_failure=lambda node: self.bans.ban(node.address),
            retry=self.retry,
            prefill_chunk=self.prefill_chunk,
            adapter=adapter,
            push=self.push and not self.verify,  # a fraud proof needs every input in the node's signed request
        )
        if self.verify:
            local = self.ckpt if self.verify_local and holds_blocks(self.ckpt) else None
            session.verifier = Verifier(session, router, self.caught, self.verify_window, local, files)
        return session

    def caught(self, finding: Finding) -> None:
        """A node returned wrong outputs: banned for good, named in a warning, its signed replies kept."""
        self.dishonest.add(finding.node.address)
        where = f" at position {finding.position}" if finding.position >= 0 else " while checking another node"
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

    def drafter(self, draft: str | None = None, draft_tokens: int | None = None) -> tuple[Drafter | None, int]:
        """The drafter and K for one generation (None, 0: plain decoding); None picks the model's default.

        draft: "ngram" (prompt lookup) or a draft model with this model's tokenizer, loaded once and kept.
        """
        draft = self.draft if draft is None else draft
        tokens = self.draft_tokens if draft_tokens is None else draft_tokens
        if tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0 (0 = no speculation), got {tokens}")
        if not draft or tokens == 0:
            return None, 0
        if draft not in self._drafters:
            self._drafters[draft] = load_drafter(draft, self.tokenizer, self.ckpt.hf_config.vocab_size)
        return self._drafters[draft], tokens

    def session(
        self,
        max_length: int = DEFAULT_MAX_LENGTH,
        draft: str | None = None,
        draft_tokens: int | None = None,
        adapter: str | None = None,
    ) -> AsyncChatSession:
        """A multi-turn session: the KV cache stays on the nodes between `generate` calls (with `adapter`'s LoRA)."""
        return AsyncChatSession(self, max_length, draft, draft_tokens, adapter)

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
        draft: str | None = None,
        draft_tokens: int | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[torch.Tensor]:
        """Next token ids (B,) step by step; opens (and closes) a session unless given one.

        draft / draft_tokens: speculative decoding (see `drafter`); greedy output is plain greedy's.
        adapter: a LoRA adapter the nodes serve, for the session opened here (a given one has its own).
        """
        drafter, k = self.drafter(draft, draft_tokens)
        own = session is None
        if own:
            session = await self.open_session(input_ids.shape[1] + params.max_new_tokens, input_ids.shape[0], adapter)
        try:
            async for new in generate_ids(self.heads, session, input_ids, params, self.eos_ids, cached, drafter, k):
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
        **sampling,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Like transformers' generate: prompt ids followed by the new ids, (B, T + new).

        A list of strings runs as concurrent sessions and returns one tensor (1, T_i + new_i) each.
        sampling: max_new_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, seed,
        stop, ignore_eos. draft: "ngram" or a draft model; draft_tokens: at most this many per pass.
        adapter: the name of a LoRA adapter the nodes serve (None: the base model).
        """
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            each = (self.generate(p, chat, draft, draft_tokens, adapter, **sampling) for p in prompt)
            return list(await asyncio.gather(*each))
        ids = self.encode(prompt, chat)
        params = SamplingParams(**sampling)
        new = [n async for n in self.generate_ids(ids, params, draft=draft, draft_tokens=draft_tokens, adapter=adapter)]
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids

    async def generate_text(
        self,
        prompt: Prompt,
        params: SamplingParams,
        chat: bool = False,
        draft: str | None = None,
        draft_tokens: int | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[TextPiece]:
        """One prompt's new text as it is generated: pieces, the last with the finish reason ("stop": EOS or
        a stop string, "length": max_new_tokens) and the number of tokens generated (see text_pieces)."""
        ids = self.encode(prompt, chat)
        if ids.shape[0] != 1:
            raise ValueError("generate_text and stream take one prompt (batch size 1)")
        new_ids = self.generate_ids(ids, params, draft=draft, draft_tokens=draft_tokens, adapter=adapter)
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
        **sampling,
    ) -> AsyncIterator[str]:
        """Text pieces as they are generated (stop strings end the stream and are not included)."""
        return text_only(self.generate_text(prompt, SamplingParams(**sampling), chat, draft, draft_tokens, adapter))

    async def logits(self, input_ids: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of every position: scoring, perplexity, checks against a local model."""
        session = await self.open_session(input_ids.shape[1], input_ids.shape[0], adapter)
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
        await self.source.close()

    async def __aenter__(self) -> AsyncDistributedModel:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
