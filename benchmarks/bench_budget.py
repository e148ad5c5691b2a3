"""Judge budget at the cap: how much of a limit a capped run leaves unspent (or passes),
how many items it refuses, and whether a replay after raising the limit scores them all,
at several per-process concurrencies in the same run.

For each per-process concurrency C (``--per-process 16 64 256``), on a fresh local stack
(embedded Redis, the local judge with ``--latency-ms`` ± ``--jitter-ms``, ``--workers``
worker processes with ``REWARDQ_MAX_CONCURRENT_REQUESTS=C``), with the same ``--items``
distinct items each time:

1. the run's limit is set to half of what the items really cost (``rewardq budget set``'s
   function): the cost of each item is measured first, once, by judging the items with
   the in-process sync judge against an identical local judge without latency;
2. the items are submitted as one step and awaited: **ok** and **refused**
   (``budget_exceeded``), **spent** against the **limit**, and the difference either way:
   **unspent at the cap** (limit - spent, when the run stopped short of its limit) and
   **past the limit** (spent - limit), in US dollars and in calls (divided by the mean
   real cost of a call);
3. the limit is raised to exactly the items' full cost and ``rewardq failed replay
   --all``'s function replays the dead letters: **replayed ok** and **still refused**,
   and the spend then (equal to the full cost when every item was judged exactly once).

``--profile openai-reasoning --model gpt-5-mini`` plays an OpenAI reasoning judge instead
(``max_completion_tokens`` of 8,192 sent, ``--reasoning-tokens`` spent per reply), where a
call's worst case is ~8x its real cost.

Usage::

    .venv/bin/python benchmarks/bench_budget.py [--per-process 16 64 256] [--workers 4]
        [--items 1024] [--latency-ms 100] [--jitter-ms 50] [--chunk-size 64]
        [--profile plain] [--model rewardq-local-judge] [--reasoning-tokens 1024]
        [--price-in 3.0] [--price-out 15.0] [--json FILE]

Exit status: 0 when, at every concurrency, the run was capped (some items refused), ended
within ``--max-calls`` calls' mean cost of its limit either way, and the replay scored
every refused item; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402  (needs ROOT on the path)

from rewardq.bench import make_items  # noqa: E402
from rewardq.broker.dead_letters import DeadLetters  # noqa: E402
from rewardq.broker.keys import BUDGET_UNITS_PER_USD  # noqa: E402
from rewardq.broker.schemas import ResultStatus, Usage  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402
from rewardq.budget_cli import read_budget, set_limits  # noqa: E402
from rewardq.judge_server.config import JudgeConfig  # noqa: E402
from rewardq.judge_server.server import BackgroundJudgeServer  # noqa: E402
from rewardq.monitoring.costs import PriceTable  # noqa: E402
from rewardq.producer.client import RewardClient  # noqa: E402
from rewardq.producer.sync_judge import SyncJudge  # noqa: E402
from rewardq.stack import LocalStack  # noqa: E402
from rewardq.workers.budget import cost_units, units_to_usd  # noqa: E402


@dataclass
class CapRun:
    """One concurrency's figures."""

    per_process: int
    calls_in_flight: int
    items: int
    limit_usd: float
    spent_usd: float
    unspent_usd: float
    past_limit_usd: float
    unspent_calls: float
    past_limit_calls: float
    ok: int
    refused: int
    other: int
    replayed_ok: int
    still_refused: int
    spent_after_replay_usd: float
    full_cost_usd: float
    run_s: float
    replay_s: float


