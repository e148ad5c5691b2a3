"""``rewardq demo``: a simulated GRPO training loop scored by the local fleet.

Each step builds a batch of arithmetic prompts with a group of responses each (some
right, some wrong, of varied length). Two ways to run it:

* ``stream`` (the default) simulates the generation phase too: rollouts finish at
  spread times over a generation window, longer ones later. Each step runs twice on
  fresh (uncached) items, side by side: *batch after generation* submits the whole
  batch once the last rollout is done and waits, as a trainer that rewards after
  ``generate()`` does; *streaming* hands each rollout to :class:`AsyncRewardClient` the
  moment it finishes, so when generation ends only the last rollouts' judging is left.
  The GPU wait is the time from the end of generation, less the trainer's own length
  penalty compute, until the last score is back.
* ``async`` / ``sync`` / ``both`` submit a ready batch, spend the step's simulated GPU
  time computing real length penalties with torch while the fleet judges (``async``)
  or after an in-process judge loop (``sync``), then wait for the scores; recurring
  questions show the cache at work.

One row per step shows how long the trainer was blocked.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewardq.broker.errors import ConfigError
from rewardq.broker.schemas import ResultStatus, ScoreResult, parse_items
from rewardq.broker.settings import Settings
from rewardq.producer.async_client import AsyncRewardClient
from rewardq.producer.client import RewardClient
from rewardq.producer.config import LengthPenaltyConfig
from rewardq.producer.penalties import length_penalty
from rewardq.producer.sync_judge import SyncJudge
from rewardq.stack import LocalStack

_FILLER = [
    "First I restate the problem.", "Then I add the ones digits.", "I carry if needed.",
    "Then I add the tens.", "Let me double-check the sum.", "That looks right.",
]


@dataclass(frozen=True)
class DemoOptions:
    """What ``rewardq demo`` runs."""

    steps: int = 5
    batch: int = 16
    group: int = 8
    latency_ms: float = 200
    workers: int = 2
    mode: str = "stream"
    gpu_ms: float = 200
    #: Judge calls in flight fleet-wide: each worker process gets ``concurrency // workers``.
    concurrency: int = 32
    #: ``stream`` mode: the simulated generation phase; the longest rollout ends it.
    generation_ms: float = 1500
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
    """Start the local stack, run the loop(s), print the tables; 0 when every item scored.

    Raises:
        ConfigError: ``stream`` mode without workers.
    """
    per_worker = max(1, options.concurrency // max(options.workers, 1))
    settings = settings.model_copy(update={"max_concurrent_requests": per_worker})
    if options.mode == "stream":
        return run_stream_demo(settings, options)
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


# ---------------------------------------------------------------- stream mode


@dataclass
class ModeWait:
    """One way of scoring a step, as the trainer saw it."""

    chunks: int
    judge_calls: int
    ok: int
    gpu_wait_ms: float


@dataclass
class GenerationRow:
    """One ``stream`` row: the same step shape scored after generation and streamed."""

    step: int
    rollouts: int
    generation_ms: float
    batch: ModeWait
    streaming: ModeWait


def finish_times(items: list[dict[str, Any]], generation_s: float,
                 rng: random.Random) -> list[float]:
    """Seconds into generation at which each rollout is done.

    Decoding runs at a steady token rate, so a rollout finishes in proportion to its
    length (give or take 20%): a group's long rollouts finish last, and the longest of
    the batch ends the generation phase at ``generation_s``.
    """
    raw = [len(i["response"].split()) * rng.uniform(0.8, 1.2) for i in items]
    longest = max(raw)
    return [generation_s * r / longest for r in raw]


def fresh(items: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The same rollouts with ids, uids and prompts tagged by ``tag``: no verdict is
    cached for them and no two are alike, so every one costs a judge call."""
    return [{**i, "id": f"{tag}-{i['id']}", "uid": f"{tag}-{i['uid']}",
             "prompt": f"(rollout {tag}-{i['id']}) {i['prompt']}"} for i in items]


def timed_penalties(items: list[dict[str, Any]]) -> float:
    """Seconds the trainer spends on the group length penalties (needs every rollout)."""
    started = time.perf_counter()
    simulate_gpu_step(items, 0)
    return time.perf_counter() - started


def batch_after_generation(client: RewardClient, step: int, items: list[dict[str, Any]],
                           finish_s: list[float]) -> ModeWait:
    """Generate everything, then submit the whole batch and wait (a trainer that
    rewards after ``generate()`` returns)."""
    time.sleep(max(finish_s))
    generated = time.perf_counter()
    pending = client.submit(items, step=step)
    penalty_s = timed_penalties(items)
    results = pending.result(timeout=client.settings.chunk_deadline_s, partial=True)
    waited = time.perf_counter() - generated - penalty_s
    return _mode_wait(results, pending.chunk_count, waited)


def streaming(client: RewardClient, step: int, items: list[dict[str, Any]],
              finish_s: list[float]) -> ModeWait:
    """Hand each rollout to rewardq the moment it finishes; wait only for the rest."""
    return asyncio.run(_stream(client, step, items, finish_s))


