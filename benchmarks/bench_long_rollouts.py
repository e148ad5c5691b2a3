"""A step of long reasoning rollouts against the same step of short ones, in one run.

Starts the local stack (embedded Redis, the local judge, ``--workers`` worker processes),
then scores, alternately and ``--repeats`` times each, a step of ``--items`` short rollouts
(``rewardq.bench.make_items``) and the same step with every response turned into a
reasoning rollout of ``--chars`` characters (a ``<think>`` block, then the same final
answer). Each step's content is new (a cold cache). Reported per kind: the median wall
time of ``submit`` alone and of ``submit`` + ``result``, the bytes the step's chunks put
on the queue, and the long/short ratio of each. The producer takes the rollout view before
anything is enqueued (``rewardq.judge.rollout_view``), so a long step should cost about what a
short one does.

Usage::

    .venv/bin/python benchmarks/bench_long_rollouts.py [--items 2048] [--chars 100000]
        [--workers 2] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewardq.bench import make_items  # noqa: E402
from rewardq.broker.schemas import ResultStatus  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402
from rewardq.producer.client import RewardClient  # noqa: E402
from rewardq.stack import LocalStack  # noqa: E402


def long_rollouts(items: list[dict[str, Any]], chars: int) -> list[dict[str, Any]]:
    """``items`` with each response written as a reasoning rollout of about ``chars``
    characters: thinking (with a decoy conclusion), then the original answer."""
    out = []
    for item in items:
        answer = item["response"]
        step = f"Let me check {item['prompt']} once more, carefully. "
        thinking = (step * (chars // len(step) + 1))[:max(0, chars - len(answer) - 40)]
        out.append({**item, "response": f"<think>{thinking} So the answer is 0.</think>\n\n"
                                        f"{answer}<|im_end|>"})
    return out


def run_step(client: RewardClient, items: list[dict[str, Any]]) -> dict[str, float]:
    started = time.perf_counter()
    pending = client.submit(items)
    submitted = time.perf_counter()
    results = pending.result(timeout=600)
    done = time.perf_counter()
    ok = sum(r.status is ResultStatus.OK for r in results)
    queued = sum(len(json.dumps(m)) for m in pending._messages.values())
    return {"submit_s": submitted - started, "total_s": done - started, "ok": ok,
            "queued_bytes": queued, "input_chars": sum(len(i["response"]) for i in items)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"short": [], "long": []}
    with LocalStack(Settings(), workers=args.workers) as stack, \
            RewardClient(stack.settings) as client:
        run_step(client, make_items(64, f"warm-{uuid.uuid4().hex[:6]}"))
        for _ in range(args.repeats):
            for kind in ("short", "long"):
                items = make_items(args.items, f"{kind}-{uuid.uuid4().hex[:8]}")
                if kind == "long":
                    items = long_rollouts(items, args.chars)
                runs[kind].append(run_step(client, items))
    summary: dict[str, Any] = {"items": args.items, "chars": args.chars,
                               "workers": args.workers, "runs": runs}
    print(f"{args.items} items a step, long rollouts of {args.chars:,} characters, "
          f"{args.workers} workers, median of {args.repeats}:")
    print(f"{'':8}{'submit s':>10}{'step s':>10}{'queued MB':>11}{'ok':>7}")
    medians = {}
    for kind, rows in runs.items():
        medians[kind] = {key: statistics.median(r[key] for r in rows)
                         for key in ("submit_s", "total_s", "queued_bytes", "ok")}
        m = medians[kind]
        print(f"{kind:8}{m['submit_s']:>10.3f}{m['total_s']:>10.3f}"
              f"{m['queued_bytes'] / 1e6:>11.2f}{m['ok']:>7.0f}")
    ratio = {key: medians["long"][key] / medians["short"][key]
             for key in ("submit_s", "total_s")}
    print(f"long/short: submit {ratio['submit_s']:.2f}x, step {ratio['total_s']:.2f}x")
    summary["medians"], summary["ratio"] = medians, ratio
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
