"""The fleet-wide rate limiter alone, A/B in the same run: which limiter uses the limit?

``bench_rate_limit.py`` measures the whole stack (producer, Celery, judge), where the
step's fill and drain and the host's load from run to run move the figures by more than
the limiter does. This bench runs only the limiter, and runs every design *at the same
time* on the same host, each as its own fleet of W processes with its own limit (its own
Redis keys): whatever the host's load does, it does to all of them alike.

Each process is one asyncio loop with C callers: ``acquire``, note the send time,
"call the judge" (sleep ``--latency-ms``), then spend ``--cpu-ms`` of CPU on the loop
(the reply's processing), and again. A worker's loop is busier than that: a chunk's
arrival, the Celery thread holding the GIL. ``--stall-every-s S --stall-ms D`` blocks
each process's loop now and then (exponential gaps of mean S, stalls of mean D ms,
without using CPU, so the emulation does not load the host itself), and
``--gil-duty F`` runs a second thread per process that holds the GIL a fraction F of
the time (in 10 ms bursts), as a worker's gevent thread does. The figures per design:

- **utilization**: sends in the steady window (after ``--warm-s``, before the last
  second) over what the limit allows there;
- **peak**: most sends in any 1 s (wall clock, all processes on one host: what a judge
  counts), against the default limit's ``RateLimit.peak_requests()``, the rate plus the
  judge's margin (52 at 3,000 RPM);
- **late**: how long after its slot each send went (percentiles, and the share later
  than 10/20/30/50 ms): what widens the peak beyond the booked slots;
- **calls/request**: limiter script calls per send (above 1: slots booked again).

Designs (``--designs``):

- ``poll``: the limiter before issue 14, kept here as the reference: one head waiter per
  process asks Redis whether it may go now; refused, it sleeps the wait Redis names (plus
  up to 2 ms of jitter) and asks again (ask–sleep–ask);
- ``before``: the booking limiter as it was before its lateness allowance became part
  of the judge's margin: 50 ms of burst, a caller 250 ms late books again, lateness
  counted from the booking's reply;
- ``book``: ``rewardq.workers.rate_limit.RedisRateLimiter`` as configured by default;
- ``book:horizon_s=X,max_late_s=Y`` (or ``before:...``): with other ``RateLimit``
  settings.

Usage::

    .venv/bin/python benchmarks/bench_rate_limit_ab.py [--designs before book]
        [--rpm 3000] [--workers 4] [--per-process 16] [--latency-ms 100] [--cpu-ms 2]
        [--seconds 20] [--cpu-hogs 0] [--stall-every-s 0] [--stall-ms 100]
        [--gil-duty 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio  # noqa: E402

from rewardq.broker.embedded import EmbeddedRedis  # noqa: E402  (needs ROOT on the path)
from rewardq.judge_server.stats import max_in_window  # noqa: E402
from rewardq.workers.rate_limit import (  # noqa: E402
    Admission,
    RateLimit,
    RedisRateLimiter,
    Reservation,
)

POLL_JITTER_S = 0.002
"""The reference design's jitter bound (the pre-issue-14 ``MAX_JITTER_S``)."""


class CountingLimiter(RedisRateLimiter):
    """The shipped limiter, counting its script calls."""

    calls = 0

    async def reserve(self, tokens: int, max_wait_s: float | None = None) -> Reservation:
        self.calls += 1
        return await super().reserve(tokens, max_wait_s)


class PollingLimiter(CountingLimiter):
    """The reference: ask–sleep–ask with one head waiter per process (before issue 14)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turn = asyncio.Lock()
        self._rng = random.Random()

    async def admit(self, tokens: int) -> Admission:
        loop = asyncio.get_running_loop()
        started, bookings = loop.time(), 0
        async with self._turn:
            while not (answer := await self.reserve(tokens, max_wait_s=0.0)).booked:
                bookings += 1
                jitter = self._rng.uniform(0.0, min(POLL_JITTER_S, answer.wait_s * 0.05))
                await asyncio.sleep(answer.wait_s + jitter)
        return Admission(loop.time() - started, answer.slot_us, 0.0, bookings + 1)


class BookedBeforeLimiter(CountingLimiter):
    """The booking limiter before its lateness allowance was part of the judge's margin
    (commit de34164): 50 ms of burst, a caller 250 ms late books again, lateness counted
    from the booking's reply."""

    async def admit(self, tokens: int) -> Admission:
        loop = asyncio.get_running_loop()
        started, bookings = loop.time(), 0
        while True:
            async with self._booking:
                ahead_s = self._last_slot - loop.time() - self.limit.horizon_s
                if ahead_s > 0:
                    await asyncio.sleep(ahead_s)
                answer = await self.reserve(tokens)
                bookings += 1
                slot = loop.time() + answer.wait_s
                self._last_slot = max(self._last_slot, slot)
            if answer.wait_s > 0:
                await asyncio.sleep(answer.wait_s)
            late_s = loop.time() - slot
            if late_s <= self.limit.max_late_s:
                return Admission(loop.time() - started, answer.slot_us, late_s, bookings)


