"""The served path on one GPU, measured end to end: `serve run cluster/config.yaml` beside the engine alone.

    python -m scripts.gpu_serve_check --out gpu_serve_check.json     # a GPU machine with Ray, <= 8 minutes
    python -m scripts.gpu_serve_check --smoke --out smoke.json       # CPU, tiny stand-in, small counts (CI)

Run from the repository root (docs/gpu.md: how Ray gets to the GPU machine). It writes the
stand-in (full size; ``--smoke``: tiny; RANDOM weights), then, each section on its own (one that
fails is recorded and the rest still run; the JSON is rewritten after each):

* ``environment``: GPU, torch, CUDA, Ray, CPUs, the commit;
* ``in_process``: ``Encoder.embed_token_ids`` tokens/s on mixed 8-2048-token texts and on
  512-token texts (the texts the service is sent below);
* ``served[...]``: for each setting (``encoder_num_gpus`` 1, 0.5, 0.25; Serve's throughput-optimised
  path off and on), the service started as the README does (``serve run cluster/config.yaml``,
  ``device: auto``, placement deciding GPUs and ingress CPUs) and driven by the project's benchmark
  (``loadtest.host_path``, several client processes; their CPU use is reported to show they are
  not the limit): tokens/s on the same mixed and 512-token texts (and ÷ in-process), GPU busy
  fraction and CPU of proxy, ingress and encoder replicas during the bulk phase; 20-token queries:
  requests/s at saturation, p50/p99 of a lone client, p95 while bulk clients saturate the GPU;
  a sample of vectors against ``Encoder.encode`` (cosine);
* ``corpus``: ``python -m serve_app.corpus`` over mixed texts (>= 100k; ``--smoke``: a few hundred)
  with whole and half GPUs per encoder actor, tokens/s beside the engine alone.

Numbers, not pass/fail: the goals are in docs/gpu.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run does: the GPU run's, or the smoke run's."""

    standin: str
    phase_s: float  # seconds of each served phase
    bulk_texts: int  # distinct texts per in-process figure
    settings: tuple[tuple[float, bool], ...]  # (encoder_num_gpus, throughput-optimised)
    query_concurrency: int
    bulk_concurrency: int
    client_processes: int
    corpus_texts: int
    corpus_gpus_per_actor: tuple[float, ...]
    mixed_tokens: tuple[int, int]
    vector_sample: int


GPU = Sizes("full", 8.0, 512, ((1.0, False), (1.0, True), (0.5, False), (0.25, False)), 256, 32, 8, 100_000,
            (1.0, 0.5), (8, 2048), 64)  # fmt: skip
SMOKE = Sizes("tiny", 1.5, 16, ((1.0, False),), 8, 2, 2, 300, (1.0,), (8, 256), 8)


class Report:
    """The JSON file, rewritten after every section."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(), "sections": {}}

    def section(self, name: str, run: Callable[[], dict]) -> dict | None:
        started = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            result = {"ok": True, **run()}
        except Exception as exc:
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.data["sections"][name] = result
        self.data["failed_sections"] = [n for n, s in self.data["sections"].items() if not s["ok"]]
        self.path.write_text(json.dumps(self.data, indent=1))
        print(json.dumps(result)[:2000], flush=True)
        return result if result["ok"] else None


# --- pieces ------------------------------------------------------------------------------------


def environment() -> dict:
    import ray
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ray": ray.__version__,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit or None,
    }


def texts_of(tokenizer, n: int, tokens: tuple[int, int], seed: int) -> list[str]:
    from loadtest.host_path import _text_of

    rng = random.Random(seed)
    return [_text_of(tokenizer, rng, tokens) for _ in range(n)]


def in_process_rate(encoder, texts: list[str]) -> dict:
    """Tokens/s of the engine alone on ``texts`` (tokenised first, not timed), best of two passes."""
    ids = [t.ids for t in encoder.tokenizer.encode_texts(texts, "", True)]
    encoder.embed_token_ids(ids[:8])
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        encoder.embed_token_ids(ids)
        best = min(best, time.perf_counter() - started)
    tokens = sum(map(len, ids))
    return {"texts": len(ids), "tokens": tokens, "tokens_per_s": round(tokens / best, 1)}


class GpuBusy:
    """GPU busy fraction sampled every 0.25 s while running (nvidia-smi, else torch.cuda.utilization)."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float | None:
        if shutil.which("nvidia-smi"):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            return float(out) / 100 if out else None
        try:
            import torch

            return torch.cuda.utilization(0) / 100 if torch.cuda.is_available() else None
        except Exception:
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            value = self._sample()
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self) -> GpuBusy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def fraction(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 3) if self.samples else None


