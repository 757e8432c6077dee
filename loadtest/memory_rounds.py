"""Rounds of concurrent big truncated requests: does memory come back, do small queries stall?

    python -m loadtest.memory_rounds --url http://127.0.0.1:8000 --model MODEL_ID --ray-tmpdir DIR \\
        [--rounds 5] [--concurrency 8] [--size-mib 30] [--upload length|chunked]

Each round sends ``--concurrency`` bodies of one ``--size-mib`` text with ``truncate: true`` at once,
while four clients send small (~20-token) queries back to back. ``--upload length`` posts with a
declared Content-Length (httpx); ``chunked`` runs curl exactly as a user would send a file,
``curl -H 'Transfer-Encoding: chunked' --data-binary @file``. After each round it prints the RSS of
each ingress replica and of Serve's proxy (the processes whose TMPDIR or RAY_TMPDIR is ``--ray-tmpdir``), the
big requests' seconds (and the medians of the service's own split: tokenisation, queue, inference) and
the small queries' p50/p95 (and the p95 of their time inside the ingress); at the end the RSS after
``--idle-s`` idle. RSS is split into the process's own memory and the pages of Ray's shared object
store it has touched (Linux, ``/proc/PID/status``): bodies pass from the proxy to the ingress
through that store, so both processes count its pages, which exist once for the machine.
A benchmark: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson
import psutil

from loadtest.big_bodies import small_queries
from loadtest.stats import percentile

MIB = 1024 * 1024


def service_processes(ray_tmpdir: str) -> dict[str, psutil.Process]:
    """``ingress-<pid>`` and ``proxy-<pid>`` of the service whose Ray runs with TMPDIR=ray_tmpdir."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            kind = "ingress" if "EmbeddingsIngress" in cmdline else "proxy" if "ProxyActor" in cmdline else None
            env = p.environ() if kind else {}
            if kind and ray_tmpdir in (env.get("TMPDIR"), env.get("RAY_TMPDIR")):
                found[f"{kind}-{p.pid}"] = p
        except psutil.Error:
            continue
    return dict(sorted(found.items()))


def memory_mb(procs: dict[str, psutil.Process]) -> dict[str, dict[str, float]]:
    """Each process's RSS in MB, split as Linux counts it: ``own`` (anonymous pages: its heap and
    buffers), ``store`` (pages of Ray's shared-memory object store it has touched: the same
    physical pages in every process that maps them, bounded by the store's size) and ``files``."""
    out = {}
    for name, p in procs.items():
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{p.pid}/status").read_text().splitlines())
        kb = {key: int(fields[key].split()[0]) for key in ("VmRSS", "RssAnon", "RssShmem", "RssFile")}
        out[name] = {
            "rss": round(kb["VmRSS"] / 1024, 1),
            "own": round(kb["RssAnon"] / 1024, 1),
            "store": round(kb["RssShmem"] / 1024, 1),
            "files": round(kb["RssFile"] / 1024, 1),
        }
    return out


#: The service's timing headers of a big request (ms): where its seconds went.
SPLIT_HEADERS = ("x-tokenization-time", "x-queue-time", "x-inference-time")


def big_request(url: str, path: str, upload: str) -> tuple[int, float, dict[str, float]]:
    """(status, seconds, the service's split of them in seconds) of one big request."""
    started = time.perf_counter()
    if upload == "chunked":
        written = "%{http_code}" + "".join(f" %header{{{name}}}" for name in SPLIT_HEADERS)
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", written, "-H", "content-type: application/json",
             "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}", url],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        status, *values = (out.stdout or "0").split(" ")
    else:
        with open(path, "rb") as f, httpx.Client(timeout=600) as client:
            response = client.post(url, content=f.read(), headers={"content-type": "application/json"})
        status, values = str(response.status_code), [response.headers.get(name, "") for name in SPLIT_HEADERS]
    seconds = time.perf_counter() - started
    split = {
        name.removeprefix("x-").removesuffix("-time"): float(v) / 1e3 for name, v in zip(SPLIT_HEADERS, values) if v
    }
    return int(status), seconds, split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--ray-tmpdir", required=True, help="TMPDIR or RAY_TMPDIR of the `serve run` that serves --url")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--size-mib", type=float, default=30)
    ap.add_argument("--upload", choices=("length", "chunked"), default="length")
    ap.add_argument("--idle-s", type=float, default=20)
    args = ap.parse_args()
    url = args.url + "/v1/embeddings"
    words = "lorem ipsum dolor sit amet consectetur "
    text = (words * int(args.size_mib * MIB // len(words) + 1))[: int(args.size_mib * MIB) - 100]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        f.write(orjson.dumps({"model": args.model, "input": text, "truncate": True}))
        path = f.name
    del text
    try:
        procs = service_processes(args.ray_tmpdir)
        print(json.dumps({"start_mb": memory_mb(procs), "upload": args.upload}))
        for round_ in range(1, args.rounds + 1):
            stop, latencies, server_s = threading.Event(), list[float](), list[float]()
            queriers = [
                threading.Thread(target=small_queries, args=(url, args.model, stop, latencies, server_s))
                for _ in range(4)
            ]
            for t in queriers:
                t.start()
            with cf.ThreadPoolExecutor(args.concurrency) as pool:
                big = list(pool.map(lambda _: big_request(url, path, args.upload), range(args.concurrency)))
            stop.set()
            for t in queriers:
                t.join()
            line = {
                "round": round_,
                "big_status": sorted({s for s, _, _ in big}),
                "big_s_max": round(max(sec for _, sec, _ in big), 2),
                "big_s_median": round(statistics.median(sec for _, sec, _ in big), 2),
                # medians of the service's own split: host work, waiting for the encoder, the encoder
                **{
                    f"big_{part}_s_median": round(statistics.median(split.get(part, 0.0) for _, _, split in big), 2)
                    for part in ("tokenization", "queue", "inference")
                },
                "big_tokenization_s_max": round(max(split.get("tokenization", 0.0) for _, _, split in big), 2),
                "small_n": len(latencies),
                "small_p50_s": round(percentile(latencies, 50), 3),
                "small_p95_s": round(percentile(latencies, 95), 3),
                # the same queries' time inside the ingress: the rest is the proxy, the network and the client
                "small_ingress_p95_s": round(percentile(server_s, 95), 3),
                "mb": memory_mb(procs),
            }
            print(json.dumps(line), flush=True)
        time.sleep(args.idle_s)
        print(json.dumps({f"mb_after_{args.idle_s:g}s_idle": memory_mb(procs)}))
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
