"""The SDK: a model whose blocks run on the swarm while embeddings and LM head run here.

`AsyncDistributedModel` is the asyncio core; `DistributedModel` is the same API for synchronous code,
run on a private event loop thread (hivemind's DHT does the same).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..models.checkpoint import Checkpoint, resolve
from ..models.families import load_head, num_blocks
from ..protocol.dht_network import start_dht
from ..protocol.identity import Identity
from .generation import generate_ids
from .loop_thread import LoopThread
from .discovery import DhtPeers, PeerSource, StaticPeers
from .routing import find_route
from .sampling import SamplingParams
from .ban_list import BanList
from .session import DEFAULT_STEP_TIMEOUT, Hop, InferenceSession, RetryPolicy
from .text_stream import TextStream

DEFAULT_MAX_LENGTH = 2048


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
    async def create(
        cls,
        model: str,
        peers: Sequence[str] = (),
        initial_peers: Sequence[str] = (),
        identity_path: Path | None = None,
        expected_keys: dict[str, bytes] | None = None,
        **kwargs,
    ) -> AsyncDistributedModel:
        """Nodes come from `peers` (host:port, static) or from the DHT reached through `initial_peers`."""
        identity = Identity.load_or_create(identity_path)
        if initial_peers:
            dht = await asyncio.to_thread(start_dht, list(initial_peers), client_mode=True)
            source: PeerSource = DhtPeers(identity, dht)
        else:
            source = StaticPeers(identity, peers, expected_keys)
        return cls(await asyncio.to_thread(resolve, model), source, **kwargs)

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

    def encode_prompt(self, prompt: str, chat: bool = False) -> torch.Tensor:
        if chat:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    async def generate_ids(
        self, input_ids: torch.Tensor, params: SamplingParams, session: InferenceSession | None = None
    ) -> AsyncIterator[torch.Tensor]:
        own = session is None
        if own:
            session = await self.open_session(input_ids.shape[1] + params.max_new_tokens, input_ids.shape[0])
        try:
            async for new in generate_ids(self.head, session, input_ids, params, self.eos_ids):
                yield new
        finally:
            if own:
                await session.close()

    async def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of every position: scoring, perplexity, checks against a local model."""
        session = await self.open_session(input_ids.shape[1], input_ids.shape[0])
        try:
            return self.head.logits(await session.step(self.head.embed(input_ids)))
        finally:
            await session.close()

    async def stream(self, prompt: str, params: SamplingParams, chat: bool = False) -> AsyncIterator[str]:
        text = TextStream(self.tokenizer, params.stop)
        async for new in self.generate_ids(self.encode_prompt(prompt, chat), params):
            piece = text.push(int(new[0]))
            if piece:
                yield piece
            if text.stopped:
                return
        tail = text.flush()
        if tail:
            yield tail

    @property
    def eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        config_eos = getattr(self.ckpt.hf_config, "eos_token_id", None)
        ids = {eos} if eos is not None else set()
        ids |= set(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
        return sorted(ids)

    async def close(self) -> None:
        await self.source.close()


class DistributedModel:
    """Synchronous front end: `generate` returns ids, `stream` yields text pieces."""

    def __init__(self, core: AsyncDistributedModel, loop: LoopThread):
        self._core, self._loop = core, loop

    @classmethod
    def from_pretrained(
        cls, model: str, peers: Sequence[str] = (), initial_peers: Sequence[str] = (), **kwargs
    ) -> DistributedModel:
        """See AsyncDistributedModel.create; grpc.aio channels bind to the private loop they are made on."""
        loop = LoopThread()
        return cls(loop.run(AsyncDistributedModel.create(model, peers, initial_peers, **kwargs)), loop)

    @property
    def tokenizer(self):
        return self._core.tokenizer

    def generate(self, input_ids: torch.Tensor, **sampling) -> torch.Tensor:
        """input_ids (B, T) -> (B, T + new), like transformers' generate."""
        params = SamplingParams(**sampling)
        new = list(self._loop.iterate(self._core.generate_ids(input_ids, params)))
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._loop.run(self._core.logits(input_ids))

    def stream(self, prompt: str, chat: bool = False, **sampling) -> Iterator[str]:
        return self._loop.iterate(self._core.stream(prompt, SamplingParams(**sampling), chat))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._core.close())
        self._loop.stop()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
