"""A private ``redis-server`` for Ray's GCS fault tolerance on one machine (tests, ``cluster/local_cluster.py``).

Ray's GCS keeps the cluster's tables (nodes, actors, jobs, placement groups, the KV store Serve's
controller checkpoints into) in memory; with ``RAY_REDIS_ADDRESS`` (or ``external_addresses``) it
writes them to Redis too, so a GCS that dies and starts again finds the cluster it left. Here the
server listens on a free loopback port with a random password, keeps its files in its own folder
and nothing on disk across restarts of Redis itself (no RDB/AOF: it only has to outlive the GCS).
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .ray_cluster import free_port


@dataclass
class RedisServer:
    """A running redis-server: its ``address`` (host:port) and ``password`` are what Ray's head takes."""

    address: str
    password: str
    proc: subprocess.Popen
    dir: str

    def ping(self) -> bool:
        host, port = self.address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while b"PONG" not in reply and len(reply) < 256:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    reply += chunk
                return b"+OK" in reply and b"+PONG" in reply
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(port: int | None = None, timeout_s: float = 20) -> RedisServer:
    """Start ``redis-server`` (Debian's package; on PATH) and wait until it answers."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)")
    workdir = tempfile.mkdtemp(prefix="kalm-redis")
    password = secrets.token_hex(16)
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--requirepass", password, "--dir", workdir]
        + ["--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", f"{workdir}/redis.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in a terminal reaches its owner, which stops it after Ray
    )
    server = RedisServer(address=f"127.0.0.1:{port}", password=password, proc=proc, dir=workdir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        if server.ping():
            return server
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"redis-server not answering on {server.address} after {timeout_s}s")
