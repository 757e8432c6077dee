"""Run the locust load test headless: reports, a summary, an exit status; or find the SLO limit.

    python -m loadtest.run --host http://127.0.0.1:8000 --users 8 --spawn-rate 2 --duration 60s
    python -m loadtest.run --host URL --step --slo-ms 500 --mix query=1      # step load

Fixed mode runs ``--users`` clients for ``--duration``. Step mode starts at
``--start-users`` and adds ``--step-users`` every ``--step-time`` seconds until a step's
p95 latency passes ``--slo-ms``, or a step has failures or overload answers; it reports
every step and the one with the highest throughput within the SLO. A step's p95 is over
its own window, not cumulative: the requests answered in it, plus those still in flight
at its end that are already older than the SLO ("late", counted with their age so far).

Both write to ``--out`` (default ``loadtest/results/<time>-<mode>/``): locust's CSVs
(``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``,
``locust_exceptions.csv``), ``report.html``, ``summary.json`` and, in step mode,
``steps.csv``; and print a summary: requests/s and embedded tokens/s (the sum of each
right answer's ``usage.total_tokens``), p50/p95/p99 latency of right answers, failures by
kind. Exit status: 0; 1 when any request failed (anything but a right answer or an
overload answer, 429/503 with Retry-After); 2 when the target cannot be used.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gevent
from locust import events
from locust.env import Environment
from locust.html import get_html_report
from locust.stats import CSV_STATS_INTERVAL_SEC, PERCENTILES_TO_REPORT, StatsCSVFileWriter, stats_history

from loadtest import locustfile
from loadtest.answers import OK, OVERLOAD
from loadtest.settings import add_traffic_arguments, settings_from_args
from loadtest.stats import percentile
from loadtest.target import TargetError, discover

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("loadtest")


# --- what happened -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float  # completion time (epoch seconds)
    ms: float  # response time
    kind: str  # query | docs
    outcome: str  # ok | overload | failure kind
    tokens: int  # usage.total_tokens of a right answer


class Recorder:
    """Every request the users make, from locust's request event."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.examples: dict[str, str] = {}  # failure kind -> one detail message

    def on_request(
        self,
        name: str,
        response_time: float,
        exception: BaseException | None = None,
        context: dict | None = None,
        **_kwargs: Any,
    ) -> None:
        ctx = context or {}
        outcome = ctx.get("outcome") or (OK if exception is None else "error")
        if outcome != OK and outcome not in self.examples:
            self.examples[outcome] = ctx.get("detail") or repr(exception)
        self.samples.append(
            Sample(time.time(), float(response_time), ctx.get("kind", name), outcome, int(ctx.get("tokens") or 0))
        )

    def window(self, t0: float, t1: float) -> list[Sample]:
        return [s for s in self.samples if t0 <= s.t < t1]


def aggregate(samples: list[Sample], seconds: float, late_ms: Sequence[float] = ()) -> dict:
    """Throughput and latency of ``samples`` (completed over ``seconds``).

    ``late_ms``: ages of requests still in flight and already past the SLO; they enter the
    latency percentiles with their age so far (a lower bound), never the throughput.
    """
    ok = [s for s in samples if s.outcome == OK]
    failures = Counter(s.outcome for s in samples if s.outcome not in (OK, OVERLOAD))
    lat = [s.ms for s in ok] + list(late_ms)
    seconds = max(seconds, 1e-9)
    out = {
        "seconds": round(seconds, 2),
        "requests": len(samples),
        "ok": len(ok),
        "overload": sum(s.outcome == OVERLOAD for s in samples),
        "failures": sum(failures.values()),
        "failures_by_kind": dict(failures),
        "requests_per_s": len(ok) / seconds,
        "tokens": sum(s.tokens for s in ok),
        "tokens_per_s": sum(s.tokens for s in ok) / seconds,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else math.nan,
    }
    if late_ms:
        out["late"] = len(late_ms)
    return out


def by_kind(samples: list[Sample], seconds: float) -> dict[str, dict]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.kind].append(s)
    return {kind: aggregate(group, seconds) for kind, group in sorted(groups.items())}


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.0f}")


def _json_safe(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 3)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --- the locust environment ----------------------------------------------------------------------


