"""The prepared GPU check: the encoder on one GPU, measured and checked, written to one JSON file.

    python -m scripts.gpu_check --out gpu_check.json          # a GPU machine, < 8 minutes
    python -m scripts.gpu_check --smoke --out smoke.json      # CPU, tiny stand-in, < 1 minute

Run from the repository root. Needs torch (with CUDA), the project's Python dependencies and this repository: no network,
no Ray. It writes the full-size stand-in (KaLM v2's architecture and tokenizer, RANDOM weights)
and reports, each section on its own (one that fails is recorded and the rest still run):

* ``environment``: device name, torch/CUDA versions, the commit, dtype, attention kernel;
* ``attention``: each packed attention kernel of the device against per-text SDPA;
* ``parity``: bf16 cosine to the float64 reference (``serve_app.testing.reference``), and a
  text's vector alone against the same text in a mixed batch;
* ``throughput``: ``Encoder.embed_token_ids`` tokens/s on 128-, 512- and 2048-token texts and
  on mixed lengths, packed and (for comparison) padded;
* ``long_input``: one 32k-token input: seconds and peak memory;
* ``scheduler``: ``TokenBudgetBatcher`` query latency (p50/p95) alone and under bulk load
  (the benchmark's priority scenario, ``loadtest.priority_scenario``).

The JSON is rewritten after every section, so a run stopped early still leaves what it measured.
A global time budget (``--budget-s``) skips sections that no longer fit. If the packed
attention check or the first forward pass with it fails on the GPU, the remaining sections
run with padded batches instead (``layout`` in the JSON says which ran).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loadtest.priority_scenario import queries_under_bulk_load
from loadtest.stats import percentile
from serve_app import Encoder
from serve_app.batching.scheduler import TokenBudgetBatcher
from serve_app.config import ServiceConfig
from serve_app.core.checkpoint import read_model_files
from serve_app.core.device import dtype_name
from serve_app.core.packed_attention import NESTED, VARLEN, PackedSpans, packed_attention, packed_kernel
from serve_app.testing.reference import ReferenceQwen2
from serve_app.testing.standin import write_standin

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151643  # ordinary Qwen2 token ids: below the special tokens
PARITY_TEXTS = [
    "What is the capital of France?",
    "Berlin ist die Hauptstadt von Deutschland und hat etwa 3,7 Millionen Einwohner.",
    "东京是日本的首都，也是世界上人口最多的都市圈之一。",
    "def f(x):\n    return x ** 2  # 12345",
]
BF16_COSINE_FLOOR = 0.995  # the project's bf16 parity bar (docs/gpu.md)


@dataclass(frozen=True)
class Mode:
    """What a run measures, and how much of it."""

    size: str  # of the stand-in written
    device: str
    dtype: str
    budget_s: float
    attention_lengths: list[int]
    tokens_per_round: int
    min_round_s: float
    max_rounds: int
    lengths: tuple[int, ...]
    long_tokens: int
    scheduler_s: float
    queries_per_s: float
    bulk_clients: int


# What each mode runs: the GPU sizes fit the 8-minute limit with room to spare; smoke runs the same code small.
MODES = {
    "gpu": Mode(
        size="full",
        device="cuda",
        dtype="bfloat16",
        budget_s=420,
        attention_lengths=[1, 7, 130, 33, 512, 2, 1000, 4096],
        tokens_per_round=131072,
        min_round_s=6.0,
        max_rounds=20,
        lengths=(128, 512, 2048),
        long_tokens=32768,
        scheduler_s=20.0,
        queries_per_s=20,
        bulk_clients=4,
    ),
    "smoke": Mode(
        size="tiny",
        device="cpu",
        dtype="float32",
        budget_s=240,  # the work takes well under a minute; the margin is for a busy CI machine
        attention_lengths=[1, 7, 33, 2, 100],
        tokens_per_round=2048,
        min_round_s=0.0,
        max_rounds=1,
        lengths=(128, 512, 2048),
        long_tokens=2048,
        scheduler_s=2.0,
        queries_per_s=10,
        bulk_clients=2,
    ),
}


class Report:
    """The JSON being built; written out after every section."""

    def __init__(self, path: Path, budget_s: float):
        self.path = path
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.data: dict = {"sections": {}}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def section(self, name: str, fn: Callable[[], dict | None], needs_s: float = 0.0) -> dict | None:
        """Run one section: its result, or its error, goes into the JSON; None when it failed or was skipped."""
        if self.left_s() < needs_s:
            self.data["sections"][name] = {"ok": False, "skipped": f"time budget: {self.left_s():.0f} s left"}
            self.write()
            return None
        started = time.monotonic()
        print(f"==> {name}", file=sys.stderr, flush=True)
        try:
            result = fn()
            entry = {"ok": True, **(result or {})}
        except Exception as exc:
            result = None
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(entry["traceback"], file=sys.stderr, flush=True)
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.data["sections"][name] = entry
        self.write()
        return result

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 2)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_texts(lengths, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- sections ------------------------------------------------------------------------------


def nvidia_smi() -> str | None:
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, mode: str, commit_id: str | None) -> dict:
    info: dict[str, Any] = {
        "mode": mode,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit_id or commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "device_name": props.name,
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": list(torch.cuda.get_device_capability(device)),
            "cuda": torch.version.cuda,
            "flash_attention_available": torch.backends.cuda.is_flash_attention_available(),
            "nvidia_smi": nvidia_smi(),
        }
    return info


def attention_kernels(device: torch.device, dtype: torch.dtype, cfg: Mode) -> dict:
    """Every packed kernel this device can run, against SDPA text by text, on KaLM's head shapes."""
    lengths = cfg.attention_lengths
    spans, start = [], 0
    for n in lengths:
        spans.append((start, start + n))
        start += n
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(start, h, 64, generator=gen).to(device, dtype) for h in (14, 2, 2))  # KaLM's heads
    want = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), enable_gqa=True
            ).transpose(0, 1)
            for a, b in spans
        ]
    ).float()
    kernels = [NESTED] + ([VARLEN] if packed_kernel(device, dtype) == VARLEN else [])
    max_abs_diff: dict[str, float] = {}
    out: dict[str, Any] = {"selected": packed_kernel(device, dtype), "max_abs_diff": max_abs_diff}
    for kernel in kernels:
        got = packed_attention(q, k, v, PackedSpans(spans, device, kernel)).float()
        max_abs_diff[kernel] = float((got - want).abs().max())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    out["tolerance"] = tolerance
    bad = {k: d for k, d in max_abs_diff.items() if not d <= tolerance}
    if bad:
        raise AssertionError(f"packed attention differs from per-text SDPA: {bad} > {tolerance}")
    return out