def served(sizes: Sizes, model_dir: Path, tokenizer, encoder, rates: dict, num_gpus: float, optimised: bool) -> dict:
    """One service setting, started as the README does, driven and checked; stopped again."""
    import httpx

    from loadtest.host_path import Phase, run_phase
    from tests.service_harness import ServeProcess

    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if optimised else "0"}
    out: dict = {"encoder_num_gpus": num_gpus, "throughput_optimized": optimised}
    started = time.perf_counter()
    with ServeProcess(model_dir, env=env, config_overrides={"encoder_num_gpus": num_gpus}) as svc:
        out["start_s"] = round(time.perf_counter() - started, 1)
        assert svc.proc is not None
        url, pid = svc.base_url, svc.proc.pid
        model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]

        def bodies(texts: list[str], per_request: int) -> list[tuple[bytes, int]]:
            import orjson

            out = []
            for i in range(0, len(texts), per_request):
                chunk = texts[i : i + per_request]
                tokens = sum(len(t.ids) for t in tokenizer.encode_texts(chunk, "", True))
                out.append((orjson.dumps({"model": model_id, "input": chunk, "encoding_format": "base64"}), tokens))
            return out

        def phase(name, texts, tokens, per_request, concurrency, seconds=sizes.phase_s, busy=False) -> dict:
            spec = Phase(name, per_request, tokens, concurrency)
            if not busy:
                return run_phase(url, spec, bodies(texts, per_request), sizes.client_processes, seconds, pid)
            with GpuBusy() as gpu:
                result = run_phase(url, spec, bodies(texts, per_request), sizes.client_processes, seconds, pid)
            result["gpu_busy_fraction"] = gpu.fraction()
            return result

        lengths = {"mixed": sizes.mixed_tokens, "512_tokens": (512, 512)}
        for name in ("mixed", "512_tokens"):
            result = phase(name, rates[name]["texts_list"], lengths[name], 16, sizes.bulk_concurrency, busy=True)
            result["over_in_process"] = round(result["tokens_per_s"] / rates[name]["tokens_per_s"], 3)
            out[name] = result
        queries = texts_of(tokenizer, 256, (20, 20), seed=3)
        out["queries_saturation"] = phase("queries", queries, (20, 20), 1, sizes.query_concurrency)
        out["lone_query"] = phase("lone", queries, (20, 20), 1, 1)
        # queries while bulk clients saturate the encoders: both at once
        bulk_result: dict = {}
        bulk = threading.Thread(
            target=lambda: bulk_result.update(
                phase(
                    "bulk",
                    rates["mixed"]["texts_list"],
                    sizes.mixed_tokens,
                    16,
                    sizes.bulk_concurrency,
                    sizes.phase_s + 2,
                )
            )
        )
        bulk.start()
        time.sleep(1.0)
        out["query_under_bulk"] = phase("queries", queries, (20, 20), 1, 4)
        bulk.join()
        out["query_under_bulk"]["bulk_tokens_per_s"] = bulk_result.get("tokens_per_s")
        out["vectors"] = vector_check(url, model_id, encoder, rates["mixed"]["texts_list"][: sizes.vector_sample])
    return out


def vector_check(url: str, model_id: str, encoder, texts: list[str]) -> dict:
    """The service's vectors for ``texts`` against ``Encoder.encode`` in this process (cosine)."""
    import httpx

    resp = httpx.post(url + "/v1/embeddings", json={"model": model_id, "input": texts}, timeout=120)
    got = np.array([d["embedding"] for d in resp.json()["data"]], np.float32)
    want = encoder.encode(texts)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    return {"texts": len(texts), "cosine_min": round(float(cos.min()), 6), "pass": bool(cos.min() >= 0.999)}


