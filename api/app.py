"""The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions over an OpenAIServer, and the chat page.

Streamed answers are server-sent events: `data: {chunk}` lines, then `data: [DONE]`. Every error,
FastAPI's own included, has OpenAI's shape (errors.py). The OpenAPI schema says what this server serves.
Each answer tells its route: the `X-Torchnode-Route` header (the chain the session opened on) and, on the
finished choice, the `torchnode` extension (route at the end, nodes replaced, verified, timing). With API
keys (auth.py), /v1/* needs `Authorization: Bearer KEY`; /chat is a static page that asks for the key.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ..client.model import AsyncDistributedModel
from ..protocol.version import __version__
from .auth import ApiKeys
from .chat_page import chat_page
from .errors import SWARM_ERRORS, ApiError, failure, validation_error
from .handlers import OpenAIServer, Streamed
from .jobs import ROUTE_HEADER, route_header
from .schema import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)

log = logging.getLogger(__name__)

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 503)}
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def create_app(
    model: AsyncDistributedModel,
    served_name: str,
    context_length: int | None = None,
    api_keys: ApiKeys | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` as `served_name`.

    context_length: prompt + completion tokens a request may use [default: the model's
    max_position_embeddings, at most 2048]; max_tokens defaults to what is left of it in chat.
    api_keys: the keys /v1/* requests must present (`Authorization: Bearer KEY`); None or empty: open.
    """
    server = OpenAIServer(model, served_name, context_length)
    keys = api_keys or ApiKeys()

    async def authorized(request: Request) -> None:
        keys.check(request.headers.get("authorization"))

    app = FastAPI(
        title="torchnode OpenAI-compatible API",
        version=__version__,
        description=f"Serves {served_name!r} from a torchnode swarm. Errors have OpenAI's shape.",
    )
    app.state.server = server
    guarded = [Depends(authorized)]

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded)
    async def list_models() -> ModelList:
        return await server.models()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS, dependencies=guarded)
    async def retrieve_model(model_id: str) -> ModelCard:
        return await server.model_card(model_id)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**ERRORS, **STREAMED},
        dependencies=guarded,
    )
    async def chat_completions(body: ChatCompletionRequest, response: Response):
        result = await server.chat(body)
        if isinstance(result, Streamed):
            return event_stream(result)
        response.headers[ROUTE_HEADER] = route_header(result.choices[0].torchnode.route)
        return result

    @app.post("/v1/completions", response_model=Completion, responses={**ERRORS, **STREAMED}, dependencies=guarded)
    async def completions(body: CompletionRequest, response: Response):
        result = await server.complete(body)
        if isinstance(result, Streamed):
            return event_stream(result)
        info = result.choices[0].torchnode
        response.headers[ROUTE_HEADER] = route_header(info.route if info else [])
        return result

    @app.get("/chat", include_in_schema=False)
    async def chat() -> Response:
        page, policy = chat_page()
        headers = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/chat/config", include_in_schema=False)
    async def chat_config() -> dict:
        """What the page shows before the first answer (no key needed: nothing here is secret)."""
        return {"model": served_name, "verify": bool(model.config.verify), "api_key_required": bool(keys)}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if e.status_code == 404 else str(e.detail)
        return ApiError(e.status_code, message).response()

    async def failed(request: Request, e: Exception) -> JSONResponse:  # the swarm's 503, or a 500
        return failure(e).response()

    for error in (*SWARM_ERRORS, Exception):
        app.add_exception_handler(error, failed)

    _openapi_describes_server(app, server)
    return app


def event_stream(streamed: Streamed) -> StreamingResponse:
    """Chunks as server-sent events, then `[DONE]`; an error mid-stream travels as an event in OpenAI's
    shape (the status line is gone; the openai client raises it). A client that disconnects (the chat page's
    stop button) cancels the stream, and with it the sessions on the nodes (jobs.run_job)."""
    chunks: AsyncIterator[BaseModel] = streamed.chunks

    async def body() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield f"data: {chunk.model_dump_json()}\n\n"
        except Exception as e:
            if not isinstance(e, SWARM_ERRORS):
                log.exception("generation failed in a stream")
            yield f"data: {failure(e).body().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", ROUTE_HEADER: streamed.route}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _openapi_describes_server(app: FastAPI, server: OpenAIServer) -> None:
    """The schema says what this server does: bad requests are 400 with an OpenAI body, never 422; `model`
    is the model served or one of its adapters (as of the latest listing: the schema is built without probing);
    token ids are below the vocabulary size and max_tokens within the context (so clients and fuzzers generated
    from the schema send requests it can serve)."""
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
            fields["model"] = {"type": "string", "enum": server.model_ids(), "title": "Model"}
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
