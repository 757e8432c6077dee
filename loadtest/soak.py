"""Soak: minutes of mixed load against a running service while encoder replicas are killed.

    python -m loadtest.soak --url http://127.0.0.1:8000 --model tiny --ray-tmpdir /tmp/xyz \
        --minutes 30 --kill-every-s 180

Clients send a mix (queries, batches of texts, token ids, truncated long texts, and client
mistakes that must get a 4xx); every ``--kill-every-s`` one encoder replica process is SIGKILLed
(by pid; Serve starts a new one). Prints requests by kind and status, the failures (a good
request not answered 200, a mistake not answered 4xx, or no answer), latency, and the RSS of
the ingress and encoder replicas at start and end. Processes are found among those whose
TMPDIR is ``--ray-tmpdir``, so other services on the machine are left alone. A benchmark: it
prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import threading
import time

import httpx
import psutil

from loadtest.stats import percentile

MIB = 1024 * 1024
WORDS = "the quick brown fox jumps over a lazy dog while ray serve batches embeddings".split()


def replica_processes(ray_tmpdir: str, deployment: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if f"ServeReplica:kalm:{deployment}" in " ".join(p.info["cmdline"] or []) and (
                p.environ().get("TMPDIR") == ray_tmpdir
            ):
                found.append(p)
        except psutil.Error:
            continue
    return found


def rss_mb(ray_tmpdir: str) -> dict[str, list[float]]:
    out = {}
    for deployment in ("EmbeddingsIngress", "KalmEncoder"):
        sizes = []
        for p in replica_processes(ray_tmpdir, deployment):
            try:
                sizes.append(round(p.memory_info().rss / MIB, 1))
            except psutil.Error:
                continue
        out[deployment] = sorted(sizes)
    return out


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def request_mix(rng: random.Random, model: str) -> tuple[str, dict, bool]:
    """(kind, body, good): what one client sends next."""
    roll = rng.random()
    if roll < 0.45:
        return "query", {"model": model, "input": text(rng, rng.randint(3, 20)), "input_type": "query"}, True
    if roll < 0.70:
        return "batch", {"model": model, "input": [text(rng, rng.randint(20, 200)) for _ in range(16)]}, True
    if roll < 0.80:
        # ids from OpenAI's cl100k_base (the service's default reading of token ids; 100,256 of them)
        ids = [[rng.randint(100, 100_000) for _ in range(rng.randint(10, 300))] for _ in range(8)]
        return "token ids", {"model": model, "input": ids}, True
    if roll < 0.88:
        return "long, truncate", {"model": model, "input": text(rng, 3000), "truncate": True}, True
    mistakes: list[dict] = [
        {"model": model, "input": ""},
        {"model": "gpt-4", "input": "x"},
        {"model": model, "input": [1.5]},
        {"model": model, "input": "x", "dimensions": 0},
        {"model": model, "input": [5, 10**9]},
    ]
    return "mistake", rng.choice(mistakes), False


def client_loop(url: str, model: str, seed: int, stop: threading.Event, results: list) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=330) as client:
        while not stop.is_set():
            kind, body, good = request_mix(rng, model)
            started = time.perf_counter()
            status: int | str  # the HTTP status, or the exception's name when there was no answer
            try:
                status = client.post(url, json=body).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            seconds = time.perf_counter() - started
            ok = status == 200 if good else isinstance(status, int) and 400 <= status < 500
            results.append((kind, status, ok, seconds))


def killer_loop(ray_tmpdir: str, every_s: float, stop: threading.Event, kills: list) -> None:
    while not stop.wait(every_s):
        encoders = replica_processes(ray_tmpdir, "KalmEncoder")
        if encoders:
            victim = random.choice(encoders)
            os.kill(victim.pid, signal.SIGKILL)
            kills.append((round(time.monotonic(), 1), victim.pid))
            print(f"killed encoder replica pid {victim.pid}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--ray-tmpdir", required=True, help="TMPDIR of the `serve run` that serves --url")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--kill-every-s", type=float, default=180)
    ap.add_argument("--clients", type=int, default=6)
    args = ap.parse_args()
    url = args.url + "/v1/embeddings"

    rss_start = rss_mb(args.ray_tmpdir)
    print(f"RSS at start (MB): {rss_start}", flush=True)
    stop = threading.Event()
    results: list[tuple[str, int | str, bool, float]] = []  # (kind, status, ok, seconds)
    kills: list[tuple[float, int]] = []
    threads = [
        threading.Thread(target=client_loop, args=(url, args.model, seed, stop, results))
        for seed in range(args.clients)
    ]
    threads.append(threading.Thread(target=killer_loop, args=(args.ray_tmpdir, args.kill_every_s, stop, kills)))
    started = time.monotonic()
    for t in threads:
        t.start()
    while time.monotonic() - started < args.minutes * 60:
        time.sleep(min(60, args.minutes * 60 - (time.monotonic() - started)))
        failed = sum(1 for r in results if not r[2])
        print(f"{(time.monotonic() - started) / 60:.1f} min: {len(results)} requests, {failed} failed", flush=True)
    stop.set()
    for t in threads:
        t.join()
    time.sleep(5)  # let replicas settle before the last RSS reading
    rss_end = rss_mb(args.ray_tmpdir)

    by_kind: dict = collections.defaultdict(collections.Counter)
    for kind, status, _, _ in results:
        by_kind[kind][str(status)] += 1
    failures = [r for r in results if not r[2]]
    good_latency = [r[3] for r in results if r[2] and r[0] != "mistake"]
    summary = {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": len(results),
        "failed": len(failures),
        "failures": collections.Counter(f"{k} -> {s}" for k, s, _, _ in failures),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "latency_s": {
            "p50": round(percentile(good_latency, 50), 3),
            "p95": round(percentile(good_latency, 95), 3),
            "max": round(max(good_latency), 3),
        },
        "encoder_kills": len(kills),
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
