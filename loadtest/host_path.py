"""The host-path benchmark: what the served path sustains around the model, and where a request's time goes.

    python -m loadtest.benchmark --scenario host-path --url http://127.0.0.1:8000 --model DIR \\
        [--server-pid PID] [--client-processes 4] [--duration-s 10]

Meant for a service started with ``engine: null`` (no model work), so what it measures is the
path itself: proxy → ingress (parse, tokenise) → hand-off to an encoder replica → response. Two
phases, each closed-loop for ``duration_s``:

* ``queries``: single 20-token texts at high concurrency (requests/s is the figure);
* ``batch32``: requests of 32 texts of mixed lengths (tokens/s is the figure).

Requests are prepared once (JSON bytes, tokens counted with the model's tokenizer) and sent by
several client processes (aiohttp), so the client is not the limit: each process's CPU use is
reported beside the service's. Given ``--server-pid`` (the ``serve run`` process), the CPU of the
service's processes is split into proxy, ingress replicas, encoder replicas and the rest of Ray,
and the throughput is given per ingress CPU-second. Each request's time is split with the
service's timing headers: proxy and transport (client total − ``x-total-time``), parse and
tokenise (``x-tokenization-time``), replica queue and inference, response encoding
(``x-render-time``) and the hand-off to the replica and back (the rest of ``x-total-time``).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import random
import time
from dataclasses import dataclass

import orjson

from loadtest.stats import latency_summary_ms
from loadtest.texts import random_text

#: Server timing headers, in the order of a sample's fields after the client's total.
HEADERS = ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time", "x-render-time")

#: Process groups of a Ray Serve service, by what their process titles contain.
PROCESS_GROUPS = {"proxy": "ProxyActor", "ingress": "EmbeddingsIngress", "encoder": "KalmEncoder"}


@dataclass(frozen=True)
class Phase:
    name: str
    texts_per_request: int
    tokens: tuple[int, int]  # each text's length range, in tokens
    concurrency: int


def prepared_requests(tokenizer, model_id: str, phase: Phase, n: int, seed: int) -> list[tuple[bytes, int]]:
    """``n`` request bodies for ``phase`` (base64 answers, as the openai client asks) and their tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        texts = [_text_of(tokenizer, rng, phase.tokens) for _ in range(phase.texts_per_request)]
        tokens = sum(len(t.ids) for t in tokenizer.encode_texts(texts, "", True))
        body = {"model": model_id, "input": texts, "encoding_format": "base64"}
        out.append((orjson.dumps(body), tokens))
    return out


def _text_of(tokenizer, rng: random.Random, tokens: tuple[int, int]) -> str:
    """A text of a length drawn from ``tokens`` as the model's tokenizer counts it (special tokens included; decoding
    and encoding again may shift it by a token)."""
    want = rng.randint(*tokens)
    text = random_text(rng, (want, want + 8))
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    specials = len(tokenizer.tokenizer.encode("", add_special_tokens=True).ids)
    keep = max(1, want - specials)
    while len(ids) < keep:  # the generator's length is approximate
        ids += tokenizer.tokenizer.encode(" " + random_text(rng, (8, 16)), add_special_tokens=False).ids
    return tokenizer.tokenizer.decode(ids[:keep])


# --- the client processes ---------------------------------------------------------------------


def _client_process(url: str, bodies: list[tuple[bytes, int]], concurrency: int, duration_s: float, out) -> None:
    """One client process: ``concurrency`` closed-loop senders for ``duration_s``; puts its samples and CPU time."""
    samples, cpu = asyncio.run(_send_for(url, bodies, concurrency, duration_s))
    out.put((samples, cpu))


