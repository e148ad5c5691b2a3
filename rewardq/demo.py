"""``rewardq demo``: a simulated GRPO training loop scored by the local fleet.

Each step builds a batch of arithmetic prompts with a group of responses each (some
right, some wrong, of varied length), submits the batch, spends the step's simulated
GPU time computing real length penalties with torch while the fleet judges, then
waits for the scores. One row per step shows how long the trainer was blocked.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from broker.schemas import ResultStatus, ScoreResult, parse_items
from broker.settings import Settings
from producer.client import RewardClient
from producer.config import LengthPenaltyConfig
from producer.penalties import length_penalty
from producer.sync_judge import SyncJudge
from rewardq.stack import LocalStack

_FILLER = [
    "First I restate the problem.", "Then I add the ones digits.", "I carry if needed.",
    "Then I add the tens.", "Let me double-check the sum.", "That looks right.",
]


@dataclass(frozen=True)
class DemoOptions:
    """What ``rewardq demo`` runs."""

    steps: int = 5
    batch: int = 32
    group: int = 8
    latency_ms: float = 100
    workers: int = 2
    mode: str = "async"
    gpu_ms: float = 200
    seed: int = 0
    log_dir: Path | None = None


@dataclass
class StepRow:
    """One printed row: what one training step cost."""

    step: int
    items: int
    cache_hits: int
    judge_calls: int
    failed: int
    wall_ms: float
    judge_ms: float
    gpu_wait_ms: float
    mean_score: float
    scores: list[float | None] = field(default_factory=list, repr=False)


def make_batch(step: int, prompts: int, group: int, rng: random.Random) -> list[dict[str, Any]]:
    """A GRPO-style batch: ``prompts`` questions x ``group`` responses, uid per question.

    Operands come from a small range, so questions (and some answers) recur across
    steps, as they do when a trainer revisits its dataset: those are cache hits.
    """
    items = []
    for p in range(prompts):
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        answer = a + b
        for g in range(group):
            correct = rng.random() < 0.6
            value = answer if correct else answer + rng.choice([-2, -1, 1, 2, 10])
            reasoning = " ".join(rng.sample(_FILLER, rng.randint(0, len(_FILLER))))
            response = (f"{reasoning} The answer is {value}." if reasoning
                        else f"The answer is {value}.")
            items.append({"id": f"s{step}-p{p}-g{g}", "prompt": f"What is {a} + {b}?",
                          "response": response, "reference": str(answer),
                          "uid": f"s{step}-p{p}", "data_source": "arith"})
    return items


def simulate_gpu_step(items: list[dict[str, Any]], gpu_ms: float) -> torch.Tensor:
    """Real length penalties on the batch, then sleep for the rest of the GPU budget.

    The sleep stands in for forward/backward kernels, which would not use the CPU.
    """
    started = time.perf_counter()
    lengths = torch.tensor([len(i["response"].split()) for i in items])
    penalty = length_penalty(lengths, [i["uid"] for i in items], LengthPenaltyConfig())
    remaining = gpu_ms / 1000 - (time.perf_counter() - started)
    if remaining > 0:
        time.sleep(remaining)
    return penalty


def run_step(client: RewardClient, step: int, items: list[dict[str, Any]],
             gpu_ms: float) -> StepRow:
    """Submit, overlap the GPU work, wait; measure what the trainer saw."""
    started = time.perf_counter()
    pending = client.submit(items, step=step)
    simulate_gpu_step(items, gpu_ms)
    wait_started = time.perf_counter()
    results = pending.result(timeout=client.settings.chunk_deadline_s, partial=True)
    ended = time.perf_counter()
    judge_done = pending.finished_at_perf() or ended
    return _row(step, results, wall=ended - started, judge=judge_done - started,
                wait=ended - wait_started)


def run_sync_step(judge: SyncJudge, step: int, items: list[dict[str, Any]],
                  gpu_ms: float) -> StepRow:
    """The simple sync mode: judge every item in a loop, then the GPU work, in series."""
    started = time.perf_counter()
    results = judge.score(parse_items(items))
    judged = time.perf_counter()
    simulate_gpu_step(items, gpu_ms)
    ended = time.perf_counter()
    return _row(step, results, wall=ended - started, judge=judged - started,
                wait=judged - started)


def _row(step: int, results: list[ScoreResult], *, wall: float, judge: float,
         wait: float) -> StepRow:
    ok = [r.score for r in results if r.status is ResultStatus.OK and r.score is not None]
    return StepRow(step=step, items=len(results),
                   cache_hits=sum(r.cached for r in results),
                   judge_calls=sum(r.attempts for r in results),
                   failed=sum(r.status is not ResultStatus.OK for r in results),
                   wall_ms=wall * 1000, judge_ms=judge * 1000, gpu_wait_ms=wait * 1000,
                   mean_score=statistics.fmean(ok) if ok else float("nan"),
                   scores=[r.score for r in results])


_HEADER = (f"{'step':>4} {'items':>6} {'cache hits':>10} {'judge calls':>11} {'failed':>6} "
           f"{'wall ms':>8} {'judge ms':>8} {'GPU wait ms':>11} {'mean score':>10}")


def format_row(row: StepRow) -> str:
    """One table line."""
    return (f"{row.step:>4} {row.items:>6} {row.cache_hits:>10} {row.judge_calls:>11} "
            f"{row.failed:>6} {row.wall_ms:>8.0f} {row.judge_ms:>8.0f} {row.gpu_wait_ms:>11.0f} "
            f"{row.mean_score:>10.3f}")


def run_demo(settings: Settings, options: DemoOptions) -> int:
    """Start the local stack, run the loop(s), print the tables; 0 when every item scored."""
    rng = random.Random(options.seed)
    batches = [make_batch(s, options.batch, options.group, rng) for s in range(options.steps)]
    modes = ["async", "sync"] if options.mode == "both" else [options.mode]
    workers = options.workers if "async" in modes else 0
    print(f"rewardq demo: {options.steps} steps x {options.batch} prompts x {options.group} "
          f"responses, judge latency {options.latency_ms:.0f} ms, {workers} workers, "
          f"{options.gpu_ms:.0f} ms simulated GPU work per step", flush=True)
    print("starting embedded Redis, the local judge and the workers ...", flush=True)
    summaries: dict[str, list[StepRow]] = {}
    with LocalStack(settings, workers=workers, judge_latency_ms=options.latency_ms,
                    log_dir=options.log_dir) as stack:
        for mode in modes:
            print(f"\n{mode} mode " + ("(the worker fleet; the GPU works while it judges)"
                                       if mode == "async" else
                                       "(in-process loop; the GPU waits for every call)"))
            print(_HEADER, flush=True)
            summaries[mode] = _run_mode(mode, stack.settings, batches, options.gpu_ms)
    for mode, rows in summaries.items():
        _print_summary(mode, rows)
    if len(summaries) == 2:
        wait = {m: statistics.fmean(r.gpu_wait_ms for r in rows) for m, rows in summaries.items()}
        print(f"GPU wait, sync / async: {wait['sync'] / max(wait['async'], 1e-3):.1f}x")
    return 0 if all(r.failed == 0 for rows in summaries.values() for r in rows) else 1


def _run_mode(mode: str, settings: Settings, batches: list[list[dict[str, Any]]],
              gpu_ms: float) -> list[StepRow]:
    rows = []
    if mode == "async":
        with RewardClient(settings) as client:
            for step, items in enumerate(batches):
                rows.append(run_step(client, step, items, gpu_ms))
                print(format_row(rows[-1]), flush=True)
    else:
        with SyncJudge(settings) as judge:
            for step, items in enumerate(batches):
                rows.append(run_sync_step(judge, step, items, gpu_ms))
                print(format_row(rows[-1]), flush=True)
    return rows


def _print_summary(mode: str, rows: list[StepRow]) -> None:
    items = sum(r.items for r in rows)
    hits = sum(r.cache_hits for r in rows)
    print(f"\n{mode}: {items} items in {len(rows)} steps: {hits} cache hits ({hits / items:.0%}), "
          f"{sum(r.judge_calls for r in rows)} judge calls, {sum(r.failed for r in rows)} "
          f"failed; mean step wall {statistics.fmean(r.wall_ms for r in rows):.0f} ms, "
          f"mean GPU wait {statistics.fmean(r.gpu_wait_ms for r in rows):.0f} ms")
