"""The README's quick start and the code of README.md and docs/api.md, run as written.

The commands and code blocks are read from the files themselves, so they cannot drift from
what works. Only what must differ on a test machine is changed: the port (8000 -> a free one),
the stand-in's folder (/tmp/kalm-standin -> a temporary ``kalm-standin``, so the served id is
the same), the corpus example's output folder, ``.venv/bin/`` (-> the environment running the tests: the same one in CI) and
``~/.cache/tiktoken`` (-> a temporary folder). ``scripts/test.sh`` is the suite itself, not run here.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.service_harness import ROOT, free_port, kill_processes_mentioning

DOCS = {"README.md": ROOT / "README.md", "docs/api.md": ROOT / "docs" / "api.md"}


def fenced_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def quick_start_commands() -> list[str]:
    """The README's stand-in commands: make the stand-in, serve it."""
    block = next(b for b in fenced_blocks(DOCS["README.md"], "bash") if "serve_app.testing.standin" in b)
    return [line for line in block.splitlines() if line.strip()]


class Machine:
    """Where the README's commands run: a free port and temporary folders in place of the fixed ones."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.standin = tmp / "kalm-standin"
        self.vectors = tmp / "kalm-vectors"
        self.tiktoken_cache = tmp / "tiktoken-cache"
        # serve run's Ray marks its processes with its temp dir, and they are stopped by it (short: Ray's
        # socket paths have a length limit)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rm", dir="/tmp"))
        self.env = {
            **os.environ,
            "RAY_TMPDIR": str(self.ray_tmp),
            "TIKTOKEN_CACHE_DIR": str(self.tiktoken_cache),
            # An explicit token, so Ray does not write one to ~/.ray/auth_token as it does for a user.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
        }
        self.env.pop("RAY_ADDRESS", None)

    def here(self, text: str) -> str:
        return (
            text.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
            .replace("--port 8000", f"--port {self.port}")
            .replace("/tmp/kalm-standin", str(self.standin))
            .replace("/tmp/kalm-vectors", str(self.vectors))
            .replace("~/.cache/tiktoken", str(self.tiktoken_cache))
            .replace(".venv/bin/", f"{sys.prefix}/bin/")
        )

    def run(self, command: list[str], timeout_s: float = 300) -> str:
        out = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        print(f"$ {command[-1]}\n{out.stdout}{out.stderr[-3000:] if out.returncode else ''}")
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """The README's quick start, as written: the stand-in is made, then served on the port."""
    machine = Machine(tmp_path_factory.mktemp("readme"))
    make, serve = quick_start_commands()
    assert "scripts/serve.sh --port 8000" in serve
    machine.run(["bash", "-c", machine.here(make)])
    # docs/api.md: tiktoken's cache seeded for LangChain without internet access
    seed = next(b for b in fenced_blocks(DOCS["docs/api.md"], "bash") if "TIKTOKEN_CACHE_DIR" in b)
    machine.run(["bash", "-c", machine.here(seed)])
    log = open(machine.ray_tmp / "serve.log", "wb")
    proc = subprocess.Popen(
        ["bash", "-c", machine.here(serve)],
        cwd=ROOT,
        env=machine.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(machine, proc)
        yield machine
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_processes_mentioning(str(machine.ray_tmp))
        log.close()
        shutil.rmtree(machine.ray_tmp, ignore_errors=True)


def wait_healthy(machine: Machine, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (machine.ray_tmp / "serve.log").read_text()[-5000:]
        try:
            if httpx.get(f"http://127.0.0.1:{machine.port}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError((machine.ray_tmp / "serve.log").read_text()[-5000:])


def test_serve_sh_without_a_model_fails_fast_saying_what_to_do(tmp_path):
    """The README's first command on a machine without the hub (tests run offline): no Ray is started."""
    env = {k: v for k, v in os.environ.items() if k != "KALM_MODEL"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run(["scripts/serve.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    print(out.stdout + out.stderr)
    said = out.stdout + out.stderr
    assert out.returncode != 0 and "KALM_MODEL" in said
    assert "python -m serve_app.testing.standin /tmp/kalm-standin --size tiny" in said  # the README's stand-in


def test_the_corpus_example_runs_as_written_from_a_fresh_clone(tmp_path):
    """The README's offline example, on the sample corpus the repository ships, into a fresh folder."""
    import json

    machine = Machine(tmp_path)
    make, _ = quick_start_commands()
    corpus = next(b for b in fenced_blocks(DOCS["README.md"], "bash") if "serve_app.corpus" in b).strip()
    try:
        machine.run(["bash", "-c", machine.here(make)])
        out = subprocess.run(
            ["bash", "-c", machine.here(corpus)], cwd=ROOT, env=machine.env, capture_output=True, text=True, timeout=600
        )
        print(out.stdout + out.stderr[-3000:])
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((machine.vectors / "_summary.json").read_text())
        rows = len((ROOT / "examples/corpus.jsonl").read_text().splitlines())
        assert summary["complete"] and f"{rows} rows: {rows} embedded, 0 bad" in out.stdout
        stages = [line.split(" ", 2)[2] for line in out.stderr.splitlines() if line.startswith("[corpus]")]
        stages = [line for line in stages if " rows (" not in line]  # rows lines repeat by design
        assert len(stages) == len(set(stages)), stages  # each status line once
    finally:
        kill_processes_mentioning(str(machine.ray_tmp))
        shutil.rmtree(machine.ray_tmp, ignore_errors=True)


def said_to_print(code: str) -> str | None:
    """What an example's last line says it prints: ``print(...)  # 2 64`` (or ``# e.g. ...``)."""
    last = code.strip().splitlines()[-1]
    if last.startswith("print(") and "  # " in last:
        return last.split("  # ", 1)[1].removeprefix("e.g. ")
    return None


@pytest.mark.parametrize(
    "doc, index",
    [(doc, i) for doc, path in DOCS.items() for i in range(len(fenced_blocks(path, "python")))],
)
def test_python_examples_run_against_the_quick_start_service(machine, doc, index):
    code = fenced_blocks(DOCS[doc], "python")[index]
    printed = machine.run([sys.executable, "-c", machine.here(code)])
    said = said_to_print(code)
    assert said is None or printed.split() == said.split(), (printed, said)


def test_serve_sh_says_once_where_it_serves_what_and_leaves_no_temp_config(machine):
    log_path = machine.ray_tmp / "serve.log"
    line = f"kalm-serve ready: http://127.0.0.1:{machine.port}/v1 serves model 'kalm-standin'"
    deadline = time.monotonic() + 30  # the watcher polls once a second
    while line not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = log_path.read_text()
    assert log.count("kalm-serve ready") == 1 and line in log, log[-3000:]
    config = re.search(r"Running config file: '([^']+)'", log).group(1)
    assert config != "cluster/config.yaml" and not Path(config).exists()  # --port's copy, removed


def test_on_one_machine_nothing_listens_beyond_loopback_without_the_token(machine):
    """Every listening socket of the service's processes is on loopback, but Serve's inter-deployment
    gRPC server (Ray binds it to all interfaces): that one refuses a client without Ray's token."""
    import grpc
    import psutil

    ours = set()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") == str(machine.ray_tmp):
                ours.add(proc.pid)
        except psutil.Error:
            continue
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert any(c.laddr.port == machine.port for c in listening)
    open_to_all = [c for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    for conn in open_to_all:
        assert "ServeReplica" in " ".join(psutil.Process(conn.pid).cmdline()), conn
        channel = grpc.insecure_channel(f"127.0.0.1:{conn.laddr.port}")
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest", lambda b: b, lambda b: b)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
