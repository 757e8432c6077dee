"""Throughput and latency benchmark: the encoder core in-process, and any OpenAI-style URL.

    python -m loadtest.benchmark --model /tmp/kalm-full [--url http://127.0.0.1:8000] \\
        [--concurrency 1,4,16] [--scale 1.0] [--json results.json] [--scenario throughput|priority|all]

    # side by side with any OpenAI-compatible server (e.g. vLLM), one command per server:
    python -m loadtest.benchmark --model /tmp/kalm-full --url http://127.0.0.1:8111 --plain-openai \\
        --served-only --workload side-by-side --concurrency 8 --passes 2

    # the served path around the model (a service with `engine: null`), per ingress CPU:
    python -m loadtest.benchmark --model /tmp/kalm-tiny --url http://127.0.0.1:8000 --scenario host-path \\
        --server-pid $(pgrep -f "serve run" | head -1) [--client-processes 4] [--duration-s 10]

One deterministic, seeded workload (short multilingual queries with an instruction,
passages of 100-400 tokens, a few documents of 2-4k tokens) runs

* in-process: concurrent callers → the same ``TokenBudgetBatcher`` + ``Encoder`` the
  replicas use (tokenisation included), and
* served: the same requests over HTTP at each concurrency (when ``--url`` is given).

It prints, and writes as JSON: tokens/s, requests/s, p50/p95/p99 latency, mean batch
rows and tokens and padding fraction (served: from the encoder replica's counters when
``--ray-address`` reaches the service's cluster), achieved GFLOP/s as a fraction of an fp32 matmul measured
in the same run, a lone short query's latency both ways, and — scenario ``priority`` —
query and passage latencies under saturating bulk load with priority scheduling on and
off. Numbers, not pass/fail: targets are judged by the reader. Scenario ``host-path``
(``loadtest.host_path``) measures the served path alone: 20-token queries and 32-text requests
from several client processes, requests/s and tokens/s per ingress CPU, and where each request's
time goes.

Tokens are counted here, with the model's tokenizer, for every target alike (never from a
server's ``usage``). ``--plain-openai`` sends only OpenAI's own fields, with a query's
instruction written into its text as the model's prompt format has it, so any
OpenAI-compatible server computes the same inputs; ``--served-only`` skips the
in-process runs (and loads no model here, only its tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.benchmark_targets import InProcess, Served, count_tokens
from loadtest.benchmark_workload import Request, make_side_by_side_workload, make_workload
from loadtest.host_path import Phase, default_client_processes, host_path_report
from loadtest.priority_scenario import queries_under_bulk_load
from loadtest.stats import latency_summary_ms
from loadtest.texts import random_text

#: Sends one request, at a priority or the target's default, and returns its tokens.
Call = Callable[[Request, str | None], Awaitable[int]]


# --- measurement ------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    latencies_s: dict = field(default_factory=dict)  # kind -> list of seconds
    batches: dict | None = None

    def summary(self) -> dict:
        every = [x for xs in self.latencies_s.values() for x in xs]
        out = {
            "name": self.name,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 2),
            "tokens_per_s": round(self.tokens / self.wall_s, 1),
            "requests_per_s": round(self.requests / self.wall_s, 2),
            **latency_summary_ms(every),
        }
        for kind, xs in sorted(self.latencies_s.items()):
            out[kind] = latency_summary_ms(xs)
        if self.batches:
            out["batches"] = self.batches
        return out


async def drive(
    workload: list[Request], concurrency: int, call: Callable[[Request], Awaitable[int]]
) -> tuple[dict, int, float]:
    """Run ``workload`` with ``concurrency`` closed-loop clients; ``call(req) -> tokens``."""
    queue = list(reversed(workload))
    latencies: dict[str, list[float]] = {}
    tokens = 0

    async def client():
        nonlocal tokens
        while queue:
            req = queue.pop()
            started = time.perf_counter()
            n = await call(req)  # not `tokens += await ...`: that reads tokens before awaiting
            tokens += n
            latencies.setdefault(req.kind, []).append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, tokens, time.perf_counter() - started


# --- the pieces of a run -----------------------------------------------------------------


def flops_per_token(config: dict, seq_len: float) -> float:
    """Forward FLOPs per token: 2 x matmul weights + attention scores and mixing (4 x layers x seq x width)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = h // heads
    per_layer = h * h + 2 * h * kv * head_dim + h * h + 3 * h * inter
    return 2 * layers * per_layer + 4 * layers * seq_len * h


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e9