class LoadTest:
    """locust as a library: one local runner, CSV writer, stats history, our recorder."""

    def __init__(self, host: str, out: Path, stop_timeout: float):
        self.recorder = Recorder()
        events.request.add_listener(self.recorder.on_request)
        self.env = Environment(
            user_classes=[locustfile.EmbeddingsUser], host=host, events=events, stop_timeout=stop_timeout
        )
        self.runner = self.env.create_local_runner()
        self.env.events.init.fire(environment=self.env, runner=self.runner, web_ui=None)
        self.out = out
        self.csv = StatsCSVFileWriter(self.env, PERCENTILES_TO_REPORT, str(out / "locust"), full_history=True)
        self.greenlets = [gevent.spawn(stats_history, self.runner), gevent.spawn(self.csv.stats_writer)]
        self.started = time.time()

    def set_users(self, users: int, spawn_rate: float, timeout_s: float = 120) -> None:
        """Ramp to ``users`` and wait until they all run."""
        self.runner.start(users, spawn_rate)
        deadline = time.time() + timeout_s
        gevent.sleep(0)
        while (self.runner.state != "running" or self.runner.user_count != users) and time.time() < deadline:
            gevent.sleep(0.05)

    def finish(self, graceful: bool) -> None:
        """Stop the users (letting requests in flight finish when ``graceful``) and write the reports."""
        if not graceful:
            self.env.stop_timeout = 0
        self.runner.quit()
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)  # one more round of the CSV writer
        for g in self.greenlets:
            g.kill(block=True)
        self.csv.close_files()
        (self.out / "report.html").write_text(get_html_report(self.env, show_download_link=False), encoding="utf-8")

    def exceptions(self) -> int:
        return sum(row["count"] for row in self.runner.exceptions.values())


def progress(test: LoadTest, t0: float, every_s: float, stop: list) -> None:
    """Print a line every ``every_s`` seconds: users, last window's throughput and p95."""
    last = t0
    while not stop:
        gevent.sleep(every_s)
        now = time.time()
        w = aggregate(test.recorder.window(last, now), now - last)
        total = test.recorder.samples
        print(
            f"  [{now - t0:5.0f}s] users {test.runner.user_count:3d}  req/s {w['requests_per_s']:7.2f}  "
            f"tok/s {w['tokens_per_s']:8.0f}  p95 {_ms(w['p95_ms']):>6} ms  "
            f"total ok {sum(s.outcome == OK for s in total)}  overload {w['overload']}  "
            f"failures {sum(s.outcome not in (OK, OVERLOAD) for s in total)}",
            flush=True,
        )
        last = now


# --- the two modes -------------------------------------------------------------------------------


def run_fixed(test: LoadTest, args) -> dict:
    t0 = time.time()
    stop: list = []
    printer = None if args.quiet else gevent.spawn(progress, test, t0, args.progress_every, stop)
    test.set_users(args.users, args.spawn_rate)
    gevent.sleep(max(0.0, args.duration - (time.time() - t0)))
    stop.append(True)
    if printer:
        printer.kill()
    stopping = time.time()
    test.finish(graceful=True)
    samples = test.recorder.samples
    end = max([stopping] + [s.t for s in samples])
    return {
        "mode": "fixed",
        "users": args.users,
        "spawn_rate": args.spawn_rate,
        "duration_s": args.duration,
        "total": aggregate(samples, end - t0),
        "by_kind": by_kind(samples, end - t0),
    }


def step_passes(step: dict, slo_ms: float) -> bool:
    return step["ok"] > 0 and step["p95_ms"] <= slo_ms and step["failures"] == 0 and step["overload"] == 0


