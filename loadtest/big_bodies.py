"""Hostile-size requests against a running service: time to answer, ingress memory, small-query latency.

    python -m loadtest.big_bodies --url http://127.0.0.1:8000 --model tiny --ray-tmpdir /tmp/xyz

Sends 32 MiB bodies of every shape (one text, one text with truncate, 2,048 texts, token ids
flat and nested), one at a time, then four at once while small queries run, and prints for
each: status, seconds, the error message, and the peak RSS growth of the ingress replicas
(found among the processes whose TMPDIR is ``--ray-tmpdir``, so other services on the machine
are left out). A benchmark: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import threading
import time

import httpx
import orjson
import psutil

from loadtest.soak import replica_processes
from loadtest.stats import percentile

MIB = 1024 * 1024


class PeakRss:
    """Samples the summed RSS of ``pids`` every 20 ms while in use; ``growth_mb`` = peak - start."""

    def __init__(self, pids: list[int]):
        self.procs = [psutil.Process(pid) for pid in pids]
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        return sum(p.memory_info().rss for p in self.procs)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / MIB


def bodies(model: str, size: int) -> dict[str, bytes]:
    words = "lorem ipsum dolor sit amet consectetur "
    one = words * (size // len(words))
    per_text = size // 2048 - 8
    ids_flat = [101_000 + i % 9000 for i in range(size // 7)]  # "10xxxx," = 7 bytes each
    ids_nested = [ids_flat[i : i + 4096] for i in range(0, len(ids_flat), 4096)]
    shapes: dict[str, dict] = {
        "one text": {"model": model, "input": one},
        "one text, truncate": {"model": model, "input": one, "truncate": True},
        "2048 texts": {"model": model, "input": [(words * (per_text // len(words) + 1))[:per_text]] * 2048},
        "token ids, flat": {"model": model, "input": ids_flat},
        "token ids, nested": {"model": model, "input": ids_nested},
    }
    out = {}
    for name, body in shapes.items():
        raw = orjson.dumps(body)
        out[name] = raw[: 32 * MIB] if len(raw) <= 32 * MIB else orjson.dumps(_shrink(body, len(raw) - 32 * MIB))
    return out


def _shrink(body: dict, excess: int) -> dict:
    value = body["input"]
    if isinstance(value, str):
        return {**body, "input": value[: len(value) - excess]}
    if isinstance(value[0], int):
        return {**body, "input": value[: len(value) - excess // 6 - 1]}
    if isinstance(value[0], str):
        per = excess // len(value) + 1
        return {**body, "input": [t[: len(t) - per] for t in value]}
    return {**body, "input": value[: len(value) - excess // (6 * 4096) - 1]}


def post(client: httpx.Client, url: str, raw: bytes) -> tuple[int, float, str]:
    started = time.perf_counter()
    resp = client.post(url, content=raw, headers={"content-type": "application/json"})
    seconds = time.perf_counter() - started
    if resp.status_code >= 400:
        message = resp.json()["error"]["message"][:110]
    else:
        message = (
            f"{resp.json()['usage']['total_tokens']} tokens; tokenisation {resp.headers['x-tokenization-time']} ms, "
            f"inference {resp.headers['x-inference-time']} ms"
        )
    return resp.status_code, seconds, message


SMALL_QUERY = "a short query about embeddings and how a service answers it quickly"  # ~20 tokens


def small_queries(
    url: str, model: str, stop: threading.Event, latencies: list[float], server_s: list[float] | None = None
) -> None:
    """Small queries back to back until ``stop``: each one's seconds into ``latencies``, and the
    ingress's own ``x-total-time`` (from its receipt of the request to its answer) into ``server_s``."""
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            started = time.perf_counter()
            response = client.post(url, json={"model": model, "input": SMALL_QUERY})
            latencies.append(time.perf_counter() - started)
            if server_s is not None and "x-total-time" in response.headers:
                server_s.append(float(response.headers["x-total-time"]) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--ray-tmpdir", required=True, help="TMPDIR of the `serve run` that serves --url")
    ap.add_argument("--size-mib", type=float, default=32)
    args = ap.parse_args()
    url = args.url + "/v1/embeddings"
    pids = [p.pid for p in replica_processes(args.ray_tmpdir, "EmbeddingsIngress")]
    print(f"ingress pids: {pids}")
    shapes = bodies(args.model, int(args.size_mib * MIB))
    results = []
    with httpx.Client(timeout=300) as client:
        for name, raw in shapes.items():
            with PeakRss(pids) as rss:
                status, seconds, message = post(client, url, raw)
            results.append(
                {
                    "shape": name,
                    "body_mib": round(len(raw) / MIB, 2),
                    "status": status,
                    "seconds": round(seconds, 2),
                    "ingress_rss_growth_mb": round(rss.growth_mb, 1),
                    "answer": message,
                }
            )
            print(json.dumps(results[-1], ensure_ascii=False))

    # small-query latency alone, then while four 32 MiB bodies arrive at once
    for label, n_big in (("alone", 0), ("with 4 big bodies at once", 4)):
        stop = threading.Event()
        latencies: list[float] = []
        queriers = [threading.Thread(target=small_queries, args=(url, args.model, stop, latencies)) for _ in range(4)]
        for t in queriers:
            t.start()
        big_bodies = [raw for name, raw in shapes.items() if name != "one text, truncate"]
        with PeakRss(pids) as rss, httpx.Client(timeout=300) as client, cf.ThreadPoolExecutor(4) as pool:
            started = time.perf_counter()
            if n_big:
                big = list(pool.map(lambda raw: post(client, url, raw), big_bodies[:n_big]))
            else:
                time.sleep(5)
                big = []
            window = time.perf_counter() - started
        stop.set()
        for t in queriers:
            t.join()
        line = {
            "small queries": label,
            "n": len(latencies),
            "p50_s": round(percentile(latencies, 50), 3),
            "p95_s": round(percentile(latencies, 95), 3),
            "window_s": round(window, 2),
            "big": [(s, round(sec, 2)) for s, sec, _ in big],
            "ingress_rss_growth_mb": round(rss.growth_mb, 1),
        }
        print(json.dumps(line))


if __name__ == "__main__":
    main()