def core_efficiency(encoder: Any, passages: list[str], matmul: float) -> dict:
    """Passages of 100-400 tokens straight through Encoder.embed_token_ids: achieved vs matmul GFLOP/s."""
    ids = [t.ids for t in encoder.tokenizer.encode_texts(passages, truncate=True)]
    encoder.embed_token_ids(ids[:4])
    started = time.perf_counter()
    encoder.embed_token_ids(ids)
    seconds = time.perf_counter() - started
    lengths = [len(x) for x in ids]
    # Attention cost grows with each text's own length: average it over tokens.
    mean_len_per_token = sum(n * n for n in lengths) / sum(lengths)
    flops = sum(lengths) * flops_per_token(encoder.files.config, mean_len_per_token)
    achieved = flops / seconds / 1e9
    return {
        "texts": len(ids),
        "tokens": sum(lengths),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(lengths) / seconds, 1),
        "gflops": round(achieved, 1),
        "matmul_gflops": round(matmul, 1),
        "fraction_of_matmul": round(achieved / matmul, 3),
        "matmul_implied_tokens_per_s": round(
            matmul * 1e9 / flops_per_token(encoder.files.config, mean_len_per_token), 1
        ),
    }


async def lone_query(call: Callable[[Request], Awaitable[int]], req: Request, repeats: int) -> dict:
    await call(req)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call(req)
        times.append(time.perf_counter() - started)
    return latency_summary_ms(times)


async def priority_run(
    call: Call, workload: list[Request], bulk_clients: int, query_interval_s: float, duration_s: float, prioritise: bool
) -> dict:
    """The priority scenario on this workload's queries and passages; scheduling off sends everything as bulk."""
    queries = [r for r in workload if r.kind == "query"]
    bulk = [r for r in workload if r.kind == "passages"]
    priority = None if prioritise else "bulk"
    run = await queries_under_bulk_load(
        lambda i: call(queries[i % len(queries)], priority),
        lambda i: call(bulk[i % len(bulk)], priority),
        bulk_clients,
        query_interval_s,
        duration_s,
    )
    return {
        "scheduling": "on" if prioritise else "off",
        "tokens_per_s": round(run.tokens_per_s, 1),
        "wall_s": round(run.seconds, 1),
        "query": latency_summary_ms(run.query_latencies_s),
        "passages": latency_summary_ms(run.bulk_latencies_s),
    }


