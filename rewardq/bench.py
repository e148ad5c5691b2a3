"""``rewardq bench``: the fleet against the alternatives a user would pick, in one run.

Starts the local stack (embedded Redis, the local judge at latency L, W gevent worker
processes with ``max_concurrent_requests = C // W`` each, so C judge calls fleet-wide)
and scores a step of N items with distinct content in each of these ways:

* ``ideal``: ceil(N/C)·L, the floor at concurrency C (computed, not run);
* ``sync``: ``SyncJudge``, one blocking call at a time, on a small N; extrapolated to N;
* ``asyncio``: one process, one ``AsyncOpenAI`` client on the aiohttp transport, a
  semaphore of C: the in-process design. It runs in a child process of its own (kept
  alive across repeats, like a trainer's client across steps) so its CPU is its own;
* ``rewardq``: ``RewardClient.submit`` → ``result()``: cold cache, then the same items
  again (warm: all cached), then a fresh step with 30% duplicates;
* ``rewardq_per_item``: the same N fresh items as N concurrent ``await
  AsyncRewardClient.score(item)`` on one event loop (coalesced into chunks), timed
  from the first call to the last result, against the cold ``rewardq`` step's wall;
* ``rewardq_stream``: one fresh ``submit`` read with ``as_completed()``: time to the
  first result against time to the last.

Every phase reports its wall time, items/s and CPU seconds per item of *our* processes
(the bench process = the producer, the worker processes, the asyncio child), read from
``/proc/<pid>/stat`` — never the judge server's; Redis' and the judge's CPU are shown
beside it, with Redis commands per item, the result delivery lag (last chunk
stored → ``result()`` returned) and the step overhead (wall minus the longest time a
worker spent scoring one of the step's items: what the pipeline adds to the judge, for a
step whose chunks the workers take at once; a larger step's chunks also wait in the
queue for judge calls to free, ``rewardq.workers.intake``).
Together they give the host's CPU bound, cores / CPU per item: on a small machine that,
not ``ideal``, is the floor the fleet meets.
Timed phases are interleaved per repeat (so load from other users of the machine hits
all of them alike), each repeat on a fresh item set, and the medians are reported.
One untimed warm-up step first opens the connection pools and builds the workers'
runtimes, as a training run's first step would.

The module runs past 600 lines on purpose: every phase must share one stack, one
clock, one CPU accounting (:meth:`Bench.measured`) and one report, and each phase is a
short method; split, the pieces would only import each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewardq.broker.errors import RewardqError
from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.stack import settings_env, stop_process

if TYPE_CHECKING:  # imported where used: `rewardq --help` must not load the client stack
    from rewardq.stack import LocalStack

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


@dataclass(frozen=True)
class BenchOptions:
    """What ``rewardq bench`` runs.

    Args:
        items: N, items per step.
        latency_ms: L, the local judge's latency.
        concurrency: C, judge calls in flight fleet-wide (and the asyncio semaphore).
        workers: W, worker processes; each gets ``C // W`` concurrent judge calls.
        repeats: timed runs per phase; medians are reported.
        sync_items: items the sequential loop actually judges (it is extrapolated to N).
        duplicate_fraction: share of the duplicates step's items that repeat another.
        log_dir: where worker logs go (``None``: discarded).
    """

    items: int = 2048
    latency_ms: float = 100.0
    concurrency: int = 256
    workers: int = 2
    repeats: int = 3
    sync_items: int = 32
    duplicate_fraction: float = 0.3
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.items < 1 or self.repeats < 1 or self.sync_items < 1 or self.workers < 1:
            raise RewardqError("items, repeats, sync items and workers must be >= 1")
        if self.concurrency < self.workers:
            raise RewardqError(f"concurrency {self.concurrency} < workers {self.workers}: "
                               "each worker process needs at least one judge slot")
        if not 0 <= self.duplicate_fraction < 1:
            raise RewardqError("duplicate fraction must be in [0, 1)")


@dataclass
class Run:
    """One timed run of one phase; CPU in seconds, per process group."""

    wall_s: float
    items: int
    failed: int = 0
    child_cpu_s: float = 0.0  #: the asyncio baseline's own process
    producer_cpu_s: float = 0.0  #: this process (``RewardClient`` or ``SyncJudge``)
    workers_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    judge_cpu_s: float = 0.0
    redis_commands: int = 0
    judge_requests: int = 0
    max_in_flight: int = 0
    delivery_ms: float = 0.0  #: last chunk's result stored -> ``result()`` returned
    #: wall minus the longest in-worker scoring of an item (``latency_ms``: its chunk's
    #: start to its verdict): submit, queue, task, result and delivery — the per-step
    #: constant the pipeline adds to the judge's own time
    overhead_ms: float = 0.0
    chunks: int = 0  #: Celery tasks enqueued
    first_result_s: float = 0.0  #: start -> first result in hand (per-item, streaming)

    @property
    def cpu_s(self) -> float:
        """CPU of our processes: the asyncio child, the producer and the workers."""
        return self.child_cpu_s + self.producer_cpu_s + self.workers_cpu_s


@dataclass
class Phase:
    """A phase's medians over its runs (``wall_s`` extrapolated to N for ``sync``).

    CPU figures are seconds per item; ``cpu_s_per_item`` is ours (producer, workers or
    asyncio child), the others break it down or show the shared services beside it.
    """

    name: str
    items: int
    wall_s: float
    items_per_s: float
    cpu_s_per_item: float
    producer_cpu_s_per_item: float = 0.0
    workers_cpu_s_per_item: float = 0.0
    redis_cpu_s_per_item: float = 0.0
    judge_cpu_s_per_item: float = 0.0
    redis_commands_per_item: float = 0.0
    judge_requests: int = 0
    max_in_flight: int = 0
    delivery_ms: float = 0.0
    overhead_ms: float = 0.0
    chunks: int = 0
    first_result_ms: float = 0.0
    failed: int = 0
    runs_wall_s: list[float] = field(default_factory=list)
    note: str = ""


def make_items(n: int, nonce: str, duplicate_fraction: float = 0.0) -> list[dict[str, Any]]:
    """``n`` item mappings; ``nonce`` makes the set's content new (a cold cache).

    With ``duplicate_fraction`` f, the first ``n - round(f·n)`` items are distinct and
    the rest repeat earlier ones' prompt and response under their own ids; the order is
    shuffled (seeded by ``nonce``) so duplicates spread through the step's chunks.
    """
    distinct = n - round(duplicate_fraction * n)
    items = []
    for i in range(n):
        k = i if i < distinct else (i * 7919) % distinct
        a, b = k % 97, k // 97
        words = " ".join(_WORDS[(k + j) % len(_WORDS)] for j in range(1 + k % 5))
        items.append({"id": f"{nonce}-{i}", "prompt": f"[{nonce}] What is {a} + {b}?",
                      "response": f"{words}. The answer is {a + b + (k % 3 == 0)}.",
                      "reference": str(a + b), "uid": f"{nonce}-{k // 8}"})
    random.Random(nonce).shuffle(items)
    return items


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from ``/proc``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _count_failed(results: Sequence[ScoreResult]) -> int:
    return sum(r.status is not ResultStatus.OK for r in results)


class AsyncioBaseline:
    """The in-process asyncio design, in a child process driven over its stdin/stdout."""

    def __init__(self, settings: Settings, concurrency: int) -> None:
        code = "from rewardq.bench import asyncio_child_main; asyncio_child_main()"
        env = settings_env(settings, {"REWARDQ_BENCH_CONCURRENCY": str(concurrency)})
        self.process = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, n: int, nonce: str) -> Run:
        """Judge ``make_items(n, nonce)`` in the child; its wall and CPU seconds."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"n": n, "nonce": nonce}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RewardqError(f"the asyncio baseline exited ({self.process.poll()})")
        reply = json.loads(line)
        return Run(wall_s=reply["wall_s"], items=n, failed=reply["failed"],
                   child_cpu_s=reply["cpu_s"])

    def close(self) -> None:
        """End the child (EOF on its stdin, then SIGTERM if it lingers)."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


def asyncio_child_main() -> None:
    """Entry point of the asyncio baseline's child process (settings from the env).

    Reads ``{"n", "nonce"}`` lines; for each, judges those items with one long-lived
    ``AsyncOpenAI`` client and a semaphore of ``REWARDQ_BENCH_CONCURRENCY``, and writes
    ``{"wall_s", "cpu_s", "failed"}``. CPU is the process's own (``process_time``).
    """
    import httpx2
    import openai

    from rewardq.broker.errors import JudgeError
    from rewardq.broker.schemas import ScoreItem
    from rewardq.judge.judge_core import (
        COMPLETIONS_PATH,
        answer_text,
        judge_request,
        judge_spec,
        judge_verdict,
        read_reply,
    )
    from rewardq.judge.rubrics import builtin_rubrics

    settings = Settings()
    rubrics = builtin_rubrics()
    spec = judge_spec(settings)
    concurrency = int(os.environ["REWARDQ_BENCH_CONCURRENCY"])

    async def main() -> None:
        client = openai.AsyncOpenAI(
            base_url=settings.judge_base_url, max_retries=2,
            api_key=settings.judge_api_key.get_secret_value(),
            timeout=settings.judge_timeout_s, http_client=openai.DefaultAioHttpClient())
        slots = asyncio.Semaphore(concurrency)

        async def judge(raw: dict[str, Any]) -> float | None:
            # The same judge core as the workers and the sync judge: request, reply, score.
            item = ScoreItem.model_validate(raw)
            body = judge_request(spec, rubrics.rubric_for(spec, item), item)
            async with slots:
                try:
                    response = await client.post(COMPLETIONS_PATH, cast_to=httpx2.Response,
                                                 body=body)
                    reply = read_reply(response.content)
                    return judge_verdict(answer_text(reply), reply.usage, reply.tokens).score
                except (openai.APIError, JudgeError):
                    return None

        loop = asyncio.get_running_loop()
        async with client:
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                request = json.loads(line)
                items = make_items(request["n"], request["nonce"])
                cpu0, t0 = time.process_time(), time.perf_counter()
                scores = await asyncio.gather(*(judge(raw) for raw in items))
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                failed = sum(s is None for s in scores)
                print(json.dumps({"wall_s": wall, "cpu_s": cpu, "failed": failed}), flush=True)

    asyncio.run(main())


class Bench:
    """The phases, run against one ``LocalStack``; CPU read from our processes' ``/proc``.

    The per-item client and its event loop live as long as the bench, as a trainer's
    would across steps; each per-item step is one ``run_until_complete`` on that loop.
    """

    def __init__(self, stack: LocalStack) -> None:
        from rewardq.producer.async_client import AsyncRewardClient
        from rewardq.producer.client import RewardClient

        self.stack = stack
        assert stack.judge is not None
        self.judge = stack.judge
        self.client = RewardClient(stack.settings)
        self.loop = asyncio.new_event_loop()
        self.async_client = AsyncRewardClient(stack.settings)
        self._pids = [p.pid for p in stack.worker_processes]
        self._redis_pid = stack.redis.process.pid if stack.redis and stack.redis.process \
            else None

    def _workers_cpu_s(self) -> float:
        return sum(proc_cpu_s(pid) for pid in self._pids)

    def _redis_cpu_s(self) -> float:
        return proc_cpu_s(self._redis_pid) if self._redis_pid else 0.0

    def _redis_commands(self) -> int:
        return int(self.client.redis.info("stats")["total_commands_processed"])

    def measured(self, action: Callable[[], Run], *, fleet: bool = True) -> Run:
        """Run ``action`` with judge stats reset; adds CPU, Redis and judge figures.

        Args:
            action: runs and times one phase (its ``child_cpu_s``: a child it drove).
            fleet: count the worker processes' CPU too (not while they sit idle).

        CPU deltas span ``action`` whole (including work outside its own clock), which
        only errs against the measured design.
        """
        self.judge.reset_stats()
        judge0 = self.judge.stats()["process_cpu_s"]
        commands0 = self._redis_commands()
        workers0 = self._workers_cpu_s() if fleet else 0.0
        producer0, redis0 = time.process_time(), self._redis_cpu_s()
        run = action()
        run.producer_cpu_s = time.process_time() - producer0
        run.redis_cpu_s = self._redis_cpu_s() - redis0
        run.workers_cpu_s = self._workers_cpu_s() - workers0 if fleet else 0.0
        run.redis_commands = self._redis_commands() - commands0 - 1  # less our own INFO
        stats = self.judge.stats()
        run.judge_cpu_s = stats["process_cpu_s"] - judge0
        run.judge_requests = int(stats["requests_total"])
        run.max_in_flight = int(stats["max_in_flight"])
        return run

    def rewardq_step(self, items: list[dict[str, Any]]) -> Run:
        """``submit`` → ``result()`` for ``items``; wall from submit to all results."""
        started = time.perf_counter()
        pending = self.client.submit(items)
        results = pending.result(timeout=self.stack.settings.chunk_deadline_s, partial=True)
        ended = time.perf_counter()
        last_stored = pending.finished_at_perf()
        judged = [r.latency_ms for r in results if not r.cached]
        return Run(wall_s=ended - started, items=len(items), failed=_count_failed(results),
                   delivery_ms=(ended - last_stored) * 1000 if last_stored else 0.0,
                   overhead_ms=(ended - started) * 1000 - max(judged) if judged else 0.0,
                   chunks=pending.chunk_count)

    def per_item_step(self, items: list[dict[str, Any]]) -> Run:
        """``items`` as concurrent ``await score(item)`` calls; wall from the first call
        to the last result, ``chunks`` the Celery tasks the coalescing client sent."""
        client = self.async_client
        timeout = self.stack.settings.chunk_deadline_s

        async def step() -> tuple[list[ScoreResult], list[float], float]:
            done_at: list[float] = []

            async def one(raw: dict[str, Any]) -> ScoreResult:
                result = await client.score(raw)
                done_at.append(time.perf_counter())
                return result

            started = time.perf_counter()
            results = await asyncio.wait_for(asyncio.gather(*(one(r) for r in items)), timeout)
            return results, done_at, started

        chunks0 = client.chunks_sent
        results, done_at, started = self.loop.run_until_complete(step())
        return Run(wall_s=max(done_at) - started, items=len(items),
                   failed=_count_failed(results), chunks=client.chunks_sent - chunks0,
                   first_result_s=min(done_at) - started)

    def stream_step(self, items: list[dict[str, Any]]) -> Run:
        """``submit`` → ``as_completed()``: wall to the last result, and to the first."""
        started = time.perf_counter()
        pending = self.client.submit(items)
        first: float | None = None
        failed = 0
        for _, result in pending.as_completed(timeout=self.stack.settings.chunk_deadline_s,
                                              partial=True):
            if first is None:
                first = time.perf_counter()
            failed += result.status is not ResultStatus.OK
        ended = time.perf_counter()
        return Run(wall_s=ended - started, items=len(items), failed=failed,
                   chunks=pending.chunk_count,
                   first_result_s=(first or ended) - started)

    def sync_step(self, items: list[dict[str, Any]]) -> Run:
        """The sequential loop over ``items``."""
        from rewardq.producer.sync_judge import SyncJudge

        with SyncJudge(self.stack.settings) as judge:
            judge.score(items[:1])  # connect outside the clock, as a long-lived loop would
            started = time.perf_counter()
            results = judge.score(items)
            wall = time.perf_counter() - started
        return Run(wall_s=wall, items=len(items), failed=_count_failed(results))

    def close(self) -> None:
        """Release the producers' connections, the per-item client's thread and loop."""
        try:
            self.loop.run_until_complete(self.async_client.aclose())
        finally:
            self.loop.close()
            self.client.close()


def summarize(name: str, runs: list[Run], *, scale_to: int | None = None,
              note: str = "") -> Phase:
    """Medians of ``runs``; ``scale_to`` extrapolates wall time linearly to that many items."""
    items = runs[0].items

    def per_item(value: Callable[[Run], float]) -> float:
        return statistics.median(value(r) / r.items for r in runs)

    wall = statistics.median(r.wall_s for r in runs)
    n = scale_to or items
    wall_n = wall * n / items
    return Phase(name=name, items=n, wall_s=wall_n, items_per_s=n / wall_n,
                 cpu_s_per_item=per_item(lambda r: r.cpu_s),
                 producer_cpu_s_per_item=per_item(lambda r: r.producer_cpu_s),
                 workers_cpu_s_per_item=per_item(lambda r: r.workers_cpu_s),
                 redis_cpu_s_per_item=per_item(lambda r: r.redis_cpu_s),
                 judge_cpu_s_per_item=per_item(lambda r: r.judge_cpu_s),
                 redis_commands_per_item=per_item(lambda r: r.redis_commands),
                 judge_requests=int(statistics.median(r.judge_requests for r in runs)),
                 max_in_flight=max(r.max_in_flight for r in runs),
                 delivery_ms=statistics.median(r.delivery_ms for r in runs),
                 overhead_ms=statistics.median(r.overhead_ms for r in runs),
                 chunks=int(statistics.median(r.chunks for r in runs)),
                 first_result_ms=statistics.median(r.first_result_s for r in runs) * 1000,
                 failed=sum(r.failed for r in runs),
                 runs_wall_s=[round(r.wall_s, 4) for r in runs], note=note)


def bench_settings(settings: Settings, options: BenchOptions) -> Settings:
    """``settings`` on the embedded stack with ``C // W`` judge calls per worker process."""
    return settings.model_copy(update={
        "redis_url": None,
        "judge_base_url": Settings.model_fields["judge_base_url"].default,
        "max_concurrent_requests": max(1, options.concurrency // options.workers),
    })


def run_bench(settings: Settings, options: BenchOptions,
              progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Start the stack, run every phase, stop everything; the report as JSON-able data.

    Raises:
        RewardqError: the stack did not start, or the asyncio child died.
    """
    from rewardq.stack import LocalStack

    n, c = options.items, options.concurrency
    base = bench_settings(settings, options)
    progress(f"starting embedded Redis, the local judge ({options.latency_ms:g} ms) and "
             f"{options.workers} workers x {base.max_concurrent_requests} judge calls ...")
    with LocalStack(base, workers=options.workers, judge_latency_ms=options.latency_ms,
                    log_dir=options.log_dir) as stack:
        bench = Bench(stack)
        baseline = AsyncioBaseline(stack.settings, c)
        try:
            warm_up = make_items(min(n, 2 * c), f"warmup-{uuid.uuid4().hex[:8]}")
            bench.rewardq_step(warm_up)
            bench.per_item_step(make_items(min(n, 2 * c), f"warmup-p-{uuid.uuid4().hex[:8]}"))
            baseline.run(min(n, 2 * c), f"warmup-{uuid.uuid4().hex[:8]}")
            progress(f"sync loop on {options.sync_items} items ...")
            sync_items = make_items(min(options.sync_items, n), f"sync-{uuid.uuid4().hex[:8]}")
            sync = [bench.measured(partial(bench.sync_step, sync_items), fleet=False)]
            runs: dict[str, list[Run]] = {
                "asyncio": [], "cold": [], "warm": [], "dup": [], "per_item": [], "stream": []}
            for r in range(options.repeats):
                progress(f"repeat {r + 1}/{options.repeats}: asyncio, rewardq cold, warm, "
                         f"per-item, {options.duplicate_fraction:.0%} duplicates, "
                         "streaming ...")
                nonce = uuid.uuid4().hex[:12]
                runs["asyncio"].append(
                    bench.measured(partial(baseline.run, n, f"a-{nonce}"), fleet=False))
                items = make_items(n, f"r-{nonce}")
                per_item = partial(bench.per_item_step, make_items(n, f"p-{nonce}"))
                # The pair alternates which goes first, so neither seat's luck (the load
                # left by the phase before) lands on one side only.
                if not r % 2:
                    runs["per_item"].append(bench.measured(per_item))
                runs["cold"].append(bench.measured(partial(bench.rewardq_step, items)))
                if r % 2:
                    runs["per_item"].append(bench.measured(per_item))
                runs["warm"].append(bench.measured(partial(bench.rewardq_step, items)))
                dups = make_items(n, f"d-{nonce}", options.duplicate_fraction)
                runs["dup"].append(bench.measured(partial(bench.rewardq_step, dups)))
                streamed = make_items(n, f"s-{nonce}")
                runs["stream"].append(bench.measured(partial(bench.stream_step, streamed)))
        finally:
            baseline.close()
            bench.close()
        settings_used = stack.settings
    return build_report(options, settings_used, sync, runs)


def build_report(options: BenchOptions, settings: Settings, sync: list[Run],
                 runs: dict[str, list[Run]]) -> dict[str, Any]:
    """Phases, ratios and configuration as one JSON-able mapping."""
    n, c = options.items, options.concurrency
    ideal_s = math.ceil(n / c) * options.latency_ms / 1000
    dup_pct = f"{options.duplicate_fraction:.0%}"
    phases = [
        Phase("ideal", n, ideal_s, n / ideal_s, 0.0, note=f"ceil(N/C)*L, C={c}"),
        summarize("sync", sync, scale_to=n,
                  note=f"extrapolated from {sync[0].items} items, one at a time"),
        summarize("asyncio", runs["asyncio"], note=f"1 process, semaphore {c}"),
        summarize("rewardq", runs["cold"], note="cold cache"),
        summarize("rewardq_warm", runs["warm"], note="same items again, all cached"),
        summarize("rewardq_dup", runs["dup"], note=f"{dup_pct} duplicates, cold"),
        summarize("rewardq_per_item", runs["per_item"],
                  note="N concurrent await score(item), cold"),
        summarize("rewardq_stream", runs["stream"], note="submit -> as_completed(), cold"),
    ]
    by_name = {p.name: p for p in phases}
    rewardq = by_name["rewardq"].wall_s
    per_item, stream = by_name["rewardq_per_item"], by_name["rewardq_stream"]
    ratios = {
        "rewardq_over_asyncio": rewardq / by_name["asyncio"].wall_s,
        "rewardq_over_ideal": rewardq / ideal_s,
        "sync_over_rewardq": by_name["sync"].wall_s / rewardq,
        "warm_ms": by_name["rewardq_warm"].wall_s * 1000,
        "per_item_over_batch": per_item.wall_s / rewardq,
    }
    # Per repeat too: each pair ran back to back, so this is the less load-sensitive one.
    pair_ratios = [p.wall_s / b.wall_s for p, b in zip(runs["per_item"], runs["cold"],
                                                        strict=True)]
    cores = os.cpu_count() or 1

    def cpu_bound(p: Phase) -> float:
        every = p.cpu_s_per_item + p.redis_cpu_s_per_item + p.judge_cpu_s_per_item
        return cores / every if every > 0 else 0.0

    return {
        "config": {
            **{k: v for k, v in asdict(options).items() if k != "log_dir"},
            "per_process_concurrency": settings.max_concurrent_requests,
            "chunk_size": settings.chunk_size,
            "worker_concurrency": settings.worker_concurrency,
            "judge_transport": settings.judge_transport,
        },
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                    "python": platform.python_version()},
        "phases": {p.name: asdict(p) for p in phases},
        "ratios": ratios,
        "per_item": {
            "wall_s": per_item.wall_s,
            "batch_wall_s": rewardq,
            "ratio": ratios["per_item_over_batch"],
            "ratio_per_repeat": [round(x, 4) for x in pair_ratios],
            "ratio_median_of_repeats": statistics.median(pair_ratios),
            "first_result_ms": per_item.first_result_ms,
            "chunks_sent": per_item.chunks,
            "chunks_expected": math.ceil(n / settings.chunk_size),
            "batch_chunks": by_name["rewardq"].chunks,
        },
        "streaming": {
            "first_result_ms": stream.first_result_ms,
            "last_result_ms": stream.wall_s * 1000,
            "chunks": stream.chunks,
        },
        # No design on this host beats cores / (CPU per item of every process involved).
        "cpu_bound_items_per_s": {name: cpu_bound(by_name[name])
                                  for name in ("asyncio", "rewardq")},
        "failed_items": sum(p.failed for p in phases),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table plus the ratios line.

    CPU columns are ms per item: ``ours`` = producer + workers (or the asyncio child),
    then the producer's share, and Redis and the judge server beside them.
    """
    header = (f"{'phase':<16} {'items':>5} {'wall s':>8} {'items/s':>8} {'ours':>6} "
              f"{'prod':>6} {'redis':>6} {'judge':>6} {'cmd/it':>6} {'reqs':>5} "
              f"{'flight':>6}  note")
    lines = ["CPU in ms per item; cmd/it: Redis commands per item; reqs: judge calls",
             header, "-" * len(header)]
    for p in report["phases"].values():
        lines.append(
            f"{p['name']:<16} {p['items']:>5} {p['wall_s']:>8.3f} {p['items_per_s']:>8.0f} "
            f"{p['cpu_s_per_item'] * 1000:>6.3f} {p['producer_cpu_s_per_item'] * 1000:>6.3f} "
            f"{p['redis_cpu_s_per_item'] * 1000:>6.3f} {p['judge_cpu_s_per_item'] * 1000:>6.3f} "
            f"{p['redis_commands_per_item']:>6.2f} {p['judge_requests']:>5} "
            f"{p['max_in_flight']:>6}  {p['note']}")
    r = report["ratios"]
    lines.append(f"rewardq/asyncio {r['rewardq_over_asyncio']:.3f}   "
                 f"rewardq/ideal {r['rewardq_over_ideal']:.3f}   "
                 f"sync/rewardq {r['sync_over_rewardq']:.1f}   warm {r['warm_ms']:.1f} ms   "
                 f"result delivery lag {report['phases']['rewardq']['delivery_ms']:.1f} ms   "
                 f"step overhead {report['phases']['rewardq']['overhead_ms']:.1f} ms "
                 f"(wall - longest in-worker scoring; with more chunks than workers "
                 f"take at once, their time in the queue too)")
    pi, st = report["per_item"], report["streaming"]
    lines.append(f"per-item/batch {pi['ratio']:.3f} (per-item {pi['wall_s']:.3f} s, batch "
                 f"{pi['batch_wall_s']:.3f} s; per repeat {pi['ratio_per_repeat']})   "
                 f"chunks sent {pi['chunks_sent']} vs ceil(N/chunk) {pi['chunks_expected']}   "
                 f"first per-item result {pi['first_result_ms']:.0f} ms")
    lines.append(f"streaming as_completed(): first result {st['first_result_ms']:.0f} ms, "
                 f"last {st['last_result_ms']:.0f} ms ({st['chunks']} chunks)")
    bound = report["cpu_bound_items_per_s"]
    lines.append(f"CPU bound of this host (cores / CPU per item, judge and Redis included): "
                 f"asyncio {bound['asyncio']:.0f} items/s, rewardq {bound['rewardq']:.0f} "
                 f"items/s; ideal {report['phases']['ideal']['items_per_s']:.0f} items/s")
    return "\n".join(lines)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``rewardq bench`` on the CLI's subparsers (``func=run``)."""
    d = BenchOptions()
    bench: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="time the fleet against ideal, sync and in-process asyncio, and "
                      "per-item awaits against one batch submit")
    bench.add_argument("--items", type=int, default=d.items, help="N, items per step")
    bench.add_argument("--latency-ms", type=float, default=d.latency_ms,
                       help="L, the local judge's latency")
    bench.add_argument("--concurrency", type=int, default=d.concurrency,
                       help="C, judge calls in flight fleet-wide (C // W per worker)")
    bench.add_argument("--workers", type=int, default=d.workers, help="W, worker processes")
    bench.add_argument("--repeats", type=int, default=d.repeats,
                       help="timed runs per phase (medians reported)")
    bench.add_argument("--json", dest="json_path", help="also write the report here")
    bench.set_defaults(func=run)
    return bench


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``rewardq bench``: print the table, write JSON; 0 when every item scored."""
    options = BenchOptions(items=args.items, latency_ms=args.latency_ms,
                           concurrency=args.concurrency, workers=args.workers,
                           repeats=args.repeats)
    report = run_bench(settings, options, progress=lambda m: print(m, flush=True))
    print(format_table(report), flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    if report["failed_items"]:
        print(f"warning: {report['failed_items']} items did not score ok", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rewardq.bench``: the same as ``rewardq bench`` (settings from the env)."""
    parser = argparse.ArgumentParser(prog="rewardq")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.func(args, Settings())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
