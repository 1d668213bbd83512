"""The SDK: a model whose blocks run on the swarm while tokenizer, embeddings and LM head run here.

`AsyncDistributedModel` is the asyncio core; `DistributedModel` offers the same calls to synchronous
code, run on a private event loop thread (hivemind's DHT does the same).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoTokenizer

from ..models.checkpoint import Checkpoint, resolve
from ..models.families import load_head, num_blocks
from ..protocol.dht_network import start_dht
from ..protocol.identity import Identity
from .ban_list import BanList
from .discovery import DhtPeers, PeerSource, StaticPeers
from .generation import generate_ids
from .loop_thread import LoopThread
from .routing import find_route
from .sampling import SamplingParams
from .session import DEFAULT_STEP_TIMEOUT, Hop, InferenceSession, RetryPolicy
from .text_stream import TextPiece, text_pieces

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
    ):
        self.ckpt, self.source, self.wire_dtype, self.step_timeout = ckpt, source, wire_dtype, step_timeout
        self.retry, self.bans = retry, BanList()
        self.head = load_head(ckpt)
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
        self.total_blocks = num_blocks(ckpt)

    @classmethod
    async def from_pretrained(
        cls,
        model: str,
        peers: Sequence[str] = (),
        initial_peers: Sequence[str] = (),
        identity_path: Path | None = None,
        expected_keys: dict[str, bytes] | None = None,
        **kwargs,
    ) -> AsyncDistributedModel:
        """Nodes come from the DHT reached through `initial_peers`, or from fixed `peers` (host:port).

        kwargs: wire_dtype (float32: lossless; bfloat16: half the bytes), step_timeout, retry.
        """
        identity = Identity.load_or_create(identity_path)
        if initial_peers:
            dht = await asyncio.to_thread(start_dht, list(initial_peers), client_mode=True)
            source: PeerSource = DhtPeers(identity, dht)
        else:
            source = StaticPeers(identity, peers, expected_keys)
        return cls(await asyncio.to_thread(resolve, model), source, **kwargs)

    # ---- routing and sessions
    async def route(self, start: int = 0, end: int | None = None) -> list[Hop]:
        """Fresh hops covering blocks [start, end), avoiding nodes that failed recently."""
        found = await self.source.candidates(
            self.ckpt.name, self.ckpt.revision, self.total_blocks, exclude=self.bans.banned()
        )
        nodes = {candidate.key: node for candidate, node in found}
        end = self.total_blocks if end is None else end
        route = find_route([candidate for candidate, _ in found], end, start=start)
        return [Hop(nodes[r.key], r.start, r.end) for r in route]

    async def open_session(self, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 1) -> InferenceSession:
        return InferenceSession(
            await self.route(), max_length, batch_size, self.wire_dtype, self.step_timeout,
            router=self.route, on_failure=lambda node: self.bans.ban(node.address), retry=self.retry,
        )  # fmt: skip

    def session(self, max_length: int = DEFAULT_MAX_LENGTH) -> AsyncChatSession:
        """A multi-turn session: the KV cache stays on the nodes between `generate` calls."""
        return AsyncChatSession(self, max_length)

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
        self, input_ids: torch.Tensor, params: SamplingParams, session: InferenceSession | None = None, cached: int = 0
    ) -> AsyncIterator[torch.Tensor]:
        """Next token ids (B,) step by step; opens (and closes) a session unless given one."""
        own = session is None
        if own:
            session = await self.open_session(input_ids.shape[1] + params.max_new_tokens, input_ids.shape[0])
        try:
            async for new in generate_ids(self.head, session, input_ids, params, self.eos_ids, cached):
                yield new
        finally:
            if own:
                await session.close()

    async def generate(
        self, prompt: Prompt | list[str], chat: bool = False, **sampling
    ) -> torch.Tensor | list[torch.Tensor]:
        """Like transformers' generate: prompt ids followed by the new ids, (B, T + new).

        A list of strings runs as concurrent sessions and returns one tensor (1, T_i + new_i) each.
        sampling: max_new_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, seed,
        stop, ignore_eos.
        """
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            return list(await asyncio.gather(*(self.generate(p, chat, **sampling) for p in prompt)))
        ids = self.encode(prompt, chat)
        params = SamplingParams(**sampling)
        new = [n async for n in self.generate_ids(ids, params)]
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids

    async def generate_text(
        self, prompt: Prompt, params: SamplingParams, chat: bool = False
    ) -> AsyncIterator[TextPiece]:
        """One prompt's new text as it is generated: pieces, the last with the finish reason ("stop": EOS or
        a stop string, "length": max_new_tokens) and the number of tokens generated (see text_pieces)."""
        ids = self.encode(prompt, chat)
        if ids.shape[0] != 1:
            raise ValueError("generate_text and stream take one prompt (batch size 1)")
        pieces = text_pieces(self.tokenizer, self.generate_ids(ids, params), params, self.eos_ids)
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                yield piece

    def stream(self, prompt: Prompt, chat: bool = False, **sampling) -> AsyncIterator[str]:
        """Text pieces as they are generated (stop strings end the stream and are not included)."""
        return _texts(self.generate_text(prompt, SamplingParams(**sampling), chat))

    async def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of every position: scoring, perplexity, checks against a local model."""
        session = await self.open_session(input_ids.shape[1], input_ids.shape[0])
        try:
            return self.head.logits(await session.step(self.head.embed(input_ids)))
        finally:
            await session.close()

    async def close(self) -> None:
        await self.source.close()

    async def __aenter__(self) -> AsyncDistributedModel:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _texts(pieces: AsyncIterator[TextPiece]) -> AsyncIterator[str]:
    """The pieces' text, empty ones left out (the stream() contract), closing `pieces` when closed."""
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            if piece.text:
                yield piece.text


