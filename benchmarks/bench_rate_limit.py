"""Fleet-wide rate limit: does a limit of R requests/minute hold across W worker processes?

Starts the local stack with ``REWARDQ_JUDGE_RPM=R`` (``Settings.judge_rpm``) and W
worker processes, each allowed far more concurrent judge calls than the limit needs,
and scores one cold step of N distinct items. The judge's own ``/stats`` is the
referee: ``max_requests_in_any_1s`` (goal: at most ``--max-per-s``, 55 by default at
3,000 RPM) and the total throughput against R/60 (goal: within 10%). The judge server
itself enforces no limit here (``rpm_limit=0``): only the fleet's limiter holds the
rate, so a fleet that ignores the setting shows up as a throughput far above the limit.

Usage::

    .venv/bin/python benchmarks/bench_rate_limit.py [--rpm 3000] [--workers 4]
        [--items 1500] [--latency-ms 100] [--per-process 64] [--json FILE]

Exit status: 0 when both goals are met, 1 when one is missed, 2 when the fleet does not
limit at all (the setting is not wired into the workers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.settings import Settings  # noqa: E402  (needs ROOT on the path)
from rewardq.bench import Bench, make_items  # noqa: E402
from rewardq.stack import LocalStack  # noqa: E402

_THROUGHPUT_TOLERANCE = 0.10
_UNLIMITED_FACTOR = 1.5


def measure(rpm: int, workers: int, items: int, latency_ms: float,
            per_process: int) -> dict[str, Any]:
    """One cold step of ``items`` under a fleet-wide ``rpm`` limit; the judge's view."""
    settings = Settings(judge_rpm=rpm, max_concurrent_requests=per_process).model_copy(
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
            run = bench.measured(lambda: bench.rewardq_step(
                make_items(items, uuid.uuid4().hex[:12])))
            stats = stack.judge.stats()
        finally:
            bench.close()
    limit_per_s = rpm / 60
    throughput = run.judge_requests / run.wall_s
    return {
        "rpm": rpm, "workers": workers, "items": items, "latency_ms": latency_ms,
        "per_process_concurrency": per_process,
        "wall_s": round(run.wall_s, 3),
        "judge_requests": run.judge_requests,
        "requests_per_s": round(throughput, 2),
        "limit_per_s": round(limit_per_s, 2),
        "throughput_over_limit": round(throughput / limit_per_s, 4),
        "max_requests_in_any_1s": int(stats["max_requests_in_any_1s"]),
        "max_in_flight": run.max_in_flight,
        "responses_by_status": stats["responses_by_status"],
        "failed": run.failed,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, print the figures against the goals, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rpm", type=int, default=3000, help="fleet-wide requests/minute")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--items", type=int, default=1500,
                        help="items (1500 at 3,000 RPM is about 30 s)")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--per-process", type=int, default=64,
                        help="judge calls in flight per worker process")
    parser.add_argument("--max-per-s", type=int, default=55,
                        help="goal: most judge requests in any 1 s window")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    print(f"{args.items} items, {args.workers} workers x {args.per_process} concurrent, "
          f"judge {args.latency_ms:g} ms, fleet limit {args.rpm} RPM "
          f"({args.rpm / 60:.1f}/s) ...", flush=True)
    result = measure(args.rpm, args.workers, args.items, args.latency_ms, args.per_process)
    peak_ok = result["max_requests_in_any_1s"] <= args.max_per_s
    rate_ok = abs(result["throughput_over_limit"] - 1) <= _THROUGHPUT_TOLERANCE
    limited = result["throughput_over_limit"] <= _UNLIMITED_FACTOR
    result.update(peak_ok=peak_ok, throughput_ok=rate_ok, limiter_enforced=limited)
    print(f"wall {result['wall_s']:.2f} s, {result['judge_requests']} judge requests, "
          f"{result['requests_per_s']:.1f}/s = {result['throughput_over_limit']:.3f} x the "
          f"limit ({'ok' if rate_ok else 'MISSED'}: goal within "
          f"{_THROUGHPUT_TOLERANCE:.0%})", flush=True)
    print(f"max requests in any 1 s: {result['max_requests_in_any_1s']} "
          f"({'ok' if peak_ok else 'MISSED'}: goal <= {args.max_per_s}); "
          f"max in flight {result['max_in_flight']}; statuses {result['responses_by_status']}",
          flush=True)
    if not limited:
        print("the fleet did not limit its rate at all: is REWARDQ_JUDGE_RPM wired into the "
              "workers' judge calls (workers/rate_limit.py)?", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not limited:
        return 2
    return 0 if peak_ok and rate_ok and not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
