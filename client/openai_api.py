"""An OpenAI-compatible HTTP API over the swarm: /v1/models, /v1/chat/completions, /v1/completions.

One AsyncDistributedModel serves every request on the server's event loop; each request (each prompt
of a batch of prompts) opens its own inference session. Streamed answers are server-sent events:
`data: {chunk}` lines, then `data: [DONE]`. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (validation errors included),
404 for an unknown model or URL, 503 when the swarm cannot serve it.

`create_app(model, served_name)` builds the FastAPI app; `run_api(...)` loads the model and serves it
with uvicorn (the `torchnode api` command).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from .. import __version__
from .model import DEFAULT_MAX_LENGTH, AsyncDistributedModel
from .openai_schema import (
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
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from .routing import NoRouteError
from .sampling import SamplingParams
from .text_stream import TextStream
from .transport import NodeError

log = logging.getLogger(__name__)

SAMPLING_EPS = 1e-5  # temperature or top_p below it is greedy (logits / 1e-40 overflow; top_p 1e-50 is 0 in float32)
ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 503)}
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


class ApiError(Exception):
    """A failure the client receives as an OpenAI error body with an HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error",
    ):  # fmt: skip
        super().__init__(message)
        self.status, self.detail = status, ErrorDetail(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.detail).model_dump(), status_code=self.status)


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="unsupported_value")


def _swarm_error(e: Exception) -> ApiError:
    message = f"the swarm could not serve the request: {e}"
    return ApiError(503, message, type="service_unavailable", code="swarm_unavailable")


# ---- generation: one job per prompt, its text as pieces, the last piece with the finish reason


@dataclass
class Job:
    index: int  # the choice it fills
    ids: torch.Tensor  # prompt (1, T)
    params: SamplingParams
    echo: str = ""  # text to put before the completion
    completion_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.ids.shape[1]


@dataclass(frozen=True)
class Piece:
    index: int
    text: str
    finish_reason: str | None = None  # set on a job's last piece: "stop" (EOS or a stop string) or "length"


async def run_job(model: AsyncDistributedModel, job: Job) -> AsyncIterator[Piece]:
    """The job's text as it is generated; decoding and stop strings as in AsyncDistributedModel.stream."""
    if job.echo:
        yield Piece(job.index, job.echo)
    if job.params.max_new_tokens == 0:
        yield Piece(job.index, "", "length")
        return
    text = TextStream(model.tokenizer, job.params.stop)
    eos = set() if job.params.ignore_eos else set(model.eos_ids)
    token = None
    async with contextlib.aclosing(model.generate_ids(job.ids, job.params)) as new_ids:  # closes the session
        async for new in new_ids:
            token = int(new[0])
            job.completion_tokens += 1
            piece = text.push(token)
            if text.stopped:
                yield Piece(job.index, piece, "stop")
                return
            if piece:
                yield Piece(job.index, piece)
    yield Piece(job.index, text.flush(), "stop" if token in eos else "length")


