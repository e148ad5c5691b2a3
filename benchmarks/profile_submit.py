"""cProfile of ``RewardClient.submit`` for one step: where the producer's submit time goes.

Starts an embedded Redis only (no workers: the chunks stay queued), submits ``--steps``
steps of N fresh items under ``cProfile``, and prints the wall and CPU time of each
submit without the profiler first, then the warm step (the N items of one step with
every verdict already cached, as a worker would have left them: ``submit().result()``,
``--steps`` times), then the functions with the most own time and the call counts that
say how many round trips and validations a submit makes. The profiler counts CPU time
(``time.process_time``), so waits on Redis and a loaded host do not show.

Usage::

    .venv/bin/python benchmarks/profile_submit.py [--items 2048] [--steps 5] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewardq.bench import make_items  # noqa: E402
from rewardq.broker.embedded import EmbeddedRedis  # noqa: E402
from rewardq.broker.keys import cache_key, judge_fingerprints  # noqa: E402
from rewardq.broker.schemas import JudgeVerdict, Usage, parse_items  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402
from rewardq.producer.client import RewardClient  # noqa: E402

# Call counts worth reading: (label, substring of pstats' "file:line(function)").
COUNTED = [
    ("Redis commands sent (redis-py execute_command)", "client.py", "execute_command"),
    ("kombu publishes", "messaging.py", "_publish"),
    ("Celery send_task", "base.py", "send_task"),
    ("pydantic TypeAdapter.validate_python (all items at once)", "type_adapter.py",
     "validate_python"),
    ("pydantic model_dump", "main.py", "model_dump"),
    ("judge_fingerprints (one call for the step)", "keys.py", "judge_fingerprints"),
    ("json.dumps", "__init__.py", "dumps"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with EmbeddedRedis() as redis_server:
        settings = Settings(redis_url=redis_server.url)
        client = RewardClient(settings)
        try:
            client.submit(make_items(args.items, f"warm-{uuid.uuid4().hex[:8]}"))
            walls, cpus = [], []
            for _ in range(args.steps):
                items = make_items(args.items, f"plain-{uuid.uuid4().hex[:8]}")
                cpu, wall = time.process_time(), time.perf_counter()
                client.submit(items)
                walls.append((time.perf_counter() - wall) * 1000)
                cpus.append((time.process_time() - cpu) * 1000)
            warm_walls, warm_cpus = warm_step(client, args.items, args.steps)
            steps = [make_items(args.items, f"prof-{uuid.uuid4().hex[:8]}")
                     for _ in range(args.steps)]
            profiler = cProfile.Profile(time.process_time)  # CPU, not wall: a loaded host
            profiler.enable()
            for items in steps:
                client.submit(items)
            profiler.disable()
        finally:
            client.close()
    print(f"submit() of {args.items} items, {args.steps} steps, no profiler: wall median "
          f"{statistics.median(walls):.1f} ms ({', '.join(f'{w:.0f}' for w in walls)}), "
          f"CPU median {statistics.median(cpus):.1f} ms")
    print(f"warm step (all {args.items} cached), submit().result(), {args.steps} steps: wall "
          f"median {statistics.median(warm_walls):.1f} ms, CPU median "
          f"{statistics.median(warm_cpus):.1f} ms")
    stats = pstats.Stats(profiler)
    print("calls per submit:")
    for label, file_part, function in COUNTED:
        calls = sum(value[1] for (path, _, name), value in stats.stats.items()  # type: ignore[attr-defined]
                    if name == function and path.endswith(file_part))
        print(f"  {calls / args.steps:>8.1f}  {label}")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    return 0


def warm_step(client: RewardClient, n: int, steps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU ms of ``steps`` warm steps: n items whose verdicts are all cached."""
    items = make_items(n, f"warm-{uuid.uuid4().hex[:8]}")
    verdict = JudgeVerdict(score=0.9, raw_score=9.0, usage=Usage(
        prompt_tokens=120, completion_tokens=4)).model_dump_json()
    client.redis.mset({cache_key(fp): verdict for fp in judge_fingerprints(
        client.spec, client.rubrics.assign(parse_items(items)))})
    walls, cpus = [], []
    for _ in range(steps):
        cpu, wall = time.process_time(), time.perf_counter()
        results = client.submit(items).result(timeout=30)
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
        assert len(results) == n and all(r.cached for r in results)
    return walls, cpus


if __name__ == "__main__":
    raise SystemExit(main())