def parity(encoder: Encoder, model_dir: Path) -> dict:
    reference = ReferenceQwen2(model_dir)
    token_ids = [t.ids for t in encoder.tokenizer.encode_texts(PARITY_TEXTS)]
    batched = encoder.embed_token_ids(token_ids + random_texts([300, 45, 900], seed=7))[: len(token_ids)]
    alone = np.stack([encoder.embed_token_ids([ids])[0] for ids in token_ids])
    to_reference = [cosine(v, reference.embed(ids).numpy()) for v, ids in zip(batched, token_ids)]
    batch_independence = [cosine(a, b) for a, b in zip(alone, batched)]
    return {
        "dtype": dtype_name(encoder.dtype),
        "cosine_to_float64_reference": {"min": min(to_reference), "all": to_reference},
        "cosine_alone_vs_in_batch": {"min": min(batch_independence), "all": batch_independence},
        "floor": BF16_COSINE_FLOOR,
        "pass": min(to_reference) >= BF16_COSINE_FLOOR and min(batch_independence) >= BF16_COSINE_FLOOR,
    }


def tokens_per_second(encoder: Encoder, texts: list[list[int]], cfg: Mode) -> dict:
    tokens = sum(len(t) for t in texts)
    encoder.embed_token_ids(texts[: max(1, len(texts) // 8)])  # warm-up: kernels, allocator
    rounds: list[float] = []
    started = time.perf_counter()
    while len(rounds) < cfg.max_rounds and (not rounds or time.perf_counter() - started < cfg.min_round_s):
        t0 = time.perf_counter()
        encoder.embed_token_ids(texts)  # returns host vectors: the device has finished
        rounds.append(tokens / (time.perf_counter() - t0))
    return {
        "texts": len(texts),
        "tokens_per_round": tokens,
        "rounds": len(rounds),
        "tokens_per_s_median": round(statistics.median(rounds)),
        "tokens_per_s_all": [round(r) for r in rounds],
    }


def throughput(encoder: Encoder, cfg: Mode) -> dict:
    out: dict[str, Any] = {"max_batch_tokens": encoder.max_batch_tokens}
    for length in cfg.lengths:
        texts = random_texts([length] * max(1, cfg.tokens_per_round // length), seed=length)
        out[f"{length}_tokens"] = tokens_per_second(encoder, texts, cfg)
    return out


def mixed_throughput(encoder: Encoder, cfg: Mode) -> dict:
    """Lengths log-uniform from 8 to 2048 tokens: queries, passages and documents together."""
    rng = np.random.default_rng(1)
    lengths, total = [], 0
    while total < cfg.tokens_per_round:
        lengths.append(int(np.exp(rng.uniform(np.log(8), np.log(2048)))))
        total += lengths[-1]
    out = tokens_per_second(encoder, random_texts(lengths, seed=2), cfg)
    out["length_p50"], out["length_max"] = int(np.median(lengths)), max(lengths)
    return out


def mixed_throughput_padded(encoder: Encoder, cfg: Mode) -> dict:
    """The same mixed lengths in padded batches (what the GPU ran before packing), for comparison."""
    packed = encoder.packed
    encoder.packed = False
    try:
        return mixed_throughput(encoder, cfg)
    finally:
        encoder.packed = packed


def long_input(encoder: Encoder, cfg: Mode) -> dict:
    ids = random_texts([cfg.long_tokens], seed=3)
    runs = []
    for _ in range(2):  # the first run pays for new shapes
        if encoder.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(encoder.device)
        t0 = time.perf_counter()
        encoder.embed_token_ids(ids)
        seconds = time.perf_counter() - t0
        run = {"seconds": round(seconds, 3), "tokens_per_s": round(cfg.long_tokens / seconds)}
        if encoder.device.type == "cuda":
            run["peak_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(encoder.device) / 2**30, 3)
        runs.append(run)
    return {"tokens": cfg.long_tokens, "runs": runs}


def scheduler_latency(encoder: Encoder, model_dir: Path, cfg: Mode) -> dict:
    """Queries (interactive, ~20 tokens) at a steady rate, alone and while bulk clients keep the replica full."""
    config = ServiceConfig(model=str(model_dir))
    queries = random_texts([20] * 10_000, seed=4)
    bulk_request = random_texts([512] * 16, seed=5)
    bulk_tokens = sum(len(t) for t in bulk_request)

    async def measure(bulk_clients: int) -> dict:
        batcher = TokenBudgetBatcher.for_encoder(encoder, config)

        async def query(i: int) -> int:
            await batcher.embed([queries[i % len(queries)]], "interactive")
            return len(queries[i % len(queries)])

        async def bulk(_: int) -> int:
            await batcher.embed(bulk_request, "bulk")
            return bulk_tokens

        run = await queries_under_bulk_load(
            query,
            bulk,
            bulk_clients,
            query_interval_s=1 / cfg.queries_per_s,
            duration_s=cfg.scheduler_s,
            warm_up_s=0.5 if bulk_clients else 0.0,  # the bulk backlog builds up first
        )
        batcher.close()
        latencies = run.query_latencies_s
        return {
            "queries": len(latencies),
            "query_p50_ms": round(1000 * percentile(latencies, 50), 2),
            "query_p95_ms": round(1000 * percentile(latencies, 95), 2),
            "query_max_ms": round(1000 * max(latencies), 2),
            "bulk_tokens_per_s": round(run.bulk_tokens_per_s),
            "preemptions": batcher.stats.preemptions,
            "batches": batcher.stats.batches,
            "interactive_batch_tokens": batcher.interactive_batch_tokens,
        }

    return {
        "queries_per_s": cfg.queries_per_s,
        "idle": asyncio.run(measure(0)),
        "under_bulk_load": asyncio.run(measure(cfg.bulk_clients)),
    }


# --- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where the JSON goes")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny stand-in, small sizes (CI)")
    parser.add_argument(
        "--budget-s", type=float, help="stop starting sections after this long (default 420; smoke 240)"
    )
    parser.add_argument("--model-dir", type=Path, help="use this model directory instead of writing a stand-in")
    parser.add_argument("--commit", help="the commit measured, where the tree has no .git (default: git rev-parse)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "gpu"
    cfg = MODES[mode]
    report = Report(args.out, args.budget_s or cfg.budget_s)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        report.data["fatal"] = "no CUDA device visible to torch; use --smoke for the CPU run"
        report.write()
        return 2
    report.section("environment", lambda: environment(device, mode, args.commit))

    with tempfile.TemporaryDirectory(prefix="kalm-gpu-check-") as tmp:
        model_dir = args.model_dir or Path(tmp) / f"standin-{cfg.size}"

        def build() -> dict:
            if args.model_dir is None:
                write_standin(model_dir, size=cfg.size, append_eos=True, seed=0)
            return {"model_dir": str(model_dir), "random_weights": read_model_files(model_dir).is_standin}

        report.section("model", build)
        loaded: dict = {}

        def load() -> dict:
            loaded["encoder"] = encoder = Encoder.from_pretrained(model_dir, device=device, dtype=cfg.dtype)
            return {"dtype": dtype_name(encoder.dtype), "max_batch_tokens": encoder.max_batch_tokens}

        report.section("load", load)
        encoder = loaded.get("encoder")
        if encoder is None:
            return 1
        # A wrong packed kernel would spoil every number after it: the rest then runs padded.
        dtype = encoder.dtype
        attention_ok = report.section("attention", lambda: attention_kernels(device, dtype, cfg)) is not None
        if not attention_ok and encoder.packed_kernel is not None:
            encoder.packed = False
        if report.section("warm_up", lambda: {"warm_up_s": encoder.warm_up()}) is None and encoder.packed_kernel:
            encoder.packed = False
            report.section("warm_up_padded", lambda: {"warm_up_s": encoder.warm_up()})
        if not encoder.packed:
            attention = "padded SDPA"
        else:
            attention = encoder.packed_kernel or "per-text SDPA"
        report.data["layout"] = {"packed": encoder.packed, "attention": attention}
        report.section("parity", lambda: parity(encoder, model_dir), needs_s=20)
        report.section("throughput", lambda: throughput(encoder, cfg), needs_s=60 if mode == "gpu" else 5)
        report.section("mixed_throughput", lambda: mixed_throughput(encoder, cfg), needs_s=20 if mode == "gpu" else 3)
        if encoder.packed:
            report.section(
                "mixed_throughput_padded",
                lambda: mixed_throughput_padded(encoder, cfg),
                needs_s=20 if mode == "gpu" else 3,
            )
        report.section("long_input", lambda: long_input(encoder, cfg), needs_s=30 if mode == "gpu" else 3)
        report.section("scheduler", lambda: scheduler_latency(encoder, model_dir, cfg), needs_s=2 * cfg.scheduler_s + 5)
    failed = [name for name, s in report.data["sections"].items() if not s["ok"]]
    report.data["failed_sections"] = failed
    report.write()
    print(f"wrote {args.out}; failed sections: {failed or 'none'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