def run_steps(test: LoadTest, args) -> dict:
    t0 = time.time()
    steps: list[dict] = []
    users = args.start_users
    reason = ""
    print(
        f"step load: {args.start_users} user(s) +{args.step_users} every {args.step_time:g}s, "
        f"SLO p95 <= {args.slo_ms:g} ms, at most {args.max_users} users / {args.max_duration:g}s",
        flush=True,
    )
    print(
        f"  {'users':>5} {'req/s':>8} {'tok/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'ok':>6} {'late':>5} "
        f"{'overload':>8} {'failures':>8}",
        flush=True,
    )
    while True:
        test.set_users(users, args.spawn_rate)
        w0 = time.time()
        gevent.sleep(args.step_time)
        w1 = time.time()
        window = test.recorder.window(w0, w1)
        # requests still waiting at the window's end, already past the SLO, count as late answers
        late = [
            age
            for age in ((w1 - started) * 1e3 for started, _ in list(locustfile.IN_FLIGHT.values()))
            if age > args.slo_ms
        ]
        step = {
            "users": users,
            **aggregate(window, w1 - w0, late),
            "late": len(late),
            "by_kind": by_kind(window, w1 - w0),
        }
        if step["ok"] == 0 and not late:
            step["p95_ms"] = math.inf  # nothing answered within the step: far past any SLO
        step["within_slo"] = step_passes(step, args.slo_ms)
        steps.append(step)
        print(
            f"  {users:5d} {step['requests_per_s']:8.2f} {step['tokens_per_s']:8.0f} {_ms(step['p50_ms']):>7} "
            f"{_ms(step['p95_ms']):>7} {step['ok']:6d} {step['late']:5d} {step['overload']:8d} "
            f"{step['failures']:8d}{'' if step['within_slo'] else '  <- past the SLO'}",
            flush=True,
        )
        if not step["within_slo"]:
            reason = (
                f"p95 {_ms(step['p95_ms'])} ms > SLO {args.slo_ms:g} ms"
                if step["p95_ms"] > args.slo_ms
                else f"{step['failures']} failures, {step['overload']} overload answers"
            )
            break
        if users + args.step_users > args.max_users:
            reason = f"--max-users {args.max_users} reached within the SLO"
            break
        if time.time() - t0 + args.step_time > args.max_duration:
            reason = f"--max-duration {args.max_duration:g}s reached within the SLO"
            break
        users += args.step_users
    test.finish(graceful=False)  # the steps are measured; requests still in flight don't count
    passing = [s for s in steps if s["within_slo"]]
    best = max(passing, key=lambda s: s["requests_per_s"]) if passing else None
    samples = test.recorder.samples
    return {
        "mode": "step",
        "slo_p95_ms": args.slo_ms,
        "step_time_s": args.step_time,
        "steps": steps,
        "stopped_because": reason,
        "best": best,
        "total": aggregate(samples, time.time() - t0),
        "by_kind": by_kind(samples, time.time() - t0),
    }


# --- output --------------------------------------------------------------------------------------


def print_summary(summary: dict) -> None:
    t = summary["total"]
    print()
    print(
        f"=== load test: {summary['host']}  model {summary['model']} ({summary['expected_dim']}-d)  "
        f"mix {summary['mix']}  mode {summary['mode']}"
    )
    print(
        f"requests   {t['requests']} answered in {t['seconds']:.0f}s: {t['ok']} ok, {t['overload']} overload, "
        f"{t['failures']} failed"
    )
    print(
        f"throughput {t['requests_per_s']:.2f} req/s, {t['tokens_per_s']:.0f} embedded tokens/s ({t['tokens']} tokens)"
    )
    print(f"latency    p50 {_ms(t['p50_ms'])} ms, p95 {_ms(t['p95_ms'])} ms, p99 {_ms(t['p99_ms'])} ms (right answers)")
    for kind, k in summary["by_kind"].items():
        print(
            f"  {kind:<6} {k['ok']:6d} ok  {k['requests_per_s']:7.2f} req/s  {k['tokens_per_s']:8.0f} tok/s  "
            f"p50 {_ms(k['p50_ms'])} / p95 {_ms(k['p95_ms'])} / p99 {_ms(k['p99_ms'])} ms"
        )
    failures = dict(t["failures_by_kind"])
    if summary["locust_exceptions"]:
        failures["locust_exception"] = summary["locust_exceptions"]
    if failures:
        print("failures by kind:")
        for kind, n in sorted(failures.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:<18} {n:6d}  e.g. {summary['failure_examples'].get(kind, 'see locust_exceptions.csv')}")
    else:
        print("failures   none")
    if t["overload"]:
        print(f"overload   {t['overload']} answers 429/503 with Retry-After (not failures)")
    if summary["mode"] == "step":
        best = summary["best"]
        print(f"step load  stopped: {summary['stopped_because']}")
        if best:
            print(
                f"BEST UNDER SLO (p95 <= {summary['slo_p95_ms']:g} ms): {best['users']} users, "
                f"{best['requests_per_s']:.2f} req/s, {best['tokens_per_s']:.0f} tokens/s, "
                f"p50 {_ms(best['p50_ms'])} ms, p95 {_ms(best['p95_ms'])} ms"
            )
        else:
            print(
                f"NO STEP MET THE SLO (p95 <= {summary['slo_p95_ms']:g} ms), not even "
                f"{summary['steps'][0]['users']} user(s)"
            )
    print(
        f"reports    {summary['out']}/ (locust_*.csv, report.html, summary.json"
        f"{', steps.csv' if summary['mode'] == 'step' else ''})"
    )
    print(f"exit       {summary['exit_status']}")


