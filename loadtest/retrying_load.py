"""Closed-loop load from a client that retries like the openai client: 5xx and connection errors, twice, with back-off.

Every attempt is kept (the raw view: what a client that never retries would see) and every
request's outcome after its retries (what an application sees). ``window(t0, t1)`` sums both for
a stretch of time: a fault, a redeploy, a drain. Used by the tests of head failure, redeploy and
drain (tests/test_head_failure.py) and by ``python -m loadtest.chaos``.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import httpx

#: Seconds to wait before the first and the second retry (a Retry-After header may ask for more).
BACKOFF_S = (0.5, 1.0)


@dataclass
class Attempt:
    start: float
    end: float
    status: int  # -1: no HTTP answer (connection refused or reset, timeout)


@dataclass
class Request:
    start: float
    end: float
    status: int  # of the last attempt
    attempts: int
    body_index: int
    answer: dict | None = None  # the 200 answer's JSON, when kept


@dataclass
class Window:
    """What the load saw between two instants."""

    seconds: float
    requests: int  # finished in the window, after retries
    failed: int  # not answered 200 even after the retries
    attempts: int  # raw HTTP attempts answered (or failed) in the window
    raw_errors: int  # attempts not answered 200 (5xx, 4xx, no answer)
    raw_5xx: int
    retries: int
    longest_stall_s: float  # longest time in the window in which no request finished with 200
    statuses: dict = field(default_factory=dict)

    @property
    def raw_error_rate(self) -> float:
        return self.raw_errors / self.attempts if self.attempts else 0.0

    def line(self) -> str:
        return (
            f"{self.requests} requests, {self.failed} failed after retries; {self.attempts} attempts, "
            f"{self.raw_errors} raw errors ({self.raw_error_rate:.1%}; 5xx {self.raw_5xx}), {self.retries} retries, "
            f"longest stall {self.longest_stall_s:.1f} s"
        )


class RetryingLoad:
    """``threads`` clients posting ``bodies`` (in turn) to ``urls`` (one per client, in turn) back to back."""

    def __init__(
        self,
        urls: list[str],
        bodies: list[dict],
        threads: int,
        retries: int = 2,
        timeout_s: float = 60,
        keep_answers: bool = False,
    ):
        self.urls, self.bodies, self.n = urls, bodies, threads
        self.retries, self.timeout_s, self.keep_answers = retries, timeout_s, keep_answers
        self.attempts: list[Attempt] = []
        self.requests: list[Request] = []
        self.failures: list[str] = []  # what the requests that failed after retries last got
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _post(self, client: httpx.Client, url: str, body: dict) -> tuple[int, httpx.Response | None, str]:
        try:
            resp = client.post(url, json=body)
            return resp.status_code, resp, resp.text[:300] if resp.status_code != 200 else ""
        except httpx.HTTPError as exc:
            return -1, None, repr(exc)

    def _run(self, i: int) -> None:
        url = self.urls[i % len(self.urls)] + "/v1/embeddings"
        order = itertools.cycle(range(len(self.bodies)))
        for _ in range(i):
            next(order)
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                k = next(order)
                t0 = time.monotonic()
                for attempt in range(self.retries + 1):
                    a0 = time.monotonic()
                    status, resp, why = self._post(client, url, self.bodies[k])
                    with self._lock:
                        self.attempts.append(Attempt(a0, time.monotonic(), status))
                    retryable = status == -1 or status >= 500
                    if not retryable or attempt == self.retries:
                        break
                    wait = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                    if resp is not None and resp.headers.get("retry-after", "").isdigit():
                        wait = max(wait, float(resp.headers["retry-after"]))
                    time.sleep(wait)
                answer = resp.json() if self.keep_answers and status == 200 and resp is not None else None
                with self._lock:
                    self.requests.append(Request(t0, time.monotonic(), status, attempt + 1, k, answer))
                    if status != 200:
                        self.failures.append(f"{status}: {why}")

    def __enter__(self) -> RetryingLoad:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.n)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s * (self.retries + 1) + 10)

    def window(self, t0: float, t1: float) -> Window:
        with self._lock:
            attempts = [a for a in self.attempts if t0 <= a.end < t1]
            requests = [r for r in self.requests if t0 <= r.end < t1]
            ok_ends = sorted(r.end for r in self.requests if r.status == 200 and t0 <= r.end < t1)
        statuses: dict[int, int] = {}
        for a in attempts:
            statuses[a.status] = statuses.get(a.status, 0) + 1
        marks = [t0, *ok_ends, min(t1, time.monotonic())]
        return Window(
            seconds=t1 - t0,
            requests=len(requests),
            failed=sum(r.status != 200 for r in requests),
            attempts=len(attempts),
            raw_errors=sum(a.status != 200 for a in attempts),
            raw_5xx=sum(a.status >= 500 for a in attempts),
            retries=sum(r.attempts - 1 for r in requests),
            longest_stall_s=max(b - a for a, b in itertools.pairwise(marks)),
            statuses=statuses,
        )