async def _stream(client: RewardClient, step: int, items: list[dict[str, Any]],
                  finish_s: list[float]) -> ModeWait:
    async with AsyncRewardClient(client.settings, client=client) as rewards:
        started = time.perf_counter()

        async def score_when_done(item: dict[str, Any], at: float) -> ScoreResult:
            await asyncio.sleep(started + at - time.perf_counter())
            return await rewards.score(item, step=step)

        scores = [asyncio.ensure_future(score_when_done(item, at))
                  for item, at in zip(items, finish_s, strict=True)]
        # The GPU generates meanwhile; the event loop stays free to send what finishes.
        await asyncio.sleep(started + max(finish_s) - time.perf_counter())
        generated = time.perf_counter()
        penalty_s = timed_penalties(items)
        results = await asyncio.gather(*scores)
        waited = time.perf_counter() - generated - penalty_s
        return _mode_wait(results, rewards.chunks_sent, waited)


def _mode_wait(results: list[ScoreResult], chunks: int, waited_s: float) -> ModeWait:
    return ModeWait(chunks=chunks, judge_calls=sum(r.attempts for r in results),
                    ok=sum(r.status is ResultStatus.OK for r in results),
                    gpu_wait_ms=max(waited_s, 0.0) * 1000)


_MODE_COLUMNS = f"{'chunks':>6} {'calls':>5} {'ok':>4} {'GPU wait ms':>11}"
_GENERATION_HEADER = (f"{'':23}{'batch after generation':<32}streaming\n"
                      f"{'step':>4} {'rollouts':>8} {'gen ms':>6}   {_MODE_COLUMNS}   "
                      f"{_MODE_COLUMNS}")


def format_generation_row(row: GenerationRow) -> str:
    """One ``stream`` table line: both modes side by side."""
    def mode(m: ModeWait) -> str:
        return f"{m.chunks:>6} {m.judge_calls:>5} {m.ok:>4} {m.gpu_wait_ms:>11.0f}"
    return (f"{row.step:>4} {row.rollouts:>8} {row.generation_ms:>6.0f}   {mode(row.batch)}   "
            f"{mode(row.streaming)}")


def run_stream_demo(settings: Settings, options: DemoOptions) -> int:
    """``stream`` mode: per step, batch after generation and streaming side by side.

    ``settings.max_concurrent_requests`` is the judge calls in flight per worker.

    Raises:
        ConfigError: no workers.
    """
    if options.workers < 1:
        raise ConfigError("stream mode needs at least one worker (--workers)")
    n = options.batch * options.group
    fleet = options.workers * settings.max_concurrent_requests
    # At least one chunk per worker, so the batch after generation can use all C slots:
    # its best case, which keeps the comparison fair.
    settings = settings.model_copy(
        update={"chunk_size": min(settings.chunk_size, math.ceil(n / options.workers))})
    print(f"rewardq demo: {options.steps} steps x {n} rollouts ({options.batch} prompts x "
          f"{options.group} responses) finishing over a {options.generation_ms:.0f} ms "
          f"generation window, judge latency {options.latency_ms:.0f} ms, "
          f"{options.workers} workers x {settings.max_concurrent_requests} judge calls in "
          f"flight (C = {fleet})", flush=True)
    print("starting embedded Redis, the local judge and the workers ...", flush=True)
    rng = random.Random(options.seed)
    run = uuid.uuid4().hex[:6]  # fresh prompts on every run, even against a kept Redis
    rows: list[GenerationRow] = []
    with LocalStack(settings, workers=options.workers, judge_latency_ms=options.latency_ms,
                    log_dir=options.log_dir) as stack, RewardClient(stack.settings) as client:
        # Open the workers' judge connections first, so step 0 measures what step 5 does.
        warm_up = fresh(make_batch(-1, fleet, 1, random.Random(options.seed + 1)),
                        f"{run}-warm-up")
        client.submit(warm_up).result(timeout=stack.settings.chunk_deadline_s, partial=True)
        print("\nGPU wait after generation: batch after generation (submit every rollout "
              "once the last is done) vs streaming (submit each as it finishes)")
        print(_GENERATION_HEADER, flush=True)
        for step in range(options.steps):
            items = make_batch(step, options.batch, options.group, rng)
            finish_s = finish_times(items, options.generation_ms / 1000, rng)
            batch = batch_after_generation(client, step, fresh(items, f"{run}-b"), finish_s)
            streamed = streaming(client, step, fresh(items, f"{run}-s"), finish_s)
            rows.append(GenerationRow(step, n, max(finish_s) * 1000, batch, streamed))
            print(format_generation_row(rows[-1]), flush=True)
    print(_stream_summary(rows, n, fleet, options.latency_ms))
    return 0 if all(m.ok == n for r in rows for m in (r.batch, r.streaming)) else 1


def _stream_summary(rows: list[GenerationRow], n: int, fleet: int, latency_ms: float) -> str:
    streamed = [r.streaming.gpu_wait_ms for r in rows]
    batch = statistics.fmean(r.batch.gpu_wait_ms for r in rows)
    floor = math.ceil(n / fleet) * latency_ms
    return (f"\nGPU wait per step: streaming {statistics.fmean(streamed):.0f} ms (max "
            f"{max(streamed):.0f} ms = {max(streamed) / latency_ms:.2f}x the {latency_ms:.0f} ms "
            f"judge latency: only the last rollouts were left to judge); batch after "
            f"generation {batch:.0f} ms (ceil(N/C)*L = ceil({n}/{fleet}) x {latency_ms:.0f} ms "
            f"= {floor:.0f} ms)")
