"""The one place where errors become HTTP answers in OpenAI's error shape."""

from __future__ import annotations

import math

import orjson
from pydantic import ValidationError
from starlette.responses import Response

from .. import errors

# error class -> (HTTP status, OpenAI error type, code). First match wins (subclasses first).
ERROR_TABLE: list[tuple[type[errors.KalmServeError], int, str, str | None]] = [
    (errors.InputTooLongError, 400, "invalid_request_error", "context_length_exceeded"),
    (errors.TokenIdOutOfRangeError, 400, "invalid_request_error", "invalid_token_id"),
    (errors.InvalidRequestError, 400, "invalid_request_error", None),
    (errors.AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (errors.ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (errors.RouteNotFoundError, 404, "invalid_request_error", "unknown_url"),
    (errors.MethodNotAllowedError, 405, "invalid_request_error", "method_not_allowed"),
    (errors.BodyReadTimeoutError, 408, "invalid_request_error", "request_timeout"),
    (errors.PayloadTooLargeError, 413, "invalid_request_error", "payload_too_large"),
    (errors.UnsupportedContentEncodingError, 415, "invalid_request_error", "unsupported_content_encoding"),
    (errors.HeadersTooLargeError, 431, "invalid_request_error", "headers_too_large"),
    # nginx's "client closed request": nobody reads it, but metrics and logs count it as the client's doing
    (errors.ClientDisconnectedError, 499, "invalid_request_error", "client_closed"),
    (errors.OverloadedError, 503, "rate_limit_error", "overloaded"),
    (errors.RequestTimeoutError, 504, "server_error", "timeout"),
]

#: Retry-After is clamped to this range (seconds): at least 1 (the header is whole seconds; 0 would
#: invite an instant retry storm), at most 60 (past a minute an estimate from the current queue says
#: little, and clients with a long Retry-After simply give up).
RETRY_AFTER_RANGE_S = (1, 60)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def error_response(exc: Exception, request_id: str) -> Response:
    """The answer for ``exc``; anything unexpected is a 500 that names the request id, never a trace."""
    headers: dict[str, str] = {}
    if isinstance(exc, ValidationError):
        return Response(_validation_body(exc), 400, headers, media_type="application/json")
    for cls, status, type_, code in ERROR_TABLE:
        if isinstance(exc, cls):
            if isinstance(exc, errors.OverloadedError):
                headers["retry-after"] = str(retry_after_header(exc.retry_after_s))
            body = error_body(exc.message, type_, getattr(exc, "param", None), code)
            return Response(body, status, headers, media_type="application/json")
    body = error_body(f"internal error (request id {request_id}); it has been logged", "server_error")
    return Response(body, 500, headers, media_type="application/json")


def retry_after_header(seconds: float) -> int:
    low, high = RETRY_AFTER_RANGE_S
    return min(high, max(low, math.ceil(seconds))) if math.isfinite(seconds) else high


def status_of(exc: Exception) -> int:
    if isinstance(exc, ValidationError):
        return 400
    return next((status for cls, status, _, _ in ERROR_TABLE if isinstance(exc, cls)), 500)


def _validation_body(exc: ValidationError) -> bytes:
    first = exc.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if not isinstance(x, int) and not str(x).startswith(("list[", "str"))]
    param = loc[0] if loc else None
    where = f" ({param})" if param else ""
    if first.get("type") == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"missing required parameter: {param}"
    else:
        message = f"invalid value{where}: {first.get('msg')}"
    return error_body(message, "invalid_request_error", param, None)