class AsyncChatSession:
    """Turns of one conversation over one inference session.

    Each call passes the whole conversation (messages, text or ids); only the tokens the nodes have not
    seen yet are sent. If the new conversation is not an extension of the cached one (an edited turn),
    the session rewinds to the common prefix instead of starting over.
    """

    def __init__(self, model: AsyncDistributedModel, max_length: int):
        self.model, self.max_length = model, max_length
        self.session: InferenceSession | None = None
        self.cached: list[int] = []  # token ids whose keys/values are on the nodes
        self.history: list[int] = []  # the conversation so far, generated tokens included

    async def __aenter__(self) -> AsyncChatSession:
        self.session = await self.model.open_session(self.max_length)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    def _ids(self, prompt: Prompt, chat: bool) -> torch.Tensor:
        if isinstance(prompt, str) and not chat and self.history:  # plain text continues the conversation
            more = self.model.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            return torch.cat([torch.tensor([self.history]), more], dim=1)
        return self.model.encode(prompt, chat)

    async def generate_ids(self, prompt: Prompt, chat: bool = False, **sampling) -> AsyncIterator[torch.Tensor]:
        ids = self._ids(prompt, chat)
        if ids.shape[0] != 1:
            raise ValueError("a chat session holds one conversation (batch size 1)")
        flat = ids[0].tolist()
        common = 0
        while common < min(len(flat), len(self.cached)) and flat[common] == self.cached[common]:
            common += 1
        common = min(common, len(flat) - 1)  # at least one token must go through the nodes
        params = SamplingParams(**sampling)
        if len(flat) + params.max_new_tokens > self.max_length:
            raise ValueError(f"the conversation would exceed the session's max_length {self.max_length}")
        self.cached, self.history = flat, list(flat)
        async for new in self.model.generate_ids(ids, params, self.session, cached=common):
            token = int(new[0])
            self.cached, self.history = list(self.history), self.history + [token]  # all but the newest are cached
            yield new

    async def generate(self, prompt: Prompt, chat: bool = False, **sampling) -> torch.Tensor:
        ids = self._ids(prompt, chat)
        new = [n async for n in self.generate_ids(ids, **sampling)]
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids

    def stream(self, prompt: Prompt, chat: bool = False, **sampling) -> AsyncIterator[str]:
        new_ids, model = self.generate_ids(prompt, chat, **sampling), self.model
        return _texts(text_pieces(model.tokenizer, new_ids, SamplingParams(**sampling), model.eos_ids))


class DistributedModel:
    """Synchronous front end with the same calls as AsyncDistributedModel."""

    def __init__(self, core: AsyncDistributedModel, loop: LoopThread):
        self._core, self._loop = core, loop

    @property
    def async_model(self) -> AsyncDistributedModel:
        """The asyncio core, for calls that need it (open a session, step it); run them with `run`."""
        return self._core

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine of `async_model` on this model's event loop thread and returns its result."""
        return self._loop.run(coro)

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Drives an async iterator of `async_model` (e.g. `generate_ids`) from synchronous code."""
        return self._loop.iterate(agen)

    @classmethod
    def from_pretrained(
        cls, model: str, peers: Sequence[str] = (), initial_peers: Sequence[str] = (), **kwargs
    ) -> DistributedModel:
        """See AsyncDistributedModel.from_pretrained (grpc.aio channels bind to the loop they are made on)."""
        loop = LoopThread()
        try:
            return cls(loop.run(AsyncDistributedModel.from_pretrained(model, peers, initial_peers, **kwargs)), loop)
        except BaseException:
            loop.stop()
            raise

    @property
    def tokenizer(self):
        return self._core.tokenizer

    def generate(self, prompt: Prompt | list[str], chat: bool = False, **sampling) -> torch.Tensor | list[torch.Tensor]:
        return self._loop.run(self._core.generate(prompt, chat, **sampling))

    def stream(self, prompt: Prompt, chat: bool = False, **sampling) -> Iterator[str]:
        return self._loop.iterate(self._core.stream(prompt, chat, **sampling))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._loop.run(self._core.logits(input_ids))

    def session(self, max_length: int = DEFAULT_MAX_LENGTH) -> ChatSession:
        return ChatSession(self._core.session(max_length), self._loop)

    def close(self) -> None:
        try:
            self._loop.run(self._core.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChatSession:
    """Synchronous twin of AsyncChatSession."""

    def __init__(self, core: AsyncChatSession, loop: LoopThread):
        self._core, self._loop = core, loop

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation whose keys and values the nodes hold."""
        return len(self._core.cached)

    def __enter__(self) -> ChatSession:
        self._loop.run(self._core.__aenter__())
        return self

    def __exit__(self, *exc) -> None:
        self._loop.run(self._core.__aexit__(*exc))

    def generate(self, prompt: Prompt, chat: bool = False, **sampling) -> torch.Tensor:
        return self._loop.run(self._core.generate(prompt, chat, **sampling))

    def stream(self, prompt: Prompt, chat: bool = False, **sampling) -> Iterator[str]:
        return self._loop.iterate(self._core.stream(prompt, chat, **sampling))
