"""The endpoints' logic, free of HTTP: validated request bodies in, response models or chunk iterators out.

Each request (each prompt of a batch of prompts) runs as a job with its own inference session on the
swarm; streamed answers are iterators of chunks that app.py sends as server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

from ..client.model import DEFAULT_MAX_LENGTH, AsyncDistributedModel
from ..client.sampling import MIN_TEMPERATURE, SamplingParams
from ..protocol.dht.coverage import coverage
from .errors import ApiError, unsupported
from .jobs import Job, Piece, first_and_rest, merge, route_header, run_job, usage_of
from .schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)

log = logging.getLogger(__name__)

ADAPTERS_TTL = 5.0  # seconds a listing of the swarm's adapters is reused before the nodes are probed again


@dataclass(frozen=True)
class AdapterListing:
    """The LoRA adapters of the swarm at one moment, as the Info of the nodes serving this checkpoint says."""

    served: tuple[str, ...] = ()  # sorted; for each, nodes that serve it cover every block: a request can use it
    named: frozenset[str] = frozenset()  # served by at least one live node (maybe not on every block)
    nodes: int = 0  # live nodes found; 0: the swarm is unreachable, so no adapter can be said to be unknown


class SwarmAdapters:
    """The swarm's adapters, probed at most once per `ttl` seconds: /v1/models and every request naming an
    adapter would otherwise send an Info to every node. A node that joins with an adapter shows up within ttl."""

    def __init__(self, model: AsyncDistributedModel, ttl: float = ADAPTERS_TTL):
        self.model, self.ttl = model, ttl
        self.listing, self.expires = AdapterListing(), float("-inf")  # time.monotonic() seconds
        self._lock = asyncio.Lock()  # concurrent callers share one probe

    async def get(self) -> AdapterListing:
        async with self._lock:
            if time.monotonic() >= self.expires:
                self.listing = await self._probe()
                self.expires = time.monotonic() + self.ttl
            return self.listing

    async def _probe(self) -> AdapterListing:
        """Candidates as routing sees them (same checkpoint, allowed keys, no banned or dishonest node)."""
        m = self.model
        try:
            found = await m.candidates()
        except Exception as e:  # e.g. the DHT failed: list the base model alone, and let requests say why
            log.warning("could not list the swarm's adapters: %r", e)
            return AdapterListing()
        named = {a for candidate, _ in found for a in candidate.adapters}
        served = [
            a
            for a in sorted(named)
            if not coverage(
                [(c.start, c.end, c.throughput) for c, _ in found if a in c.adapters], m.total_blocks
            ).missing
        ]
        return AdapterListing(tuple(served), frozenset(named), len(found))


@dataclass(frozen=True)
class Streamed:
    """A streamed answer: its chunks, and the route its (first) session opened on, for a response header."""

    chunks: AsyncIterator
    route: str


class OpenAIServer:
    """The endpoints' logic, free of HTTP: requests in, response models (or chunk iterators) out."""

    def __init__(self, model: AsyncDistributedModel, served_name: str, context_length: int | None = None):
        self.model, self.served_name, self.created = model, served_name, int(time.time())
        config = model.ckpt.hf_config
        positions = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self.context_length = context_length or min(positions, DEFAULT_MAX_LENGTH)
        self.vocab_size = config.vocab_size
        self.fingerprint = f"torchnode-{model.ckpt.revision}"
        self.adapters = SwarmAdapters(model)

    async def models(self) -> ModelList:
        """The base model, then one `BASE:ADAPTER` per adapter the swarm serves on every block."""
        await self.adapters.get()
        return ModelList(data=[ModelCard(id=i, created=self.created) for i in self.model_ids()])

    def model_ids(self) -> list[str]:
        """BASE and BASE:ADAPTER ids of the latest adapter listing (none before the first)."""
        return [self.served_name, *(f"{self.served_name}:{a}" for a in self.adapters.listing.served)]

    async def model_card(self, model_id: str) -> ModelCard:
        adapter = self._check_model(model_id)
        if adapter is not None and adapter not in (await self.adapters.get()).served:
            raise self._no_adapter(model_id, adapter)
        return ModelCard(id=model_id, created=self.created)

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion | Streamed:
        adapter = await self._check_common(body)
        if body.logprobs:
            raise unsupported("logprobs", "log probabilities are not supported")
        if body.tools:
            raise unsupported("tools", "tool calls are not supported")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise unsupported("response_format", "only {'type': 'text'} is supported")
        ids = self._chat_ids(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = Job(0, ids, self._params(body, ids.shape[1], max_tokens, "messages"), adapter=adapter)
        events = run_job(self.model, job)
        header = self._header(f"chatcmpl-{uuid.uuid4().hex}", body.model)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._chat_chunks(header, await first_and_rest(events), [job], include_usage)
            return Streamed(chunks, route_header(job.route))
        texts, finish = await self._collect(events, 1)
        message = AssistantMessage(content=texts[0])
        choice = ChatChoice(index=0, message=message, finish_reason=finish[0], torchnode=job.info())
        return ChatCompletion(**header, choices=[choice], usage=usage_of([job]))

    async def complete(self, body: CompletionRequest) -> Completion | Streamed:
        adapter = await self._check_common(body)
        if body.suffix:
            raise unsupported("suffix", "insertion (suffix) is not supported")
        if body.best_of is not None and body.best_of > 1:
            raise unsupported("best_of", "only best_of=1 is supported")
        if body.logprobs is not None:
            raise unsupported("logprobs", "log probabilities are not supported")
        jobs = [
            Job(
                i,
                ids,
                self._params(body, ids.shape[1], body.max_tokens, "prompt"),
                echo if body.echo else "",
                adapter=adapter,
            )
            for i, (ids, echo) in enumerate(self._prompts(body.prompt))
        ]
        events = merge([run_job(self.model, job) for job in jobs])
        header = self._header(f"cmpl-{uuid.uuid4().hex}", body.model)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._completion_chunks(header, await first_and_rest(events), jobs, include_usage)
            return Streamed(chunks, route_header(jobs[0].route))
        texts, finish = await self._collect(events, len(jobs))
        choices = [
            CompletionChoice(index=i, text=texts[i], finish_reason=finish[i], torchnode=jobs[i].info())
            for i in range(len(jobs))
        ]
        return Completion(**header, choices=choices, usage=usage_of(jobs))

    # ---- streams
    def _header(self, rid: str, model: str) -> dict:
        """What every completion object and chunk of one response carries besides its choices; `model` is the
        request's (BASE, or BASE:ADAPTER: the answer says which adapter wrote it)."""
        return dict(id=rid, created=int(time.time()), model=model, system_fingerprint=self.fingerprint)

    async def _chat_chunks(
        self, header: dict, events: AsyncIterator[Piece], jobs: list[Job], include_usage: bool
    ) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
            info = jobs[0].info() if finish_reason else None
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason, torchnode=info)
            return ChatCompletionChunk(**header, choices=[choice])

        yield chunk(ChatDelta(role="assistant", content=""))
        async with contextlib.aclosing(events):
            async for piece in events:
                if piece.text:
                    yield chunk(ChatDelta(content=piece.text))
                if piece.finish_reason:
                    yield chunk(ChatDelta(), piece.finish_reason)
        if include_usage:
            yield ChatCompletionChunk(**header, choices=[], usage=usage_of(jobs))

    async def _completion_chunks(
        self, header: dict, events: AsyncIterator[Piece], jobs: list[Job], include_usage: bool
    ) -> AsyncIterator[Completion]:
        async with contextlib.aclosing(events):
            async for piece in events:
                if piece.text or piece.finish_reason:
                    info = jobs[piece.index].info() if piece.finish_reason else None
                    choice = CompletionChoice(
                        index=piece.index, text=piece.text, finish_reason=piece.finish_reason, torchnode=info
                    )
                    yield Completion(**header, choices=[choice])
        if include_usage:
            yield Completion(**header, choices=[], usage=usage_of(jobs))

    async def _collect(self, events: AsyncIterator[Piece], n: int) -> tuple[list[str], list[str]]:
        texts: list[list[str]] = [[] for _ in range(n)]
        finish = ["length"] * n
        async with contextlib.aclosing(events):
            async for piece in events:
                texts[piece.index].append(piece.text)
                finish[piece.index] = piece.finish_reason or finish[piece.index]
        return ["".join(t) for t in texts], finish

    # ---- request checks and prompts
    def _check_model(self, name: str) -> str | None:
        """The LoRA adapter a model id names ("BASE:ADAPTER"; None for BASE itself); 404 for another model."""
        base, colon, adapter = name.partition(":")
        if base != self.served_name or (colon and not adapter):
            raise ApiError(
                404,
                f"The model {name!r} does not exist: this server serves {self.served_name!r}.",
                param="model",
                code="model_not_found",
            )
        return adapter or None

    def _no_adapter(self, model_id: str, adapter: str) -> ApiError:
        return ApiError(
            404,
            f"The model {model_id!r} does not exist: no node of the swarm serves the adapter {adapter!r} "
            "(GET /v1/models lists the adapters served).",
            param="model",
            code="model_not_found",
        )

    async def _check_common(self, body: SamplingFields) -> str | None:
        """Refuses what this server cannot do; returns the request's adapter (see _check_model).

        An adapter no live node serves is a 404 naming it. One that some node serves, but not on every block,
        runs and fails like any request the swarm cannot route (503, naming the adapter and the blocks)."""
        adapter = self._check_model(body.model)
        if body.n is not None and body.n > 1:
            raise unsupported("n", "only n=1 is supported (one choice per request); send n requests, other seeds")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise unsupported(name, "only 0 is supported; repetition_penalty (an extension) is available")
        if body.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported")
        if adapter is not None:  # last: the other checks are free, this one may probe the swarm
            listing = await self.adapters.get()
            if listing.nodes and adapter not in listing.named:
                raise self._no_adapter(body.model, adapter)
        return adapter

    def _params(
        self, body: SamplingFields, prompt_tokens: int, max_tokens: int | None, prompt_param: str
    ) -> SamplingParams:
        limit = self.context_length
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty: give at least one token", param=prompt_param)
        if prompt_tokens > limit or (max_tokens is None and prompt_tokens == limit):
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your {prompt_param} "
                f"resulted in {prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = limit - prompt_tokens
        elif prompt_tokens + max_tokens > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {prompt_param}, {max_tokens} in the "
                f"completion). Please reduce the length of the {prompt_param} or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if temperature < MIN_TEMPERATURE or top_p < MIN_TEMPERATURE:  # either limit is the likeliest token
            temperature, top_p = 0.0, 1.0
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=max(body.top_k or 0, 0),
            repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed,
            stop=stop,
            ignore_eos=bool(body.ignore_eos),
        )

    def _chat_ids(self, messages: list[ChatMessage]) -> torch.Tensor:
        conversation = []
        for i, message in enumerate(messages):
            content = message.content
            if isinstance(content, list):
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise unsupported(f"messages[{i}].content", f"only text parts are served, not {part.type!r}")
                content = "\n".join(part.text for part in content)
            role = "system" if message.role == "developer" else message.role  # templates know system, not developer
            conversation.append({"role": role, "content": content or ""})
        try:
            return self.model.encode(conversation)
        except TemplateError as e:
            raise ApiError(400, f"the model's chat template refused the messages: {e}", param="messages") from e
        except ValueError as e:  # no chat template
            raise ApiError(400, str(e), param="messages") from e

    def _prompts(self, prompt: str | list) -> list[tuple[torch.Tensor, str]]:
        """(ids (1, T), text) of each prompt: text, texts, token ids, or lists of token ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((self.model.encode(p), p))
                continue
            if any(t >= self.vocab_size for t in p):
                message = f"prompt: token ids must be below the vocabulary size {self.vocab_size}"
                raise ApiError(400, message, param="prompt")
            out.append((torch.tensor([p], dtype=torch.long), self.model.tokenizer.decode(p)))
        return out
