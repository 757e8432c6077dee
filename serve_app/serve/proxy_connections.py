"""Connection-level fences in Serve's HTTP proxy, below ASGI: a deadline for request headers, and
uvicorn's own "Invalid HTTP request" 400 in OpenAI's error shape.

Serve's proxy runs uvicorn, and neither Serve 2.60 nor uvicorn has a header-read timeout: a client
that opens a connection and never finishes its headers holds it (and its memory) for as long as it
likes. Nor can ASGI middleware see a request uvicorn could not parse; uvicorn answers that itself,
in plain text. ``install()`` adds both to uvicorn's HTTP/1.1 protocols (httptools' and h11's) in the
process that calls it: ``proxy_fences.middlewares()``, which Serve calls in each proxy.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..api.http_errors import error_body

#: Seconds a connection may take to send a request's headers: after it opens, and after each answer
#: on a kept-alive connection. Longer than any honest client needs (headers fit in one packet).
HEADER_READ_TIMEOUT_S = 20.0

_INSTALLED_ON = "_kalm_fenced"


def invalid_http_answer(detail: str) -> bytes:
    """The whole HTTP answer to bytes that are not an HTTP/1.1 request: a 400 in OpenAI's shape."""
    body = error_body(
        f"{detail.rstrip('.')}: the request is not valid HTTP/1.1",
        "invalid_request_error",
        None,
        "invalid_http_request",
    )
    head = (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
    )
    return head + body


def _arm_header_deadline(protocol: Any) -> None:
    """Close the connection unless a request's headers are complete within the deadline.

    Both protocols start a new ``cycle`` object when a request's headers are complete: the same
    cycle at the deadline means no new request has been read.
    """
    cycle_now = protocol.cycle

    def check() -> None:
        transport = protocol.transport
        if protocol.cycle is cycle_now and transport is not None and not transport.is_closing():
            transport.close()

    asyncio.get_running_loop().call_later(HEADER_READ_TIMEOUT_S, check)


def _fence(protocol_class: Any) -> None:
    if getattr(protocol_class, _INSTALLED_ON, False):
        return
    connection_made = protocol_class.connection_made
    on_response_complete = protocol_class.on_response_complete

    def connection_made_with_deadline(self: Any, transport: Any) -> None:
        connection_made(self, transport)
        _arm_header_deadline(self)

    def on_response_complete_with_deadline(self: Any) -> None:
        on_response_complete(self)
        if not self.transport.is_closing():
            _arm_header_deadline(self)

    def send_400_response(self: Any, msg: str) -> None:
        self.transport.write(invalid_http_answer(msg))
        self.transport.close()

    protocol_class.connection_made = connection_made_with_deadline
    protocol_class.on_response_complete = on_response_complete_with_deadline
    protocol_class.send_400_response = send_400_response
    setattr(protocol_class, _INSTALLED_ON, True)


def install() -> None:
    """Fence uvicorn's HTTP/1.1 protocols in this process (idempotent)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    _fence(H11Protocol)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools not installed: uvicorn uses h11 alone
        return
    _fence(HttpToolsProtocol)