async def merge(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Items of all streams as they come; the first error stops (and closes) every stream."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[Piece | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as e:
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first_and_rest(events: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """Waits for the first piece now, so that a swarm failure is an HTTP 503, not a stream that breaks."""
    first = await anext(events)

    async def chained() -> AsyncIterator[Piece]:
        async with contextlib.aclosing(events):
            yield first
            async for piece in events:
                yield piece

    return chained()


def event_stream(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield f"data: {chunk.model_dump_json()}\n\n"
        except Exception as e:  # the status line is gone: the error travels as an event (the openai client raises it)
            if isinstance(e, (NodeError, NoRouteError)):
                error = _swarm_error(e)
            else:
                log.exception("generation failed in a stream")
                error = ApiError(500, f"internal error: {e}", type="server_error")
            yield f"data: {ErrorResponse(error=error.detail).model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- the server


class OpenAIServer:
    """The endpoints' logic, free of HTTP: requests in, response models (or chunk iterators) out."""

    def __init__(self, model: AsyncDistributedModel, served_name: str, context_length: int | None = None):
        self.model, self.served_name, self.created = model, served_name, int(time.time())
        config = model.ckpt.hf_config
        positions = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self.context_length = context_length or min(positions, DEFAULT_MAX_LENGTH)
        self.vocab_size = config.vocab_size
        self.fingerprint = f"torchnode-{model.ckpt.revision}"

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.served_name, created=self.created)])

    def model_card(self, model_id: str) -> ModelCard:
        self._check_model(model_id)
        return ModelCard(id=self.served_name, created=self.created)

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[ChatCompletionChunk]:
        self._check_common(body)
        if body.logprobs:
            raise _unsupported("logprobs", "log probabilities are not supported")
        if body.tools:
            raise _unsupported("tools", "tool calls are not supported")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "only {'type': 'text'} is supported")
        ids = self._chat_ids(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = Job(0, ids, self._params(body, ids.shape[1], max_tokens, "messages"))
        events = run_job(self.model, job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._chat_chunks(rid, created, await first_and_rest(events), [job], include_usage)
        texts, finish = await self._collect(events, 1)
        return ChatCompletion(
            id=rid, created=created, model=self.served_name, system_fingerprint=self.fingerprint, usage=_usage([job]),
            choices=[ChatChoice(index=0, message=AssistantMessage(content=texts[0]), finish_reason=finish[0])],
        )  # fmt: skip

    async def complete(self, body: CompletionRequest) -> Completion | AsyncIterator[Completion]:
        self._check_common(body)
        if body.suffix:
            raise _unsupported("suffix", "insertion (suffix) is not supported")
        if body.best_of is not None and body.best_of > 1:
            raise _unsupported("best_of", "only best_of=1 is supported")
        if body.logprobs is not None:
            raise _unsupported("logprobs", "log probabilities are not supported")
        jobs = [
            Job(i, ids, self._params(body, ids.shape[1], body.max_tokens, "prompt"), echo if body.echo else "")
            for i, (ids, echo) in enumerate(self._prompts(body.prompt))
        ]
        events = merge([run_job(self.model, job) for job in jobs])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._completion_chunks(rid, created, await first_and_rest(events), jobs, include_usage)
        texts, finish = await self._collect(events, len(jobs))
        return Completion(
            id=rid, created=created, model=self.served_name, system_fingerprint=self.fingerprint, usage=_usage(jobs),
            choices=[CompletionChoice(index=i, text=texts[i], finish_reason=finish[i]) for i in range(len(jobs))],
        )  # fmt: skip

    # ---- streams
    async def _chat_chunks(
        self, rid: str, created: int, events: AsyncIterator[Piece], jobs: list[Job], include_usage: bool
    ) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(
                id=rid, created=created, model=self.served_name, system_fingerprint=self.fingerprint, choices=[choice]
            )

        yield chunk(ChatDelta(role="assistant", content=""))
        async with contextlib.aclosing(events):
            async for piece in events:
                if piece.text:
                    yield chunk(ChatDelta(content=piece.text))
                if piece.finish_reason:
                    yield chunk(ChatDelta(), piece.finish_reason)
        if include_usage:
            yield ChatCompletionChunk(
                id=rid, created=created, model=self.served_name, system_fingerprint=self.fingerprint, choices=[],
                usage=_usage(jobs),
            )  # fmt: skip

    async def _completion_chunks(
        self, rid: str, created: int, events: AsyncIterator[Piece], jobs: list[Job], include_usage: bool
    ) -> AsyncIterator[Completion]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
            return Completion(
                id=rid, created=created, model=self.served_name, system_fingerprint=self.fingerprint, choices=choices,
                usage=usage,
            )  # fmt: skip

        async with contextlib.aclosing(events):
            async for piece in events:
                if piece.text or piece.finish_reason:
                    choice = CompletionChoice(index=piece.index, text=piece.text, finish_reason=piece.finish_reason)
                    yield chunk([choice])
        if include_usage:
            yield chunk([], _usage(jobs))

    async def _collect(self, events: AsyncIterator[Piece], n: int) -> tuple[list[str], list[str]]:
        texts: list[list[str]] = [[] for _ in range(n)]
        finish = ["length"] * n
        async with contextlib.aclosing(events):
            async for piece in events:
                texts[piece.index].append(piece.text)
                finish[piece.index] = piece.finish_reason or finish[piece.index]
        return ["".join(t) for t in texts], finish

    # ---- request checks and prompts
    def _check_model(self, name: str) -> None:
        if name != self.served_name:
            raise ApiError(
                404, f"The model {name!r} does not exist: this server serves {self.served_name!r}.",
                param="model", code="model_not_found",
            )  # fmt: skip

    def _check_common(self, body: SamplingFields) -> None:
        self._check_model(body.model)
        if body.n is not None and body.n > 1:
            raise _unsupported("n", "only n=1 is supported (one choice per request); send n requests, other seeds")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise _unsupported(name, "only 0 is supported; repetition_penalty (an extension) is available")
        if body.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")

    def _params(
        self, body: SamplingFields, prompt_tokens: int, max_tokens: int | None, prompt_param: str
    ) -> SamplingParams:
        limit = self.context_length
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty: give at least one token", param=prompt_param)
        if prompt_tokens > limit or (max_tokens is None and prompt_tokens == limit):
            raise ApiError(
                400, f"This model's maximum context length is {limit} tokens. However, your {prompt_param} "
                f"resulted in {prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
                param=prompt_param, code="context_length_exceeded",
            )  # fmt: skip
        if max_tokens is None:
            max_tokens = limit - prompt_tokens
        elif prompt_tokens + max_tokens > limit:
            raise ApiError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {prompt_param}, {max_tokens} in the "
                f"completion). Please reduce the length of the {prompt_param} or completion.",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if temperature < SAMPLING_EPS or top_p < SAMPLING_EPS:  # the limits: the likeliest token, and no overflow
            temperature, top_p = 0.0, 1.0
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(body.top_k or 0, 0),
            repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=stop,
            ignore_eos=bool(body.ignore_eos),
        )  # fmt: skip

    def _chat_ids(self, messages: list[ChatMessage]) -> torch.Tensor:
        conversation = []
        for i, message in enumerate(messages):
            content = message.content
            if isinstance(content, list):
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise _unsupported(f"messages[{i}].content", f"only text parts are served, not {part.type!r}")
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


def _usage(jobs: list[Job]) -> Usage:
    prompt, completion = sum(j.prompt_tokens for j in jobs), sum(j.completion_tokens for j in jobs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def create_app(model: AsyncDistributedModel, served_name: str, context_length: int | None = None) -> FastAPI:
    """The FastAPI app serving `model` as `served_name`.

    context_length: prompt + completion tokens a request may use [default: the model's
    max_position_embeddings, at most 2048]; max_tokens defaults to what is left of it in chat.
    """
    server = OpenAIServer(model, served_name, context_length)
    app = FastAPI(
        title="torchnode OpenAI-compatible API", version=__version__,
        description=f"Serves {served_name!r} from a torchnode swarm. Errors have OpenAI's shape.",
    )  # fmt: skip
    app.state.server = server

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return server.models()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def retrieve_model(model_id: str) -> ModelCard:
        return server.model_card(model_id)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **STREAMED})
    async def chat_completions(body: ChatCompletionRequest):
        result = await server.chat(body)
        return result if isinstance(result, ChatCompletion) else event_stream(result)

    @app.post("/v1/completions", response_model=Completion, responses={**ERRORS, **STREAMED})
    async def completions(body: CompletionRequest):
        result = await server.complete(body)
        return result if isinstance(result, Completion) else event_stream(result)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if e.status_code == 404 else str(e.detail)
        return ApiError(e.status_code, message).response()

    @app.exception_handler(NodeError)
    @app.exception_handler(NoRouteError)
    async def swarm_error(request: Request, e: Exception) -> JSONResponse:  # no route, or the nodes failed on retry
        return _swarm_error(e).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {e}", type="server_error").response()

    _openapi_describes_server(app, server)
    return app


