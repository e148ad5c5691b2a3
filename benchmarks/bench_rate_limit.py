"""Fleet-wide rate limit: does a limit of R requests/minute hold, and is it used, across W
worker processes?

Starts the local stack with ``REWARDQ_JUDGE_RPM=R`` (``Settings.judge_rpm``) and W
worker processes, and scores one cold step of N distinct items, once per per-process
concurrency asked for (``--per-process 64 4``: a fresh stack for each). The judge's own
``/stats`` is the referee. Figures, all from the same run:

- **utilization** = achieved / allowed, where achieved is N judge requests over the wall
  time of ``submit()`` → ``result()`` (what a trainer sees, fill and drain included)
  and allowed is R/60. Goal: at least ``--min-utilization`` (0.97).
- **steady utilization**: the judge's request counter, sampled every 50 ms, between 10%
  and 90% of the requests: the limiter's own pace without the step's fill and drain.
  The same samples give **fill** (submit to the first judge request) and **drain** (the
  last judge request to results in hand), each to about 50 ms: the part of the wall time
  that no limiter can use.
- **slots lost by phase**: the limit's slots over each phase's time minus the requests
  made in it, for fill, ramp (to 10% of the requests), steady (10-90%), tail (90% to
  the last request) and drain; they add up to ``(1 - utilization) * limit * wall``.
  With each the judge's mean ``in_flight``: a tail that runs with fewer calls in flight
  is processes that ran out of items at the step's end, not the limiter.
- **peak**: ``max_requests_in_any_1s`` at the judge, against the limit plus the judge's
  margin, ``RateLimit.peak_requests()`` (52 at 3,000 RPM: 20 ms of burst, 30 ms of
  lateness), the default goal ``--max-per-s``. The judge server itself enforces no limit
  here (``rpm_limit=0``): only the fleet's limiter holds the rate, so a fleet that
  ignores the setting shows up as a throughput far above the limit.

Usage::

    .venv/bin/python benchmarks/bench_rate_limit.py [--rpm 3000] [--workers 4]
        [--items 1500] [--latency-ms 100] [--per-process 64 4] [--cpu-hogs 0]
        [--judge-nice -10] [--capacity] [--chunk-size 64] [--worker-concurrency 64]
        [--json FILE]

``--capacity`` runs each step a second time without a limit (a fresh stack): what the
fleet itself can do at that concurrency on this host. Its rate between 10% and 60% of
the requests, while every process still has items, is the **concurrency bound** C/L
(C = workers x per-process calls, L the round trip per call: judge latency plus the
fleet's own per-call time, printed). At a low per-process concurrency on a busy host
that can be near or under the limit, and no limiter can use more than it; the bench then
also reports utilization of min(limit, C/L), over the wall and steady, and judges the
utilization goal on it.

The producer makes chunks of ``--chunk-size`` items, or fewer where that would be more
than 8 rounds of a worker's calls (``rewardq.broker.fleet.chunk_size_for``: 8 items at 1 call per
process). Each worker takes chunks only while it holds fewer than two rounds of its calls
(``rewardq.workers.intake``), and at most ``--worker-concurrency`` at once,
so the step's chunks are dealt out as it runs; before that gate, each worker took what
its pool could hold at the step's start, and with few calls per process the ones that got
more items ran on alone, at their own C/L, in the tail.

``--cpu-hogs K`` keeps K busy-looping processes running through each measured step: a
worker host that other work keeps busy, reproducibly (the limiter's waiters then wake
late). ``--judge-nice N`` (default -10, where allowed) runs the local judge, the referee,
at a higher CPU priority than the fleet, as a remote judge would be unaffected by the
worker host's load: a starved judge stamps a backlog of arrivals at once and so reports
bursts that nobody sent.

Exit status: 0 when every goal is met at every concurrency, 1 when one is missed, 2 when
the fleet does not limit at all (the setting is not wired into the workers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewardq.bench import Bench, Run, make_items  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402  (needs ROOT on the path)
from rewardq.stack import JudgeProcess, LocalStack  # noqa: E402
from rewardq.workers.rate_limit import RateLimit  # noqa: E402

_UNLIMITED_FACTOR = 1.5
_SAMPLE_S = 0.05


class _CounterSampler:
    """Samples the judge's ``requests_total`` and tokens in a thread: (perf_counter,
    count) pairs in ``samples`` and ``token_samples``."""

    def __init__(self, judge: JudgeProcess) -> None:
        self._judge = judge
        self.samples: list[tuple[float, int]] = []
        self.token_samples: list[tuple[float, int]] = []
        self.in_flight_samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _CounterSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        # A client of its own: httpx clients are not shared across threads here.
        import httpx
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(_SAMPLE_S):
                try:
                    stats = http.get(f"{self._judge.root}/stats").json()
                    count = int(stats["requests_total"])
                    tokens = _tokens(stats)
                    in_flight = int(stats["in_flight"])
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                now = time.perf_counter()
                self.samples.append((now, count))
                self.token_samples.append((now, tokens))
                self.in_flight_samples.append((now, in_flight))


def _tokens(stats: dict[str, Any]) -> int:
    """Tokens the judge has billed (prompt + completion of delivered answers)."""
    return int(stats["prompt_tokens_total"]) + int(stats["completion_tokens_total"])


def _spin(stop: Any) -> None:
    """Burn CPU until ``stop`` is set (a cpu hog)."""
    while not stop.is_set():
        for _ in range(100_000):
            pass


class _CpuHogs:
    """K processes that keep the CPUs busy while the block runs."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._procs = [ctx.Process(target=_spin, args=(self._stop,), daemon=True)
                       for _ in range(count)]

    def __enter__(self) -> _CpuHogs:
        for proc in self._procs:
            proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def crossing_time(samples: list[tuple[float, int]], count: float) -> float | None:
    """When the sampled counter reached ``count`` (linear between samples), or None."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:], strict=False):
        if c0 < count <= c1:
            return t0 + (t1 - t0) * (count - c0) / (c1 - c0)
    return None


def steady_rate(samples: list[tuple[float, int]], total: int, lo_share: float = 0.1,
                hi_share: float = 0.9) -> float | None:
    """Requests per second between 10% (``lo_share``) and 90% (``hi_share``) of
    ``total``."""
    lo, hi = lo_share * total, hi_share * total
    t_lo, t_hi = crossing_time(samples, lo), crossing_time(samples, hi)
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return None
    return (hi - lo) / (t_hi - t_lo)


PHASES = ("fill", "ramp", "steady", "tail", "drain")


def phases(samples: list[tuple[float, int]], in_flight: list[tuple[float, int]],
           total: int, start: float, end: float, limit_per_s: float
           ) -> dict[str, dict[str, float]] | None:
    """Where the step's wall time went short of the limit, phase by phase.

    fill: submit to the first judge request; ramp: to 10% of the requests; steady: to
    90%; tail: to the last request; drain: to the results in hand. Per phase: seconds,
    requests, ``lost`` = slots the limit allowed there minus requests made (they add
    up to ``limit * wall - total``), and the judge's mean ``in_flight`` (calls at the
    judge: the fleet's concurrency in use, times judge latency over round trip).
    """
    marks = [crossing_time(samples, c) for c in (1, 0.1 * total, 0.9 * total, total)]
    if any(m is None for m in marks):
        return None
    edges = [start, *(m for m in marks if m is not None), end]
    counts = [0, 1, 0.1 * total, 0.9 * total, total, total]
    out = {}
    for name, t0, t1, c0, c1 in zip(PHASES, edges, edges[1:], counts, counts[1:],
                                    strict=False):
        flights = [f for t, f in in_flight if t0 <= t < t1]
        out[name] = {"s": round(t1 - t0, 3), "requests": round(c1 - c0, 1),
                     "lost": round(limit_per_s * (t1 - t0) - (c1 - c0), 1),
                     "in_flight": round(sum(flights) / len(flights), 2) if flights else 0.0}
    return out


def _renice(pid: int, nice: int) -> int:
    """Set ``pid``'s nice value where allowed; returns the value it runs at."""
    # Nice is per thread on Linux: set it on every thread of the process.
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")] if os.path.isdir(
        f"/proc/{pid}/task") else [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    return os.getpriority(os.PRIO_PROCESS, pid)


@dataclass
class _Step:
    run: Run
    samples: list[tuple[float, int]]
    token_samples: list[tuple[float, int]]
    in_flight_samples: list[tuple[float, int]]
    start: float
    end: float
    stats: dict[str, Any]
    judge_nice: int


def _cold_step(rpm: int | None, tpm: int | None, workers: int, items: int,
               latency_ms: float, per_process: int, cpu_hogs: int,
               judge_nice: int, overrides: dict[str, Any]) -> _Step:
    """One cold step of ``items`` on a fresh stack (``None``: no such limit), with other
    ``Settings`` fields from ``overrides``."""
    settings = Settings(judge_rpm=rpm, judge_tpm=tpm, max_concurrent_requests=per_process,
                        **overrides).model_copy(
        update={"redis_url": None,
                "judge_base_url": Settings.model_fields["judge_base_url"].default})
    with LocalStack(settings, workers=workers, judge_latency_ms=latency_ms) as stack:
        bench = Bench(stack)
        try:
            # Build every worker's runtime, then let the limiter's state expire (its TAT
            # key lives only as long as it is ahead of now).
            bench.rewardq_step(make_items(2 * workers, f"wu-{uuid.uuid4().hex[:8]}"))
            time.sleep(2.0)
            assert stack.judge is not None
            judge_nice = _renice(stack.judge.process.pid, judge_nice)
            step = make_items(items, uuid.uuid4().hex[:12])
            marks: dict[str, float] = {}

            def timed() -> Run:
                marks["start"] = time.perf_counter()
                result = bench.rewardq_step(step)
                marks["end"] = time.perf_counter()
                return result

            with _CpuHogs(cpu_hogs), _CounterSampler(stack.judge) as sampler:
                run = bench.measured(timed)
            stats = stack.judge.stats()
        finally:
            bench.close()
    # The judge's counters were reset just before the step started: count from there.
    start = marks["start"]
    samples = [(start, 0)] + [(t, c) for t, c in sampler.samples if t > start]
    token_samples = [(start, 0)] + [(t, c) for t, c in sampler.token_samples if t > start]
    in_flight = [(t, c) for t, c in sampler.in_flight_samples if t > start]
    return _Step(run, samples, token_samples, in_flight, start, marks["end"], stats,
                 judge_nice)


def measure(rpm: int | None, workers: int, items: int, latency_ms: float,
            per_process: int, cpu_hogs: int = 0, judge_nice: int = 0,
            capacity: bool = False, tpm: int | None = None,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One cold step of ``items`` under fleet-wide ``rpm``/``tpm`` limits; the judge's view.

    ``utilization`` is that of the binding limit (the larger of the two).

    With ``capacity``, the same step again without a limit, on a fresh stack: what the
    fleet can do at this concurrency on this host, the most any limiter could use.
    ``overrides``: other ``Settings`` fields (``chunk_size``, ``worker_concurrency``).
    """
    overrides = overrides or {}
    limited = _cold_step(rpm, tpm, workers, items, latency_ms, per_process, cpu_hogs,
                         judge_nice, overrides)
    free = _cold_step(None, None, workers, items, latency_ms, per_process, cpu_hogs,
                      judge_nice, overrides) if capacity else None
    run, stats = limited.run, limited.stats
    limit_per_s = rpm / 60 if rpm else None
    throughput = run.judge_requests / run.wall_s
    steady = steady_rate(limited.samples, run.judge_requests)
    tokens = _tokens(stats)
    token_limit_per_s = tpm / 60 if tpm else None
    tokens_per_s = tokens / run.wall_s
    steady_tokens = steady_rate(limited.token_samples, tokens)
    used = {name: (rate / limit, None if steady_rate_ is None else steady_rate_ / limit)
            for name, rate, steady_rate_, limit in (
                ("requests", throughput, steady, limit_per_s),
                ("tokens", tokens_per_s, steady_tokens, token_limit_per_s))
            if limit is not None}
    binding = max(used, key=lambda name: used[name][0])
    first = crossing_time(limited.samples, 1)
    last = crossing_time(limited.samples, run.judge_requests)
    fill_s = None if first is None else max(0.0, first - limited.start)
    drain_s = None if last is None else max(0.0, limited.end - last)
    capacity_per_s = None if free is None else free.run.judge_requests / free.run.wall_s
    # The fleet's own ceiling while every call slot is busy: C calls / L per call.
    # 10-60%: before any process has run out of items (the tail runs on fewer).
    bound_per_s = None if free is None else steady_rate(free.samples,
                                                        free.run.judge_requests, 0.1, 0.6)
    calls = workers * per_process
    reachable = None if bound_per_s is None or limit_per_s is None else min(
        limit_per_s, bound_per_s)

    def r4(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "rpm": rpm, "tpm": tpm, "workers": workers, "items": items, "latency_ms": latency_ms,
        "per_process_concurrency": per_process, "cpu_hogs": cpu_hogs,
        "settings_overrides": overrides,
        "judge_nice": limited.judge_nice,
        "wall_s": round(run.wall_s, 3),
        "judge_requests": run.judge_requests,
        "requests_per_s": round(throughput, 2),
        "limit_per_s": r4(limit_per_s),
        "tokens": tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "token_limit_per_s": r4(token_limit_per_s),
        "binding_limit": binding,
        "request_utilization": r4(used["requests"][0]) if "requests" in used else None,
        "token_utilization": r4(used["tokens"][0]) if "tokens" in used else None,
        "utilization": r4(used[binding][0]),
        "steady_requests_per_s": None if steady is None else round(steady, 2),
        "steady_utilization": r4(used[binding][1]),
        "fill_s": None if fill_s is None else round(fill_s, 3),
        "drain_s": None if drain_s is None else round(drain_s, 3),
        "capacity_requests_per_s": None if capacity_per_s is None else round(
            capacity_per_s, 2),
        "concurrency_calls": calls,
        "concurrency_bound_per_s": None if bound_per_s is None else round(bound_per_s, 2),
        "round_trip_ms": None if bound_per_s is None else round(1000 * calls / bound_per_s, 1),
        "utilization_of_reachable": None if reachable is None
        else round(throughput / reachable, 4),
        "steady_utilization_of_reachable": None if reachable is None or steady is None
        else round(steady / reachable, 4),
        "phases": None if limit_per_s is None else phases(
            limited.samples, limited.in_flight_samples, run.judge_requests, limited.start,
            limited.end, limit_per_s),
        "max_requests_in_any_1s": int(stats["max_requests_in_any_1s"]),
        "limiter_bound_per_1s": RateLimit(rpm=rpm, tpm=tpm).peak_requests(),
        "max_in_flight": run.max_in_flight,
        "responses_by_status": stats["responses_by_status"],
        "failed": run.failed,
    }


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the figures against the goals, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rpm", type=int, default=3000,
                        help="fleet-wide requests/minute (0: no request limit)")
    parser.add_argument("--tpm", type=int, default=0,
                        help="fleet-wide tokens/minute (0, the default: no token limit)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--items", type=int, default=1500,
                        help="items (1500 at 3,000 RPM is about 30 s)")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--per-process", type=int, nargs="+", default=[64, 4],
                        help="judge calls in flight per worker process; one run for each")
    parser.add_argument("--cpu-hogs", type=int, default=0,
                        help="busy-looping processes kept running during each step")
    parser.add_argument("--judge-nice", type=int, default=-10,
                        help="nice value of the local judge (the referee), where allowed")
    parser.add_argument("--capacity", action="store_true",
                        help="also run each step without a limit: the fleet's own ceiling")
    parser.add_argument("--min-utilization", type=float, default=0.97,
                        help="goal: achieved / allowed over the step's wall time")
    parser.add_argument("--max-per-s", type=int,
                        help="goal: most judge requests in any 1 s window (default: the "
                             "limit plus the judge's margin, RateLimit.peak_requests())")
    parser.add_argument("--chunk-size", type=int,
                        help="items per Celery task (default: Settings.chunk_size, 64)")
    parser.add_argument("--worker-concurrency", type=int,
                        help="gevent pool size, so chunks each worker takes ahead "
                             "(default: Settings.worker_concurrency, 64)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in (
        ("chunk_size", args.chunk_size), ("worker_concurrency", args.worker_concurrency))
        if value is not None}
    results, status = [], 0
    for per_process in args.per_process:
        limits = ", ".join(f"{n:,} {unit} ({n / 60:,.1f}/s)" for n, unit in
                           ((args.rpm, "RPM"), (args.tpm, "TPM")) if n)
        print(f"{args.items} items, {args.workers} workers x {per_process} concurrent, "
              f"judge {args.latency_ms:g} ms, fleet limit {limits}, "
              f"{args.cpu_hogs} cpu hogs ...", flush=True)
        result = measure(args.rpm or None, args.workers, args.items, args.latency_ms,
                         per_process, args.cpu_hogs, args.judge_nice, args.capacity,
                         args.tpm or None, overrides)
        bound = result["limiter_bound_per_1s"]
        max_per_s = args.max_per_s if args.max_per_s is not None else bound
        peak_ok = not args.rpm or result["max_requests_in_any_1s"] <= max_per_s
        # With --capacity measured, the goal is the reachable rate: at few calls per
        # process C/L can be below the limit, and no limiter can use more than it.
        reachable = result["utilization_of_reachable"]
        use_ok = (result["utilization"] if reachable is None else reachable) \
            >= args.min_utilization
        verdict = f"{'ok' if use_ok else 'MISSED'}: goal >= {args.min_utilization:g}"
        limited = result["utilization"] <= _UNLIMITED_FACTOR
        result.update(peak_ok=peak_ok, utilization_ok=use_ok, limiter_enforced=limited)
        steady = result["steady_utilization"]
        allowed = [f"{result['requests_per_s']:.1f} requests/s"
                   + (f" of {result['limit_per_s']:.1f}" if args.rpm else ""),
                   f"{result['tokens_per_s']:,.0f} tokens/s"
                   + (f" of {result['token_limit_per_s']:,.0f}" if args.tpm else "")]
        print(f"  wall {result['wall_s']:.2f} s, {result['judge_requests']} judge requests, "
              f"{'; '.join(allowed)}: utilization ({result['binding_limit']}) "
              f"{result['utilization']:.4f} "
              f"({verdict if reachable is None else 'goal: of min(limit, C/L), below'}); "
              f"steady (10-90%) {'n/a' if steady is None else f'{steady:.3f}'}; "
              f"fill {_s(result['fill_s'])}, drain {_s(result['drain_s'])}", flush=True)
        print(f"  peak requests in any 1 s at the judge: {result['max_requests_in_any_1s']} "
              f"({'no request limit' if bound is None else f'limit + burst {bound}'}; "
              f"{'ok' if peak_ok else 'MISSED'}: goal <= {max_per_s}); "
              f"judge nice {result['judge_nice']}; max in flight {result['max_in_flight']}; "
              f"statuses {result['responses_by_status']}", flush=True)
        if result["phases"] is not None:
            print("  slots lost (limit x time - requests) by phase: " + ", ".join(
                f"{name} {p['lost']:.1f} in {p['s']:.2f} s (in flight {p['in_flight']:.1f})"
                for name, p in result["phases"].items()), flush=True)
        if result["concurrency_bound_per_s"] is not None:
            print(f"  concurrency bound C/L: {result['concurrency_calls']} calls / "
                  f"{result['round_trip_ms']:.0f} ms per call (judge {args.latency_ms:g} ms) "
                  f"= {result['concurrency_bound_per_s']:.1f}/s (unlimited run, 10-60%); "
                  f"utilization of min(limit, C/L) {reachable:.4f} ({verdict}), "
                  f"steady {result['steady_utilization_of_reachable'] or 0:.4f}; unlimited "
                  f"step {result['capacity_requests_per_s']:.1f}/s over its wall", flush=True)
        if not limited:
            print("  the fleet did not limit its rate at all: is REWARDQ_JUDGE_RPM wired "
                  "into the workers' judge calls (workers/rate_limit.py)?", flush=True)
            status = 2
        elif not (peak_ok and use_ok and not result["failed"]):
            status = max(status, 1)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
