"""Request and response bodies of the OpenAI API, the part torchnode serves (see handlers.py).

Field names, defaults and ranges follow OpenAI's reference, so the official clients work unchanged.
Parameters torchnode cannot honour (n > 1, logprobs, logit_bias, penalties, tools, suffix, best_of) pass
validation and are refused by the server with a 400 that says so; the JSON schema lists only the values
served (json_schema_extra). Unknown fields are ignored, as other OpenAI-compatible servers do. `top_k`,
`repetition_penalty` and `ignore_eos` are extensions (vLLM spells them the same way).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FinishReason = Literal["stop", "length"]
MAX_PROMPTS = 16  # prompts in one /v1/completions request; each is a session on the nodes
TokenId = Annotated[int, Field(ge=0)]  # the server checks (and its OpenAPI schema says) < vocab size
ONLY_ONE = {"maximum": 1}  # JSON schema keywords beside a field's anyOf: what the server accepts of it
ONLY_ZERO = {"minimum": 0, "maximum": 0}
EMPTY_OBJECT = {"maxProperties": 0}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """What chat and text completions share."""

    model: str
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 (below 1e-5) = greedy")
    top_p: float | None = Field(1.0, ge=0, le=1, description="nucleus sampling; 0 (below 1e-5) = greedy")
    n: int | None = Field(1, ge=1, description="only 1 is supported", json_schema_extra=ONLY_ONE)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(None, description="not in the output")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2, description="only 0", json_schema_extra=ONLY_ZERO)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2, description="only 0", json_schema_extra=ONLY_ZERO)
    logit_bias: dict[str, float] | None = Field(None, description="not supported", json_schema_extra=EMPTY_OBJECT)
    user: str | None = None
    # extensions
    top_k: int | None = Field(None, ge=-1, description="extension: sample from the k likeliest tokens; 0 or -1 = all")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100, description="extension: as transformers'")
    ignore_eos: bool | None = Field(None, description="extension: keep generating past the end-of-sequence token")


class ContentPart(_Request):
    type: str = Field(description="only 'text' parts are supported")
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, description="default: what the context leaves")
    max_completion_tokens: int | None = Field(None, ge=0, description="the newer name of max_tokens")
    logprobs: bool | None = Field(None, description="not supported", json_schema_extra={"enum": [False, None]})
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported", json_schema_extra={"maxItems": 0})
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'} is supported")


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="text, a list of texts (one choice each), token ids, or a list of token id lists")
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    suffix: str | None = Field(None, description="not supported", json_schema_extra={"maxLength": 0})
    best_of: int | None = Field(None, ge=1, description="only 1 is supported", json_schema_extra=ONLY_ONE)
    logprobs: int | None = Field(None, ge=0, le=5, description="not supported", json_schema_extra={"enum": [None]})


# ---- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class RouteHop(BaseModel):
    """One node of the chain an answer took."""

    address: str = Field(description="host:port the client dialled (a relay's port when relayed)")
    peer_id: str | None = Field(None, description="the node's peer id (hash of its Ed25519 key)")
    start: int = Field(description="first block it served")
    end: int = Field(description="block after its last")
    tls: bool | None = Field(None, description="the link is TLS (false: --insecure plaintext; null: not known)")
    relayed: bool = Field(False, description="reached through a relay (the node is behind a NAT)")


class AnswerInfo(BaseModel):
    """Extension `torchnode` on a finished choice: how the swarm served it (the chat page shows it)."""

    route: list[RouteHop] = Field(description="the chain at the end of the answer, in block order")
    replaced: list[RouteHop] = Field(
        default_factory=list, description="nodes of the first chain that failed mid-answer and were replaced"
    )
    verified: bool = Field(description="every hop's outputs were recomputed elsewhere and matched (--verify)")
    time_to_first_token_s: float | None = Field(None, description="from the request to the first new token")
    tokens_per_second: float | None = Field(None, description="decode speed after the first token")
    completion_tokens: int = 0


class _WithAnswerInfo(BaseModel):
    torchnode: AnswerInfo | None = Field(None, description="extension, on a finished choice: route and timing")

    @model_serializer(mode="wrap")
    def _drop_missing_info(self, handler) -> dict:  # only the finished choice carries it
        out = handler(self)
        if out.get("torchnode") is None:
            out.pop("torchnode", None)
        return out


class ChatChoice(_WithAnswerInfo):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class _Response(BaseModel):
    """What every completion object and chunk carries besides its choices."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler) -> dict:  # the last chunk's delta is {}, as OpenAI sends it
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_WithAnswerInfo):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_WithAnswerInfo):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(_Response):
    """A text completion; streamed chunks have the same shape, with usage only on the last one."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "torchnode"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
