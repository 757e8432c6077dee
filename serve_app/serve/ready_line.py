"""The one line ``scripts/serve.sh`` prints once the service answers: its URL and served model id.

``serve run`` prints the dashboard's URL and Ray's logs, never that the service is ready or where.
``python -m serve_app.serve.ready_line CONFIG --while-pid PID [--remove PATH]`` polls ``/health``
on the config's host and port until it is 200, reads the served id from ``/v1/models``, prints one
line and exits. It exits quietly when PID (the ``serve run`` it watches) ends first, and removes
PATH (``--port``'s temporary config) either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request

import yaml

from .. import environment

POLL_S = 1.0


def service_url(config_path: str) -> str:
    http = yaml.safe_load(open(config_path)).get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{http.get('port', 8000)}"


def _get(url: str, key: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, urllib.error.URLError):
        return 0, b""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ready_line(url: str, model_id: str) -> str:
    return f"kalm-serve ready: {url}/v1 serves model {model_id!r} (POST {url}/v1/embeddings)"


def wait_until_ready(url: str, pid: int) -> str | None:
    """The ready line once ``/health`` is 200; None when ``pid`` ends first."""
    keys = environment.api_keys()
    key = keys[0] if keys else None
    while _alive(pid):
        if _get(f"{url}/health", None)[0] == 200:
            status, body = _get(f"{url}/v1/models", key)
            if status == 200:
                return ready_line(url, json.loads(body)["data"][0]["id"])
        time.sleep(POLL_S)
    return None


def port_taken(url: str) -> bool:
    """Something already accepts connections where the service would listen."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--while-pid", type=int, help="the serve run to watch until its service answers")
    parser.add_argument("--remove", help="a folder to delete when done (--port's temporary config)")
    parser.add_argument(
        "--check-port", action="store_true", help="only say whether the config's port is free (exit 1 if taken)"
    )
    args = parser.parse_args(argv)
    url = service_url(args.config)
    if args.check_port:
        # Before serve run starts: another server there would answer the watcher's polls (and take
        # the port serve run's proxy needs).
        if port_taken(url):
            raise SystemExit(f"kalm-serve: {url} is already in use: stop what serves there, or pass --port N")
        return
    if args.while_pid is None:
        parser.error("--while-pid is required (or --check-port)")
    try:
        line = wait_until_ready(url, args.while_pid)
    finally:
        if args.remove:
            shutil.rmtree(args.remove, ignore_errors=True)
    if line:
        print(line, flush=True)


if __name__ == "__main__":
    main()