def corpus(sizes: Sizes, model_dir: Path, tokenizer, encoder, workdir: Path) -> dict:
    """The corpus job over mixed texts, per GPUs-per-actor setting, beside the engine alone on a sample."""
    rng = random.Random(7)
    pool = texts_of(tokenizer, 512, (8, 512), seed=5)
    source = workdir / "corpus.jsonl"
    with source.open("w") as f:
        for i in range(sizes.corpus_texts):
            f.write(json.dumps({"id": i, "text": pool[rng.randrange(len(pool))]}) + "\n")
    out: dict = {"texts": sizes.corpus_texts, "in_process_sample": in_process_rate(encoder, pool)}
    for gpus in sizes.corpus_gpus_per_actor:
        dest = workdir / f"corpus-out-{gpus}"
        cmd = [sys.executable, "-m", "serve_app.corpus", "--input", str(source), "--output", str(dest)]
        cmd += ["--model", str(model_dir), "--gpus-per-actor", str(gpus)]
        # its own local Ray: token auth, as Ray 2.60 wants for local clusters, and a private temp dir
        # (a Ray already on the machine under /tmp/ray is not joined), short whatever TMPDIR is: Ray's
        # socket paths under it must fit AF_UNIX's 107 bytes
        ray_tmp = tempfile.mkdtemp(prefix="gsc", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_TMPDIR=ray_tmp)
        try:
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        summary_path = dest / "_summary.json"
        if run.returncode != 0 or not summary_path.exists():
            raise RuntimeError(f"corpus job with {gpus:g} GPUs per actor failed:\n{run.stderr[-3000:]}")
        summary = json.loads(summary_path.read_text())
        out[f"gpus_per_actor_{gpus:g}"] = {
            k: summary.get(k) for k in ("rows", "embedded", "tokens", "wall_s", "tokens_per_s", "tokens_per_s_wall")
        } | {"over_in_process": round(summary["tokens_per_s"] / out["in_process_sample"]["tokens_per_s"], 3)}
    return out


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_serve_check.json"))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny stand-in, small counts (what CI runs)")
    p.add_argument("--model-dir", type=Path, help="an existing stand-in or model (default: write the stand-in)")
    p.add_argument("--budget-s", type=float, default=450, help="skip settings and sections that no longer fit")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else GPU
    deadline = time.monotonic() + args.budget_s
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = Report(args.out)
    report.data["mode"] = "smoke" if args.smoke else "gpu"
    report.section("environment", environment)

    from serve_app import Encoder
    from serve_app.testing.standin import write_standin

    with tempfile.TemporaryDirectory(prefix="gsc") as tmp:
        workdir = Path(tmp)
        model_dir = args.model_dir or workdir / f"kalm-{sizes.standin}"
        if not args.model_dir:
            report.section("model", lambda: (write_standin(model_dir, size=sizes.standin), {"dir": str(model_dir)})[1])
        encoder = Encoder.from_pretrained(str(model_dir), device="auto", dtype="auto")
        tokenizer = encoder.tokenizer
        rates: dict = {}

        def in_process() -> dict:
            rates["mixed"] = {"texts_list": texts_of(tokenizer, sizes.bulk_texts, sizes.mixed_tokens, seed=1)}
            rates["512_tokens"] = {"texts_list": texts_of(tokenizer, sizes.bulk_texts, (512, 512), seed=2)}
            for name in rates:
                rates[name].update(in_process_rate(encoder, rates[name]["texts_list"]))
            shown = {name: {k: v for k, v in r.items() if k != "texts_list"} for name, r in rates.items()}
            return {"device": str(encoder.device), "dtype": str(encoder.dtype), **shown}

        if report.section("in_process", in_process):
            for num_gpus, optimised in sizes.settings:
                if time.monotonic() > deadline - 60:
                    report.data["skipped"] = report.data.get("skipped", []) + [f"served {num_gpus} {optimised}"]
                    continue
                name = f"served[encoder_num_gpus={num_gpus:g},throughput_optimized={'on' if optimised else 'off'}]"
                report.section(
                    name, functools.partial(served, sizes, model_dir, tokenizer, encoder, rates, num_gpus, optimised)
                )
        if time.monotonic() < deadline - 30:
            report.section("corpus", lambda: corpus(sizes, model_dir, tokenizer, encoder, workdir))
        else:
            report.data.setdefault("skipped", []).append("corpus")
    report.data["finished"] = datetime.now(timezone.utc).isoformat()
    report.path.write_text(json.dumps(report.data, indent=1))
    return 1 if report.data.get("failed_sections") else 0


if __name__ == "__main__":
    sys.exit(main())