async def _send_for(url: str, bodies: list[tuple[bytes, int]], concurrency: int, duration_s: float):
    import aiohttp

    samples: list[tuple] = []  # (client_s, tokens, *server headers in seconds)
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def sender(k: int, until: float | None, keep: bool):
            nonlocal errors
            i = k
            while until is None or time.perf_counter() < until:
                body, tokens = bodies[i % len(bodies)]
                i += concurrency
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    elapsed = time.perf_counter() - started
                    if resp.status != 200:
                        errors += 1
                    elif keep:
                        server = tuple(float(resp.headers.get(h, "nan")) / 1e3 for h in HEADERS)
                        samples.append((elapsed, tokens, *server))
                if until is None:
                    return

        await asyncio.gather(*(sender(k, None, False) for k in range(concurrency)))  # connections open, warm
        cpu0 = time.process_time()
        until = time.perf_counter() + duration_s
        started = time.perf_counter()
        await asyncio.gather(*(sender(k, until, True) for k in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    return samples, {"cpu_s": cpu, "wall_s": wall, "errors": errors}


def drive_from_processes(
    url: str, bodies: list[tuple[bytes, int]], concurrency: int, processes: int, duration_s: float
) -> tuple[list[tuple], list[dict]]:
    """Every process's samples together, and each process's CPU and wall time."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    share = [concurrency // processes + (1 if p < concurrency % processes else 0) for p in range(processes)]
    procs = [
        ctx.Process(target=_client_process, args=(url, bodies[p::processes] or bodies, c, duration_s, out))
        for p, c in enumerate(share)
        if c
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration_s + 600) for _ in procs]
    for p in procs:
        p.join()
    return [s for samples, _ in results for s in samples], [cpu for _, cpu in results]


# --- the service's processes ----------------------------------------------------------------------


def service_processes(root_pid: int) -> dict[str, list]:
    """The processes under ``root_pid`` (``serve run``), by group: proxy, ingress, encoder, ray (the rest)."""
    import psutil

    root = psutil.Process(root_pid)
    groups: dict[str, list] = {name: [] for name in (*PROCESS_GROUPS, "ray")}
    for proc in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        group = next((g for g, mark in PROCESS_GROUPS.items() if mark in title), "ray")
        groups[group].append(proc)
    return groups


def cpu_seconds(groups: dict[str, list]) -> dict[str, float]:
    import psutil

    out = {}
    for name, procs in groups.items():
        total = 0.0
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[name] = total
    return out


# --- one phase, summarised ------------------------------------------------------------------------


def run_phase(
    url: str,
    phase: Phase,
    bodies: list[tuple[bytes, int]],
    processes: int,
    duration_s: float,
    server_pid: int | None,
) -> dict:
    groups = service_processes(server_pid) if server_pid else None
    before = cpu_seconds(groups) if groups else None
    started = time.perf_counter()
    samples, clients = drive_from_processes(url + "/v1/embeddings", bodies, phase.concurrency, processes, duration_s)
    wall = max(c["wall_s"] for c in clients) if clients else time.perf_counter() - started
    after = cpu_seconds(groups) if groups else None
    requests = len(samples)
    tokens = sum(s[1] for s in samples)
    report: dict = {
        "texts_per_request": phase.texts_per_request,
        "text_tokens": list(phase.tokens),
        "concurrency": phase.concurrency,
        "client_processes": len(clients),
        "seconds": round(wall, 2),
        "requests": requests,
        "errors": sum(c["errors"] for c in clients),
        "requests_per_s": round(requests / wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_tokens_per_request": round(tokens / requests, 1) if requests else None,
        "latency": latency_summary_ms([s[0] for s in samples]),
        "time_split_ms": time_split_ms(samples),
        "client_cpu_per_process": [round(c["cpu_s"] / c["wall_s"], 2) for c in clients],
    }
    if before is not None and after is not None:
        cores = {name: round((after[name] - before[name]) / wall, 3) for name in after}
        report["service_cpu_cores"] = cores
        report["ingress_replicas"] = len(groups["ingress"]) if groups else None
        ingress = cores.get("ingress") or math.nan
        report["per_ingress_cpu"] = {
            "requests_per_s": round(requests / wall / ingress, 1),
            "tokens_per_s": round(tokens / wall / ingress, 1),
        }
    return report


def time_split_ms(samples: list[tuple]) -> dict:
    """Mean milliseconds of each part of a request's time (see the module's doc for the parts)."""
    if not samples:
        return {}
    n = len(samples)

    def mean(xs) -> float:
        return round(sum(xs) / n * 1e3, 3)

    client = [s[0] for s in samples]
    total, tok, queue, inference, render = ([_zero_nan(s[i]) for s in samples] for i in range(2, 7))
    return {
        "client_total": mean(client),
        "proxy_and_transport": mean(c - t for c, t in zip(client, total)),
        "server_total": mean(total),
        "parse_and_tokenise": mean(tok),
        "hand_off_to_replica_and_back": mean(
            t - a - q - i - r for t, a, q, i, r in zip(total, tok, queue, inference, render)
        ),
        "replica_queue": mean(queue),
        "replica_inference": mean(inference),
        "response_encoding": mean(render),
    }


def _zero_nan(x: float) -> float:
    """A header the server did not send counts as zero (older servers send no x-render-time)."""
    return 0.0 if math.isnan(x) else x


def default_client_processes() -> int:
    return max(2, min(8, (os.cpu_count() or 2)))


def host_path_report(
    url: str,
    tokenizer,
    model_id: str,
    phases: list[Phase],
    processes: int,
    duration_s: float,
    server_pid: int | None,
    seed: int = 0,
    distinct_requests: int = 256,
) -> dict:
    """Every phase against ``url``: the ``host_path`` section of the benchmark's report."""
    out: dict = {"url": url, "client_processes": processes, "duration_s": duration_s, "phases": {}}
    for phase in phases:
        n = distinct_requests if phase.texts_per_request == 1 else max(8, distinct_requests // 8)
        bodies = prepared_requests(tokenizer, model_id, phase, n, seed)
        out["phases"][phase.name] = run_phase(url, phase, bodies, processes, duration_s, server_pid)
    return out
