"""scripts/serve.sh's watcher: it refuses a port another server already holds (whose answers it
would otherwise take for the new service's)."""

from __future__ import annotations

import socket

import pytest

from serve_app.serve import ready_line
from serve_app.testing.ray_cluster import free_port

pytestmark = pytest.mark.unit


def config_on(tmp_path, port: int) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(f"http_options:\n  host: 0.0.0.0\n  port: {port}\n")
    return str(path)


def test_a_free_port_passes_the_check(tmp_path):
    ready_line.main([config_on(tmp_path, free_port()), "--check-port"])


def test_a_port_another_server_holds_is_refused_with_what_to_do(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with pytest.raises(SystemExit, match="already in use.*--port N"):
            ready_line.main([config_on(tmp_path, server.getsockname()[1]), "--check-port"])