def profile_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The judge-server knobs that play ``--profile``."""
    knobs: dict[str, Any] = {"profile": args.profile}
    if args.profile == "openai-reasoning":
        knobs["reasoning_tokens"] = {"medium": args.reasoning_tokens}
    return knobs


def item_costs(settings: Settings, items: list[dict[str, Any]],
               knobs: dict[str, Any]) -> dict[str, int]:
    """Nano-USD each item costs on this judge: judged once by the sync judge against an
    identical local judge without latency."""
    price = PriceTable.from_settings(settings).price(settings.judge_model)
    if price is None:
        raise SystemExit(f"no price for {settings.judge_model}")
    with BackgroundJudgeServer(JudgeConfig(**knobs)) as server:
        reference = settings.model_copy(update={"judge_base_url": server.base_url})
        with SyncJudge(reference) as judge:
            results = judge.score(items)
    bad = [r for r in results if r.status is not ResultStatus.OK]
    if bad:
        raise SystemExit(f"the reference pass failed {len(bad)} item(s): {bad[0].error}")
    costs = {}
    for r in results:
        usage = r.usage or Usage()
        costs[r.id] = cost_units(price, usage.prompt_tokens, usage.completion_tokens)
    return costs


def measure(base: Settings, args: argparse.Namespace, per_process: int,
            items: list[dict[str, Any]], costs: dict[str, int]) -> CapRun:
    """A capped run and its replay on a fresh stack at ``per_process`` calls per process."""
    total = sum(costs.values())
    limit = total // 2
    mean = total / len(costs)
    run = f"bench-{per_process}-{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(update={"budget_run": run, "max_concurrent_requests": per_process})
    with LocalStack(settings, workers=0, judge_latency_ms=args.latency_ms,
                    judge_jitter_ms=args.jitter_ms) as stack:
        assert stack.judge is not None
        stack.judge.configure(**profile_knobs(args))
        live = stack.settings
        client = redis.Redis.from_url(live.broker_url)
        set_limits(client, run, usd=units_to_usd(limit))
        stack.add_workers(args.workers)
        started = time.perf_counter()
        with RewardClient(live) as rq:
            results = rq.submit(items, step=1).result(timeout=600, partial=True)
        run_s = time.perf_counter() - started
        capped = read_budget(client, run)
        statuses = [r.status for r in results]
        ok = statuses.count(ResultStatus.OK)
        refused = statuses.count(ResultStatus.BUDGET_EXCEEDED)

        set_limits(client, run, usd=units_to_usd(total))
        started = time.perf_counter()
        letters = DeadLetters.from_settings(live)
        try:
            replay = letters.replay_all()
            counts = letters.outcome(replay, 600) if replay.replayed else {}
        finally:
            letters.close()
        replay_s = time.perf_counter() - started
        after = read_budget(client, run)
        client.close()
    spent = round(capped.spent_usd * BUDGET_UNITS_PER_USD)
    return CapRun(
        per_process=per_process, calls_in_flight=per_process * args.workers,
        items=len(items), limit_usd=units_to_usd(limit), spent_usd=units_to_usd(spent),
        unspent_usd=units_to_usd(max(0, limit - spent)),
        past_limit_usd=units_to_usd(max(0, spent - limit)),
        unspent_calls=max(0, limit - spent) / mean, past_limit_calls=max(0, spent - limit) / mean,
        ok=ok, refused=refused, other=len(items) - ok - refused,
        replayed_ok=counts.get("ok", 0), still_refused=counts.get("budget_exceeded", 0),
        spent_after_replay_usd=after.spent_usd, full_cost_usd=units_to_usd(total),
        run_s=run_s, replay_s=replay_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-process", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--jitter-ms", type=float, default=50.0)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--profile", default="plain")
    parser.add_argument("--model", default=Settings().judge_model)
    parser.add_argument("--reasoning-tokens", type=int, default=1024)
    parser.add_argument("--price-in", type=float, default=3.0, help="USD per 1M prompt tokens")
    parser.add_argument("--price-out", type=float, default=15.0,
                        help="USD per 1M completion tokens")
    parser.add_argument("--max-calls", type=float, default=3.0,
                        help="goal: the run ends within this many calls' cost of its limit")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    base = Settings(judge_model=args.model, chunk_size=args.chunk_size,
                    judge_prices={args.model: (args.price_in, args.price_out)},
                    judge_timeout_s=30, chunk_deadline_s=600)
    items = make_items(args.items, f"budget-{uuid.uuid4().hex[:6]}")
    costs = item_costs(base, items, profile_knobs(args))
    mean = sum(costs.values()) / len(costs)
    print(f"{args.items} items on {args.profile} judge {args.model}: full cost "
          f"{units_to_usd(sum(costs.values())):.4f} USD, a call {units_to_usd(round(mean)):.6f}"
          f" USD on average; limit = half; {args.workers} workers; judge "
          f"{args.latency_ms:g}±{args.jitter_ms:g} ms")
    print(f"{'per proc':>8} {'in flight':>9} {'ok':>5} {'refused':>7} {'limit USD':>10} "
          f"{'spent USD':>10} {'unspent':>16} {'past limit':>16} {'replayed':>8} "
          f"{'left':>5} {'after USD':>10} {'run s':>6}")
    runs: list[CapRun] = []
    for per_process in args.per_process:
        r = measure(base, args, per_process, items, costs)
        runs.append(r)
        print(f"{r.per_process:>8} {r.calls_in_flight:>9} {r.ok:>5} {r.refused:>7} "
              f"{r.limit_usd:>10.4f} {r.spent_usd:>10.4f} "
              f"{r.unspent_usd:>8.4f} ({r.unspent_calls:>4.2f}c) "
              f"{r.past_limit_usd:>8.4f} ({r.past_limit_calls:>4.2f}c) {r.replayed_ok:>8} "
              f"{r.still_refused:>5} {r.spent_after_replay_usd:>10.4f} {r.run_s:>6.1f}",
              flush=True)
    print("unspent / past limit: in USD and in calls of the mean real cost (c); replayed: "
          "refused items scored by `failed replay --all` after the limit was raised to the "
          "full cost; left: still refused")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    met = all(r.refused > 0 and r.other == 0 and r.unspent_calls <= args.max_calls
              and r.past_limit_calls <= args.max_calls and r.replayed_ok == r.refused
              and r.still_refused == 0 for r in runs)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
