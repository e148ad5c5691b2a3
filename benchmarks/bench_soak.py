"""Soak: N steps of M new items of realistic size through a capped Redis; what stays.

Runs the real parts (embedded Redis capped at ``--maxmemory`` with ``noeviction``, the
local judge, ``--workers`` gevent workers) and, after every step has been read, reports
Redis' used memory (which swings by a few MB with the clients' buffers while chunks
stream through), what the keys hold (``kept``: MEMORY USAGE summed over every key, and
per item so far: cache entries, results, everything else), the cache's evictions, Redis'
own evictions, refused writes and the step's outcomes. Rollouts are 2-30 KB, drawn per
item. A step that fails (Redis full, a timeout) is an outcome too: the run goes on with
the next step, as a trainer would, until ``--halt-after`` steps in a row have failed
(the fleet has halted).

    .venv/bin/python benchmarks/bench_soak.py --steps 120 --items 256 --maxmemory 64mb
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from rewardq.broker.embedded import EmbeddedRedis  # noqa: E402
from rewardq.broker.errors import RewardqError  # noqa: E402
from rewardq.broker.keys import CACHE_EVICTIONS  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402
from rewardq.producer.client import RewardClient  # noqa: E402
from rewardq.stack import LocalStack  # noqa: E402


def items(step: int, n: int, rng: random.Random) -> list[dict[str, str]]:
    """``n`` new items of step ``step``, responses of 2-30 KB."""
    words = ["so", "the", "answer", "follows", "from", "the", "steps", "above", "and",
             "we", "check", "it", "again"]
    out = []
    for i in range(n):
        size = rng.randint(2_000, 30_000)
        body = " ".join(rng.choice(words) for _ in range(size // 5))[:size]
        out.append({"id": f"s{step}-{i}", "prompt": f"Step {step}, question {i}: solve it.",
                    "response": f"{step}-{i}: {body}"})
    return out


def keyspace(client: redis.Redis) -> Counter[str]:
    """Bytes per kind of key (MEMORY USAGE), by the key's prefix."""
    sizes: Counter[str] = Counter()
    for key in client.scan_iter(count=1000):
        name = key.decode()
        kind = "cache" if name.startswith("rewardq:cache:") else \
            "results" if name.startswith("celery-task-meta-") else "other"
        sizes[kind] += client.memory_usage(key) or 0
        sizes[kind + "_keys"] += 1
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--items", type=int, default=256, help="items per step")
    parser.add_argument("--maxmemory", default="64mb")
    parser.add_argument("--ratio", type=float, default=0.7,
                        help="REWARDQ_CACHE_MAX_MEMORY_RATIO")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-timeout", type=float, default=120,
                        help="seconds a step may take before it counts as failed")
    parser.add_argument("--halt-after", type=int, default=5,
                        help="stop once this many steps in a row have failed")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with EmbeddedRedis(maxmemory=args.maxmemory) as server:
        raw = redis.Redis.from_url(server.url)
        cap = int(raw.config_get("maxmemory")["maxmemory"])
        base = Settings(redis_url=server.url, cache_max_memory_ratio=args.ratio,
                        worker_concurrency=32)
        with LocalStack(base, workers=args.workers) as stack, \
                RewardClient(stack.settings) as client:
            idle = int(raw.info("memory")["used_memory"])
            print(f"maxmemory {cap / 1e6:.1f} MB, cache ratio {args.ratio}, idle "
                  f"{idle / 1e6:.2f} MB; {args.steps} steps x {args.items} items of 2-30 KB")
            print(f"{'step':>4} {'used MB':>8} {'kept MB':>8} {'kept B/item':>11} "
                  f"{'cache B/entry':>13} {'cache B/item':>12} {'results B/item':>14} "
                  f"{'evicted':>8} {'redis evicted':>13} {'refused':>7}  outcomes")
            outcomes: Counter[str] = Counter()
            failed: list[int] = []
            rollout_bytes = peak = 0
            started = time.monotonic()
            for step in range(args.steps):
                batch = items(step, args.items, rng)
                rollout_bytes += sum(len(i["response"]) for i in batch)
                try:
                    results = client.submit(batch, step=step).result(
                        timeout=args.step_timeout)
                    step_outcomes = Counter(r.status.value for r in results)
                except RewardqError as exc:  # Redis full, no workers, a timeout
                    step_outcomes = Counter({f"step failed ({type(exc).__name__}: "
                                             f"{str(exc)[:60]})": len(batch)})
                    failed.append(step)
                outcomes.update(step_outcomes)
                used = int(raw.info("memory")["used_memory"])
                peak = max(peak, used)
                halting = len(failed) >= args.halt_after and failed[-1] == step
                if step % max(1, args.steps // 12) == 0 or step == args.steps - 1 \
                        or failed[:1] == [step] or halting:
                    space = keyspace(raw)
                    done = (step + 1) * args.items
                    cache_entry = space["cache"] / max(1, space["cache_keys"])
                    evicted = int(raw.get(CACHE_EVICTIONS) or 0)
                    stats = raw.info("stats")
                    errors = raw.info("errorstats").get("errorstat_OOM", {}).get("count", 0)
                    kept = space["cache"] + space["results"] + space["other"]
                    print(f"{step:>4} {used / 1e6:>8.2f} {kept / 1e6:>8.2f} "
                          f"{kept / done:>11.0f} {cache_entry:>13.0f} "
                          f"{space['cache'] / done:>12.0f} {space['results'] / done:>14.0f} "
                          f"{evicted:>8} {stats.get('evicted_keys', 0):>13} {errors:>7}  "
                          f"{dict(step_outcomes)}")
                if len(failed) >= args.halt_after and \
                        failed[-args.halt_after:] == list(range(step - args.halt_after + 1,
                                                               step + 1)):
                    print(f"halted: steps {failed[-args.halt_after]}-{step} all failed")
                    break
            print(f"\n{sum(outcomes.values())} items ({rollout_bytes / 1e6:.0f} MB of rollouts, "
                  f"{rollout_bytes / cap:.1f}x maxmemory) in {time.monotonic() - started:.0f} s:"
                  f" {dict(outcomes)}; peak used {peak / 1e6:.2f} MB of {cap / 1e6:.1f} MB")
            if failed:
                print(f"{len(failed)} of {step + 1} steps failed, the first at step "
                      f"{failed[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
