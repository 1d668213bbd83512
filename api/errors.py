"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and what maps to them.

400 for a bad request (pydantic's validation errors included, named by their first bad parameter),
404 for an unknown model or URL, 503 when the swarm cannot serve the request, 500 for anything else.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..client.routing import NoRouteError
from ..protocol.wire.node_client import NodeError
from .schema import ErrorDetail, ErrorResponse

SWARM_ERRORS = (NodeError, NoRouteError)  # no route, or the nodes failed on retry


class ApiError(Exception):
    """A failure the client receives as an OpenAI error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.detail = status, ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.detail)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="unsupported_value")


def failure(e: Exception) -> ApiError:
    """What the client is told of an exception raised while serving: the swarm's 503, or a 500."""
    if isinstance(e, SWARM_ERRORS):
        message = f"the swarm could not serve the request: {e}"
        return ApiError(503, message, type="service_unavailable", code="swarm_unavailable")
    return ApiError(500, f"internal error: {e}", type="server_error")


def validation_error(e: RequestValidationError) -> ApiError:
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