# --- main --------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict:
    import torch

    from serve_app import Encoder
    from serve_app.config import ServiceConfig
    from serve_app.core.tokenization import TextTokenizer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.scenario == "host-path":
        return await host_path(args)
    if args.served_only:
        encoder, tokenizer = None, TextTokenizer.from_dir(args.model)
    else:
        encoder = Encoder.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens
        )
        tokenizer = encoder.tokenizer
    if args.workload == "side-by-side":
        workload = make_side_by_side_workload(seed=args.seed)
    else:
        workload = make_workload(max(8, int(40 * args.scale)), seed=args.seed)
    report: dict = {
        "model": args.model,
        "url": args.url,
        "plain_openai": args.plain_openai,
        "workload": {
            "name": args.workload,
            "requests": len(workload),
            "tokens": sum(count_tokens(tokenizer, r) for r in workload),
            "kinds": {k: sum(r.kind == k for r in workload) for k in ("query", "passages", "long")},
        },
    }
    if encoder:
        report["in_process"] = {
            "standin": encoder.files.is_standin,
            "device": str(encoder.device),
            "dtype": str(encoder.dtype),
            "torch_threads": torch.get_num_threads(),
            "max_batch_tokens": encoder.max_batch_tokens,
        }
    print(json.dumps(report, indent=1), flush=True)
    # the service's scheduling defaults, but for what the command line sets
    config = ServiceConfig(
        max_batch_wait_ms=args.max_batch_wait_ms, interactive_batch_tokens=args.interactive_batch_tokens
    )
    in_process = InProcess(encoder, config) if encoder else None
    served = None
    if args.url:
        served = Served(args.url, args.served_model, args.api_key, args.ray_address, tokenizer, args.plain_openai)
        await served.resolve_model()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    if args.scenario in ("throughput", "all"):
        report["matmul_gflops"] = round(matmul_gflops(), 1)
        lone = next(r for r in workload if r.kind == "query")
        report["lone_query"] = {}
        if in_process:
            rng = random.Random(args.seed + 1)
            passages = [random_text(rng, (100, 400)) for _ in range(max(8, int(16 * args.scale)))]
            report["core"] = core_efficiency(encoder, passages, report["matmul_gflops"])
            print("core:", json.dumps(report["core"]), flush=True)
            report["lone_query"]["in_process"] = await lone_query(in_process.call, lone, 20)
        if served:
            report["lone_query"]["served"] = await lone_query(served.call, lone, 20)
        print("lone query:", json.dumps(report["lone_query"]), flush=True)
        report["runs"] = []
        for c in concurrencies:
            for _ in range(args.passes):
                if in_process:
                    before = in_process.snapshot()
                    lat, tokens, wall = await drive(workload, c, in_process.call)
                    batches = in_process.batch_stats_since(before)
                    report["runs"].append(
                        RunResult("in_process", c, len(workload), tokens, wall, lat, batches).summary()
                    )
                    print(json.dumps(report["runs"][-1]), flush=True)
                if served:
                    before_m = await served.batch_counters()
                    lat, tokens, wall = await drive(workload, c, served.call)
                    served_batches = Served.batch_stats_between(before_m, await served.batch_counters())
                    report["runs"].append(
                        RunResult("served", c, len(workload), tokens, wall, lat, served_batches).summary()
                    )
                    print(json.dumps(report["runs"][-1]), flush=True)
        top = max(concurrencies)
        by = {r["name"]: r for r in report["runs"] if r["concurrency"] == top}
        if "served" in by and "in_process" in by:
            report["served_over_in_process_at_saturation"] = round(
                by["served"]["tokens_per_s"] / by["in_process"]["tokens_per_s"], 3
            )

    if args.scenario in ("priority", "all"):
        report["priority"] = []
        targets: list[tuple[str, Call]] = [("in_process", in_process.call)] if in_process else []
        if served and not args.plain_openai:  # priorities are this service's extension
            targets.append(("served", served.call))
        for name, call in targets:
            for on in (True, False):
                if in_process:
                    before, in_process.results = in_process.snapshot(), []
                    preemptions = in_process.batcher.stats.preemptions
                result = await priority_run(
                    call, workload, args.bulk_clients, args.query_interval_s, args.priority_duration_s, prioritise=on
                )
                result["target"] = name
                if name == "in_process" and in_process:
                    result["batches"] = in_process.batch_stats_since(before)
                    result["preemptions"] = in_process.batcher.stats.preemptions - preemptions
                    queries = [r for kind, r in in_process.results if kind == "query"]
                    result["query_queue"] = latency_summary_ms([r.queue_s for r in queries])
                    result["query_inference"] = latency_summary_ms([r.inference_s for r in queries])
                report["priority"].append(result)
                print(json.dumps(result), flush=True)
        if in_process:
            report["longest_queue_wait_in_process_s"] = round(in_process.batcher.stats.longest_queue_s, 2)

    if in_process:
        in_process.batcher.close()
    return report


