"""Errors a handler raises for a bad request; the servicer turns `status` into a gRPC status code.

Handlers stay free of gRPC: they raise these, and only node/servicer.py knows about StatusCode.
"""


class RequestError(Exception):
    status = "INVALID_ARGUMENT"


class NotFound(RequestError):
    status = "NOT_FOUND"


class OutOfRange(RequestError):
    status = "OUT_OF_RANGE"


class ResourceExhausted(RequestError):
    status = "RESOURCE_EXHAUSTED"


class FailedPrecondition(RequestError):
    status = "FAILED_PRECONDITION"


class IdleTimeout(RequestError):
    status = "DEADLINE_EXCEEDED"


class Evicted(RequestError):
    """The session was closed to give another client key its fair share (node/fair_share.py)."""

    status = "ABORTED"
