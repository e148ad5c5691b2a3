"""Horizontal scaling: fleet throughput with 1, 2, 4 worker processes, below any rate limit.

One local stack (embedded Redis, the local judge at latency L); workers are added to
it between rounds, each with the same per-process judge concurrency P, so the judge
concurrency (and the ideal throughput W·P/L) doubles with every doubling of W. Each
round scores ``--repeats`` cold steps of N distinct items through ``RewardClient`` and
reports the median items/s, its ratio to W=1 and to the ideal, and the CPU our
processes spent per item. The CPU figures give the machine's own bound: with K cores,
no fleet on this host can go faster than about K / (CPU seconds per item of every
process involved, the judge and Redis included), so on a small machine pick P and L
such that W·P/L stays below it, or the rounds measure the CPU instead of the fleet.

Usage::

    .venv/bin/python benchmarks/bench_scaling.py [--items 2048] [--latency-ms 100]
        [--per-process 16] [--workers 1,2,4] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewardq.bench import Bench, Run, make_items  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402  (needs ROOT on the path)
from rewardq.stack import LocalStack  # noqa: E402


def measure_round(bench: Bench, workers: int, items: int, repeats: int, per_process: int,
                  latency_ms: float) -> dict[str, Any]:
    """``repeats`` cold steps of ``items`` on the stack as it is; medians and bounds."""
    bench.rewardq_step(make_items(min(items, 2 * workers * per_process), f"wu-{workers}"))
    runs: list[Run] = [bench.measured(partial(bench.rewardq_step,
                                              make_items(items, uuid.uuid4().hex[:12])))
                       for _ in range(repeats)]
    wall = statistics.median(r.wall_s for r in runs)
    total_cpu = statistics.median(
        (r.cpu_s + r.redis_cpu_s + r.judge_cpu_s) / r.items for r in runs)
    return {
        "workers": workers,
        "judge_concurrency": workers * per_process,
        "wall_s": round(wall, 4),
        "items_per_s": round(items / wall, 1),
        "ideal_items_per_s": round(workers * per_process / (latency_ms / 1000), 1),
        "cpu_bound_items_per_s": round((os.cpu_count() or 1) / total_cpu, 1),
        "ours_cpu_ms_per_item": round(statistics.median(r.cpu_s / r.items for r in runs) * 1e3,
                                      3),
        "all_cpu_ms_per_item": round(total_cpu * 1000, 3),
        "max_in_flight": max(r.max_in_flight for r in runs),
        "failed": sum(r.failed for r in runs),
        "runs_wall_s": [round(r.wall_s, 4) for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, print one line per worker count, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--per-process", type=int, default=16,
                        help="judge calls in flight per worker process")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, increasing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rounds here")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    if counts != sorted(counts) or counts[0] < 1:
        parser.error("--workers must be increasing positive counts")
    settings = Settings(max_concurrent_requests=args.per_process).model_copy(
        update={"redis_url": None,
                "judge_base_url": Settings.model_fields["judge_base_url"].default})
    rounds: list[dict[str, Any]] = []
    print(f"N={args.items} L={args.latency_ms:g} ms, {args.per_process} judge calls per "
          f"process, {os.cpu_count()} CPUs", flush=True)
    print(f"{'W':>2} {'C':>5} {'wall s':>7} {'items/s':>8} {'x W=1':>6} {'ideal/s':>8} "
          f"{'of ideal':>8} {'CPU-bound/s':>11} {'ours ms/it':>10} {'all ms/it':>9}", flush=True)
    with LocalStack(settings, workers=counts[0], judge_latency_ms=args.latency_ms) as stack:
        bench = Bench(stack)
        try:
            for w in counts:
                if w > len(stack.worker_processes):
                    stack.add_workers(w - len(stack.worker_processes))
                    bench = _rebind(bench, stack)
                row = measure_round(bench, w, args.items, args.repeats, args.per_process,
                                    args.latency_ms)
                row["speedup_vs_first"] = round(row["items_per_s"] / (
                    rounds[0]["items_per_s"] if rounds else row["items_per_s"]), 3)
                rounds.append(row)
                print(f"{w:>2} {row['judge_concurrency']:>5} {row['wall_s']:>7.3f} "
                      f"{row['items_per_s']:>8.0f} {row['speedup_vs_first']:>6.2f} "
                      f"{row['ideal_items_per_s']:>8.0f} "
                      f"{row['items_per_s'] / row['ideal_items_per_s']:>8.2f} "
                      f"{row['cpu_bound_items_per_s']:>11.0f} "
                      f"{row['ours_cpu_ms_per_item']:>10.3f} {row['all_cpu_ms_per_item']:>9.3f}",
                      flush=True)
        finally:
            bench.close()
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2) + "\n")
    return 1 if any(r["failed"] for r in rounds) else 0


def _rebind(bench: Bench, stack: LocalStack) -> Bench:
    """A ``Bench`` that sees the stack's current worker processes (for their CPU)."""
    bench.close()
    return Bench(stack)


if __name__ == "__main__":
    sys.exit(main())
