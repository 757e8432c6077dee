"""Connection-level fences in Serve's proxy, on a real uvicorn server (as Serve runs it): a deadline
for request headers, and uvicorn's own 400 for bytes that are not HTTP in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.responses import JSONResponse

from serve_app.serve import proxy_connections
from tests.service_harness import free_port

pytestmark = pytest.mark.http


async def app(scope, receive, send):
    if scope["type"] == "http":
        await JSONResponse({"ok": True})(scope, receive, send)


@pytest.fixture
def server(monkeypatch):
    """A uvicorn server fenced as in Serve's proxy (HTTP protocol ``auto``: httptools when installed),
    with a header deadline short enough to wait for."""
    monkeypatch.setattr(proxy_connections, "HEADER_READ_TIMEOUT_S", 0.5)
    proxy_connections.install()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve()), daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


def read_all(sock: socket.socket, timeout_s: float = 5) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_connection_that_never_finishes_its_headers_is_closed(server):
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never more
        started = time.monotonic()
        assert read_all(sock) == b""  # closed by the server, without an answer
        assert time.monotonic() - started < 4


def test_a_connection_that_sends_nothing_is_closed(server):
    with socket.create_connection(("127.0.0.1", server)) as sock:
        assert read_all(sock) == b""


def test_a_kept_alive_connection_has_the_deadline_for_each_request(server):
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = b""
        while not first.endswith(b'{"ok":true}'):  # the whole first answer (it may come in pieces)
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the next request's headers, unfinished
        assert read_all(sock) == b""


def test_a_prompt_client_is_answered(server):
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200")


def test_bytes_that_are_not_http_get_a_400_in_openai_shape(server):
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"\x16\x03\x01 this is no HTTP request\r\n\r\n")
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_http_request"
    assert int(head.split(b"content-length: ")[1].split(b"\r\n")[0]) == len(body)