async def host_path(args: argparse.Namespace) -> dict:
    """Scenario host-path: the served path alone (``loadtest.host_path``); loads only the tokenizer."""
    from serve_app.core.tokenization import TextTokenizer

    tokenizer = TextTokenizer.from_dir(args.model)
    served = Served(args.url, args.served_model, args.api_key, None, tokenizer)
    model_id = await served.resolve_model()
    lo, hi = (int(x) for x in args.mixed_tokens.split(","))
    phases = [
        Phase("queries", 1, (20, 20), args.query_concurrency),
        Phase("batch32", 32, (lo, hi), args.batch_concurrency),
    ]
    report = host_path_report(
        args.url,
        tokenizer,
        model_id,
        phases,
        args.client_processes or default_client_processes(),
        args.duration_s,
        args.server_pid,
        args.seed,
    )
    return {"model": args.model, "url": args.url, "host_path": report}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory or hub id (the full-size stand-in for the targets)")
    p.add_argument("--url", help="OpenAI-compatible base URL to benchmark as well, e.g. http://127.0.0.1:8000")
    p.add_argument("--served-model", help="model id to send (default: first of /v1/models)")
    p.add_argument("--api-key")
    p.add_argument(
        "--ray-address",
        help="Ray cluster of the service (e.g. auto): served batch statistics are read from its KalmEncoder replica",
    )
    p.add_argument(
        "--plain-openai",
        action="store_true",
        help="send only OpenAI's fields (instructions written into the query text): for any OpenAI-compatible server",
    )
    p.add_argument("--served-only", action="store_true", help="benchmark --url only: no model loaded in this process")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--passes", type=int, default=1, help="runs of the workload per concurrency and target")
    p.add_argument(
        "--workload",
        choices=["mixed", "side-by-side"],
        default="mixed",
        help="mixed: queries, 1-4 passages, a few 2-4k documents (--scale); side-by-side: 60 queries + 15 x 4 passages",
    )
    p.add_argument("--scale", type=float, default=1.0, help="mixed workload size (1.0 = 40 requests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--dtype", default="auto", help="in-process dtype (default: the service's auto)")
    p.add_argument("--threads", type=int)
    p.add_argument("--max-batch-tokens", type=int, help="in-process token budget (default: the encoder's)")
    p.add_argument("--max-batch-wait-ms", type=float, default=2.0)
    p.add_argument(
        "--interactive-batch-tokens",
        type=int,
        help="in-process budget of a batch led by interactive work (default: the service's)",
    )
    p.add_argument("--scenario", choices=["throughput", "priority", "all", "host-path"], default="throughput")
    p.add_argument("--bulk-clients", type=int, default=8)
    p.add_argument("--query-interval-s", type=float, default=1.0)
    p.add_argument("--priority-duration-s", type=float, default=60.0)
    p.add_argument("--client-processes", type=int, help="host-path: client processes (default: the CPUs, 2-8)")
    p.add_argument("--duration-s", type=float, default=10.0, help="host-path: seconds per phase")
    p.add_argument("--query-concurrency", type=int, default=64, help="host-path: clients sending 20-token queries")
    p.add_argument("--batch-concurrency", type=int, default=8, help="host-path: clients sending 32-text requests")
    p.add_argument("--mixed-tokens", default="8,512", help="host-path: LO,HI tokens of each of the 32 texts")
    p.add_argument("--server-pid", type=int, help="host-path: the `serve run` process, for the service's CPU split")
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if (args.served_only or args.scenario == "host-path") and not args.url:
        sys.exit("--served-only and --scenario host-path need --url")
    report = asyncio.run(main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("runs", "priority")}, indent=1))