DESIGNS = {"poll": PollingLimiter, "book": CountingLimiter, "before": BookedBeforeLimiter}
BEFORE = {"burst_s": 0.05, "max_late_s": 0.25}
"""``before``'s settings, where its spec names none."""


def parse_design(text: str) -> tuple[str, dict[str, float]]:
    """``"book:horizon_s=0.25,max_late_s=1"`` -> ("book", {...})."""
    name, _, rest = text.partition(":")
    if name not in DESIGNS:
        raise argparse.ArgumentTypeError(f"unknown design {name!r} ({', '.join(DESIGNS)})")
    settings = dict(BEFORE) if name == "before" else {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        settings[key] = float(value)
    return name, settings


def _burn(cpu_s: float) -> None:
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def _gil_hog(duty: float, stop: threading.Event) -> None:
    """Hold the GIL ``duty`` of the time, in 10 ms bursts of pure-Python work."""
    while not stop.is_set():
        _burn(0.01)
        time.sleep(0.01 * (1 - duty) / duty)


def _fleet_process(url: str, design: str, index: int, rpm: int, callers: int,
                   latency_s: float, cpu_s: float, start_at: float, seconds: float,
                   stalls: tuple[float, float, float], barrier: Barrier,
                   out: Queue[tuple[str, list[float], list[float], int]]) -> None:
    """One worker process of one design's fleet; puts (design, send times, each send's
    lateness after its slot, calls)."""
    stall_every_s, stall_s, gil_duty = stalls
    rng = random.Random(f"{design}/{index}")
    name, settings = parse_design(design)
    limit = replace(RateLimit(rpm=rpm), **settings)  # type: ignore[arg-type]
    sends: list[float] = []
    lates: list[float] = []

    async def main() -> int:
        client = redis.asyncio.Redis.from_url(url)
        await client.ping()
        limiter = DESIGNS[name](client, f"ab-{design}", limit)
        end = start_at + seconds

        async def caller() -> None:
            while time.time() < end:
                admission = await limiter.admit(1)
                sent = time.time()  # the clock of Redis's TIME: the same host's
                sends.append(sent)
                lates.append(sent - admission.slot_us / 1e6)
                await asyncio.sleep(latency_s)
                _burn(cpu_s)

        async def staller() -> None:
            while time.time() < end:
                await asyncio.sleep(rng.expovariate(1 / stall_every_s))
                # The loop is blocked but burns no CPU (so the emulation does not
                # itself load the host): descheduled, or waiting for the GIL.
                time.sleep(rng.expovariate(1 / stall_s))

        await asyncio.sleep(max(0.0, start_at - time.time()))
        tasks = [caller() for _ in range(callers)]
        if stall_every_s > 0:
            tasks.append(staller())
        await asyncio.gather(*tasks)
        await client.aclose()
        return limiter.calls

    stop = threading.Event()
    if gil_duty > 0:
        threading.Thread(target=_gil_hog, args=(gil_duty, stop), daemon=True).start()
    barrier.wait()
    calls = asyncio.run(main())
    stop.set()
    out.put((design, sends, lates, calls))


def _spin(stop: Any) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def measure(designs: list[str], rpm: int, workers: int, callers: int, latency_ms: float,
            cpu_ms: float, seconds: float, warm_s: float, cpu_hogs: int,
            url: str, stalls: tuple[float, float, float] = (0.0, 0.1, 0.0)
            ) -> list[dict[str, Any]]:
    """Run every design's fleet at once; the figures per design."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(designs) * workers)
    out: Queue[tuple[str, list[float], list[float], int]] = ctx.Queue()
    stop = ctx.Event()
    hogs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(cpu_hogs)]
    for hog in hogs:
        hog.start()
    # Every process is spawned and connected before the common start time.
    start_at = time.time() + 5.0 + 0.5 * len(designs) * workers
    procs = [ctx.Process(target=_fleet_process,
                         args=(url, design, i, rpm, callers, latency_ms / 1000,
                               cpu_ms / 1000, start_at, seconds, stalls, barrier, out))
             for design in designs for i in range(workers)]
    try:
        for proc in procs:
            proc.start()
        got = [out.get(timeout=seconds + 120) for _ in procs]
        for proc in procs:
            proc.join(30)
    finally:
        stop.set()
        for hog in hogs:
            hog.join(5)
    rate = rpm / 60
    lo, hi = start_at + warm_s, start_at + seconds - 1.0
    results = []
    for design in designs:
        sends = sorted(s for d, stamps, _, _ in got if d == design for s in stamps)
        lates = sorted(x for d, _, late, _ in got if d == design for x in late)
        calls = sum(c for d, _, _, c in got if d == design)
        _, settings = parse_design(design)
        limit = replace(RateLimit(rpm=rpm), **settings)  # type: ignore[arg-type]
        steady = sum(1 for s in sends if lo <= s < hi)
        results.append({
            "design": design, "rpm": rpm, "workers": workers, "per_process": callers,
            "latency_ms": latency_ms, "cpu_ms": cpu_ms, "cpu_hogs": cpu_hogs,
            "stall_every_s": stalls[0], "stall_ms": stalls[1] * 1000,
            "gil_duty": stalls[2],
            "limit": {"burst_s": limit.burst_s, "horizon_s": limit.horizon_s,
                      "max_late_s": limit.max_late_s},
            "sends": len(sends),
            "utilization": round(steady / (rate * (hi - lo)), 4),
            "peak_in_any_1s": max_in_window(sends, 1.0),
            "limiter_bound_per_1s": limit.peak_requests(),
            "calls_per_request": round(calls / max(1, len(sends)), 2),
            "late_ms": {f"p{q}": round(1000 * lates[min(len(lates) - 1,
                                                         int(q / 100 * len(lates)))], 1)
                        for q in (50, 90, 99, 100)},
            "late_over_ms": {ms: round(sum(1 for x in lates if x > ms / 1000)
                                       / max(1, len(lates)), 4)
                             for ms in (10, 20, 30, 50)},
        })
    return results


def main(argv: list[str] | None = None) -> int:
    """Measure every design in one run and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--designs", nargs="+", default=["before", "book"])
    parser.add_argument("--rpm", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--per-process", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--cpu-ms", type=float, default=2.0,
                        help="CPU each caller spends on its loop per request")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warm-s", type=float, default=2.0)
    parser.add_argument("--cpu-hogs", type=int, default=0)
    parser.add_argument("--stall-every-s", type=float, default=0.0,
                        help="mean gap between loop stalls per process (0: none)")
    parser.add_argument("--stall-ms", type=float, default=100.0,
                        help="mean length of a loop stall")
    parser.add_argument("--gil-duty", type=float, default=0.0,
                        help="share of time a second thread per process holds the GIL")
    parser.add_argument("--redis-url", help="a Redis to use (default: an embedded one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for design in args.designs:
        parse_design(design)
    print(f"{len(args.designs)} fleets at once, each {args.workers} processes x "
          f"{args.per_process} callers at {args.rpm} RPM, judge {args.latency_ms:g} ms, "
          f"{args.cpu_ms:g} ms CPU per request, {args.cpu_hogs} cpu hogs, loop stalls "
          f"{args.stall_ms:g} ms every {args.stall_every_s:g} s, GIL duty "
          f"{args.gil_duty:g}, {args.seconds:g} s ...", flush=True)
    stalls = (args.stall_every_s, args.stall_ms / 1000, args.gil_duty)
    if args.redis_url:
        results = measure(args.designs, args.rpm, args.workers, args.per_process,
                          args.latency_ms, args.cpu_ms, args.seconds, args.warm_s,
                          args.cpu_hogs, args.redis_url, stalls)
    else:
        with EmbeddedRedis() as server:
            results = measure(args.designs, args.rpm, args.workers, args.per_process,
                              args.latency_ms, args.cpu_ms, args.seconds, args.warm_s,
                              args.cpu_hogs, server.url, stalls)
    target = RateLimit(rpm=args.rpm).peak_requests()
    for r in results:
        print(f"  {r['design']:20s} utilization {r['utilization']:.3f}  peak in any 1 s "
              f"{r['peak_in_any_1s']} (limit + burst {target})  "
              f"calls/request {r['calls_per_request']:.2f}  late ms {r['late_ms']}  "
              f"share late over ms {r['late_over_ms']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