def _validation_error(e: RequestValidationError) -> ApiError:
    """FastAPI's list of pydantic errors -> OpenAI's 400 naming the first bad parameter, `messages[0].role`.

    A value that fits no member of a union fails once per member: those messages are joined with "or".
    """
    errors = [(_param(error.get("loc", ())), error) for error in e.errors()]
    if not errors:
        return ApiError(400, "invalid request")
    param, first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return ApiError(400, f"the body is not valid JSON: {reason}", code="json_invalid")
    same = [error for p, error in errors if p == param]
    message = " or ".join(dict.fromkeys(error.get("msg", "invalid value") for error in same))
    if len(errors) > len(same):
        message += f" (and {len(errors) - len(same)} more errors)"
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code=first.get("type"))


def _param(loc: Sequence[str | int]) -> str | None:
    parts = [p for p in loc if p != "body" and not _union_tag(p)]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or None


def _union_tag(part: str | int) -> bool:
    """pydantic names the member of a union in an error's location ('str', 'list[int]'): not a parameter."""
    if not isinstance(part, str):
        return False
    return part in ("str", "int", "float", "bool", "none") or "[" in part or "-" in part or part[:1].isupper()


def _openapi_describes_server(app: FastAPI, server: OpenAIServer) -> None:
    """The schema says what this server does: bad requests are 400 with an OpenAI body, never 422; `model`
    is the one model served; token ids are below the vocabulary size and max_tokens within the context
    (so clients and fuzzers generated from the schema send requests it can serve)."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            fields = components[name]["properties"]
            fields["model"] = {"type": "string", "enum": [server.served_name], "title": "Model"}
            for limited in ("max_tokens", "max_completion_tokens"):
                _set_on_integers(fields.get(limited), "maximum", server.context_length)
        _set_on_integers(components["CompletionRequest"]["properties"]["prompt"], "maximum", server.vocab_size - 1)
        return schema

    app.openapi = openapi


def _set_on_integers(node: dict | list | None, key: str, value: int) -> None:
    if isinstance(node, list):
        for item in node:
            _set_on_integers(item, key, value)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            node[key] = value
        for item in node.values():
            _set_on_integers(item, key, value)


# ---- the runner behind `torchnode api`


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # run_api handles SIGINT/SIGTERM itself, so that serving returns and the model closes
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


async def run_api(
    model: str,
    peers: Sequence[str] = (),
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 8000,
    on_status: Callable[[str], None] = print,
    *,
    served_name: str | None = None,
    context_length: int | None = None,
    **model_kwargs,
) -> None:
    """Serves the OpenAI API until SIGINT or SIGTERM; model_kwargs go to AsyncDistributedModel.from_pretrained
    (identity_path, expected_keys, wire_dtype, step_timeout). Port 0 picks a free port (named in the ready line)."""
    sock = _bind(host, port)  # before loading anything, so a port in use fails at once
    try:
        on_status("loading the model's head and tokenizer, finding nodes")
        core = await AsyncDistributedModel.from_pretrained(model, peers, initial_peers, **model_kwargs)
        try:
            await _serve(create_app(core, served_name or model, context_length), sock, served_name or model, on_status)
        finally:
            await core.close()
    finally:
        sock.close()


async def _serve(app: FastAPI, sock: socket.socket, name: str, on_status: Callable[[str], None]) -> None:
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()

    def stop() -> None:
        if server.should_exit:  # a second signal: stop waiting for open streams
            server.force_exit = True
        server.should_exit = True

    for sig in signals:
        loop.add_signal_handler(sig, stop)
    try:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            bound_host, bound_port = sock.getsockname()[:2]
            on_status(f"ready: OpenAI API at http://{bound_host}:{bound_port}/v1 serving model {name!r}")
        await serving
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