def write_steps_csv(path: Path, steps: list[dict]) -> None:
    cols = [
        "users",
        "requests_per_s",
        "tokens_per_s",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "ok",
        "late",
        "overload",
        "failures",
        "within_slo",
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for s in steps:
            w.writerow([_json_safe(s[c]) if isinstance(s[c], float) else s[c] for c in cols])


# --- command line --------------------------------------------------------------------------------


def seconds(text: str) -> float:
    """``90``, ``90s``, ``2m``, ``1h`` -> seconds."""
    text = str(text).strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    return float(text[:-1]) * unit if unit else float(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--host",
        default=os.environ.get("LOADTEST_HOST", "http://127.0.0.1:8000"),
        help="base URL of the service (without /v1) [LOADTEST_HOST]",
    )
    p.add_argument("-u", "--users", type=int, default=4, help="concurrent clients (fixed mode)")
    p.add_argument("-r", "--spawn-rate", type=float, default=4.0, help="users started per second")
    p.add_argument("-t", "--duration", type=seconds, default=60.0, help="run time (fixed mode): 90, 90s, 2m")
    p.add_argument("--out", type=Path, default=None, help="report folder [default: loadtest/results/TIME-MODE]")
    p.add_argument(
        "--stop-timeout",
        type=seconds,
        default=30.0,
        help="fixed mode: how long requests in flight at the end may take to finish",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--progress-every", type=seconds, default=5.0, help="seconds between progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="locust's own INFO logs")
    s = p.add_argument_group("step load")
    s.add_argument("--step", action="store_true", help="raise users until p95 passes --slo-ms")
    s.add_argument(
        "--slo-ms",
        type=float,
        default=float(os.environ.get("LOADTEST_SLO_MS", 500)),
        help="p95 latency SLO [LOADTEST_SLO_MS]",
    )
    s.add_argument("--start-users", type=int, default=1)
    s.add_argument("--step-users", type=int, default=1, help="users added per step")
    s.add_argument("--step-time", type=seconds, default=30.0, help="seconds per step (its measuring window)")
    s.add_argument("--max-users", type=int, default=256)
    s.add_argument("--max-duration", type=seconds, default=900.0, help="bound on the whole step run")
    add_traffic_arguments(p)
    args = p.parse_args(argv)
    for name in ("users", "start_users", "step_users", "max_users"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.spawn_rate <= 0 or args.duration <= 0 or args.step_time <= 0:
        p.error("--spawn-rate, --duration and --step-time must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        settings = discover(args.host, settings)
    except TargetError as exc:
        print(f"error: cannot use {args.host}: {exc}", file=sys.stderr)
        return 2
    locustfile.configure(settings)
    mode = "step" if args.step else "fixed"
    out = args.out or RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{mode}"
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"load test of {args.host}: model {settings.model} ({settings.expected_dim}-d), mix {settings.describe_mix()}"
        + ("" if args.step else f", {args.users} users for {args.duration:g}s"),
        flush=True,
    )

    test = LoadTest(args.host, out, stop_timeout=args.stop_timeout)
    result = run_steps(test, args) if args.step else run_fixed(test, args)

    exceptions = test.exceptions()
    failed = result["total"]["failures"] + exceptions
    summary = {
        "host": args.host,
        "model": settings.model,
        "expected_dim": settings.expected_dim,
        "mix": settings.describe_mix(),
        "settings": {k: v for k, v in asdict(settings).items() if k != "api_key"},
        **result,
        "locust_exceptions": exceptions,
        "failure_examples": test.recorder.examples,
        "exit_status": 1 if failed else 0,
        "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, ensure_ascii=False))
    if args.step:
        write_steps_csv(out / "steps.csv", result["steps"])
    print_summary(summary)
    return summary["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
