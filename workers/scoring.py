"""Scoring one chunk: cache, in-flight dedup, judge calls with retries; all async.

Runs on the worker process's asyncio loop (see ``rewardq.workers.bridge``). A chunk's
fingerprints are claimed in one Redis call: cached ones answer at once, owned ones are
judged here, busy ones (another process is judging them) wait for that verdict. Within
the process, every fingerprint has at most one ``asyncio.Task`` resolving it, which
duplicates in the same or in other chunks join. One item's failure never takes its
chunk down: it becomes a ``failed`` or ``timeout`` result carrying its error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from rewardq.broker.connections import is_outage
from rewardq.broker.errors import JudgeError, JudgeErrorKind
from rewardq.broker.keys import judge_fingerprints
from rewardq.broker.schemas import (
    JudgeSpec,
    JudgeVerdict,
    ResultStatus,
    ScoreChunk,
    ScoreItem,
    ScoreResult,
)
from rewardq.judge.rubrics import RubricBook, builtin_rubrics
from rewardq.monitoring.metrics import WorkerMetrics, call_status
from rewardq.workers.cache import Claim, ClaimState, JudgeCache
from rewardq.workers.ensembles import aggregate, ensemble_members
from rewardq.workers.logs import RetryStormLog
from rewardq.workers.retry import RetryPolicy, decide

if TYPE_CHECKING:
    from rewardq.workers.group_judging import GroupJudging

log = logging.getLogger(__name__)


class Judge(Protocol):
    """What the scorer needs from a judge: one call, no retries, no cache."""

    async def judge(self, spec: JudgeSpec, item: ScoreItem) -> JudgeVerdict: ...


@dataclass(frozen=True)
class Outcome:
    """A verdict and how it was obtained (``attempts`` = judge calls made for it)."""

    verdict: JudgeVerdict
    attempts: int
    cached: bool


class JudgeFailed(Exception):
    """An item's judge calls failed for good (carries the attempts made)."""

    def __init__(self, error: JudgeError, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


class ChunkScorer:
    """Scores chunks for one worker process.

    Args:
        judge: makes one judge call.
        cache: verdict cache and in-flight locks.
        policy: retry limits and backoff.
        metrics: where cache lookups, dedup waits and retries are counted.
        rubrics: the run's rubrics: items that name none get theirs before fingerprinting,
            as the producer does.
        groups: judges the chunks whose spec has a ``group`` (GRPO groups judged
            together, ``rewardq.workers.group_judging``).
    """

    def __init__(self, judge: Judge, cache: JudgeCache, policy: RetryPolicy,
                 metrics: WorkerMetrics | None = None, *,
                 rubrics: RubricBook | None = None,
                 groups: GroupJudging | None = None) -> None:
        self._judge = judge
        self._rubrics = rubrics or builtin_rubrics()
        self._metrics = metrics or WorkerMetrics()
        self._cache = cache
        self._policy = policy
        self._resolving: dict[str, asyncio.Task[Outcome]] = {}
        self._storms = RetryStormLog()
        self._groups = groups

    async def score(self, chunk: ScoreChunk) -> list[ScoreResult]:
        """One result per item of ``chunk``, in order.

        An ensemble (``spec.judges`` or ``spec.samples > 1``) scores the items once per
        judge call kind, each with its own cache entries and dedup, and aggregates them.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, chunk.deadline - time.time())
        items = [item if item.rubric is not None
                 else item.model_copy(update={"rubric": self._rubrics.select(item)})
                 for item in chunk.items]
        if chunk.spec.group is not None:  # GRPO groups, judged together
            if self._groups is None:
                raise ValueError("a chunk for group judging reached a scorer without groups")
            return await self._groups.score(chunk.model_copy(update={"items": items}))
        members = ensemble_members(chunk.spec)
        if len(members) == 1:
            return await self._score_items(chunk.spec, items, deadline)
        per_member = await asyncio.gather(*(
            self._score_items(spec, items, deadline, suffix) for _, spec, suffix in members))
        labels = [label for label, _, _ in members]
        return [aggregate(chunk.spec.aggregate, labels, list(results))
                for results in zip(*per_member, strict=True)]

    async def _score_items(self, spec: JudgeSpec, items: list[ScoreItem], deadline: float,
                           suffix: str = "") -> list[ScoreResult]:
        """One result per item, judged by ``spec``'s one model; ``suffix`` tells an
        ensemble's repeated samples apart in the cache.

        One task per fingerprint resolves it (judges it, or waits for the process judging
        it); the chunk waits for all of them at once, until ``deadline``. A task still
        running then is not cancelled: it goes on and caches its verdict, and its items
        become ``timeout`` results.

        Raises:
            rewardq.broker.connections.OUTAGE_ERRORS: Redis went away (or was full: any error
                ``rewardq.broker.connections.is_outage`` names) while an item was resolved (raised
                as soon as one is seen: the task scores the chunk again, joining the
                tasks still running).
        """
        loop = asyncio.get_running_loop()
        fingerprints = [fp + suffix for fp in judge_fingerprints(spec, items)]
        first_item = dict(zip(fingerprints, items, strict=True))
        token = uuid.uuid4().hex
        # Snapshot before awaiting anything: a task that finishes meanwhile stays joinable.
        joined = {fp: self._resolving[fp] for fp in fingerprints if fp in self._resolving}
        to_claim = [fp for fp in dict.fromkeys(fingerprints) if fp not in joined]
        claims = dict(zip(to_claim, await self._cache.claim(to_claim, token), strict=True))
        hits = sum(1 for c in claims.values() if c.state is ClaimState.CACHED)
        self._metrics.cache_lookup(hits, len(claims) - hits)
        owners: dict[str, asyncio.Task[Outcome]] = {}
        for fp, claim in claims.items():
            if claim.state is ClaimState.CACHED:
                continue
            task = loop.create_task(self._resolve(spec, first_item[fp], fp, claim,
                                                  token, deadline))
            self._resolving[fp] = task
            task.add_done_callback(partial(self._forget, fp))
            owners[fp] = task
        started = loop.time()
        tasks = [*owners.values(), *joined.values()]
        finished_at = await _wait_until(tasks, deadline)
        _raise_outage(tasks)
        now = loop.time()
        results: list[ScoreResult] = []
        seen: set[str] = set()
        for item, fp in zip(items, fingerprints, strict=True):
            found = claims.get(fp)
            if found is not None and found.verdict is not None:
                results.append(ScoreResult.from_verdict(item.id, found.verdict, cached=True))
                continue
            owner = fp in owners and fp not in seen
            seen.add(fp)
            if not owner:
                self._metrics.dedup_wait()
            task = owners.get(fp) or joined[fp]
            ms = (finished_at.get(task, now) - started) * 1000
            results.append(self._result(item, task, owner, ms))
        return results

    def _forget(self, fingerprint: str, task: asyncio.Task[Outcome]) -> None:
        if self._resolving.get(fingerprint) is task:
            del self._resolving[fingerprint]
        if not task.cancelled():
            task.exception()  # retrieved: one nobody waits for any more is not logged

    def _result(self, item: ScoreItem, task: asyncio.Task[Outcome], owner: bool,
                ms: float) -> ScoreResult:
        """``item``'s result from the task that resolved its fingerprint (a ``timeout``
        if it is still running); a failure costs this item only."""
        if not task.done():
            log.warning("item %r timed out: its chunk's deadline passed before the judge "
                        "answered", item.id)
            return ScoreResult.failure(item.id, ResultStatus.TIMEOUT,
                                       "deadline passed before the judge answered",
                                       latency_ms=ms)
        if task.cancelled():
            raise asyncio.CancelledError  # the loop is shutting down: not an item's fault
        exc = task.exception()
        if exc is None:
            outcome = task.result()
            if owner:
                return ScoreResult.from_verdict(item.id, outcome.verdict,
                                                cached=outcome.cached,
                                                attempts=outcome.attempts, latency_ms=ms)
            return ScoreResult.from_verdict(item.id, outcome.verdict, cached=True,
                                            latency_ms=ms)
        if isinstance(exc, JudgeFailed):
            if exc.error.kind is JudgeErrorKind.BUDGET:
                # Not judged, on purpose: the refusals are counted in the budget's metrics
                # and dead-lettered; a WARNING each would flood a run that ran out.
                log.debug("item %r not judged: %s", item.id, exc.error)
                return ScoreResult.failure(item.id, ResultStatus.BUDGET_EXCEEDED,
                                           str(exc.error), attempts=0, latency_ms=ms)
            if owner:
                log.warning("item %r failed for good after %d attempt(s): %s", item.id,
                            exc.attempts, exc.error)
            return ScoreResult.failure(item.id, ResultStatus.FAILED, str(exc.error),
                                       attempts=exc.attempts if owner else 0, latency_ms=ms)
        if isinstance(exc, TimeoutError):
            log.warning("item %r timed out: its chunk's deadline passed before the judge "
                        "answered", item.id)
            return ScoreResult.failure(item.id, ResultStatus.TIMEOUT,
                                       "deadline passed before the judge answered",
                                       latency_ms=ms)
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: not an item's failure
        # A bug must cost one item, not its chunk.
        log.error("scoring item %r failed", item.id, exc_info=exc)
        return ScoreResult.failure(item.id, ResultStatus.FAILED,
                                   f"internal error: {type(exc).__name__}: {exc}",
                                   latency_ms=ms)

    async def _resolve(self, spec: JudgeSpec, item: ScoreItem, fingerprint: str,
                       claim: Claim, token: str, deadline: float) -> Outcome:
        """Judge ``fingerprint`` if we own it, else wait for its owner (or take over)."""
        loop = asyncio.get_running_loop()
        while True:
            if claim.state is ClaimState.CACHED and claim.verdict is not None:
                return Outcome(claim.verdict, 0, cached=True)
            if claim.state is ClaimState.OWNED:
                return await self._judge_owned(spec, item, fingerprint, token, deadline)
            self._metrics.dedup_wait()  # another process is judging it: wait for that
            verdict = await self._cache.wait_for_owner(fingerprint, deadline)
            if verdict is not None:
                return Outcome(verdict, 0, cached=True)
            if loop.time() >= deadline:
                raise TimeoutError
            # The owner vanished without a verdict (failed or died): try to take over.
            claim = (await self._cache.claim([fingerprint], token))[0]

    async def _judge_owned(self, spec: JudgeSpec, item: ScoreItem, fingerprint: str,
                           token: str, deadline: float) -> Outcome:
        stored = False
        try:
            verdict, attempts = await self._judge_with_retries(spec, item, fingerprint, token,
                                                               deadline)
            await self._cache.store(fingerprint, verdict, token)
            stored = True
            return Outcome(verdict, attempts, cached=False)
        finally:
            if not stored:
                await asyncio.shield(self._cache.release_lock(fingerprint, token))

    async def _judge_with_retries(self, spec: JudgeSpec, item: ScoreItem, fingerprint: str,
                                  token: str, deadline: float) -> tuple[JudgeVerdict, int]:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            if loop.time() >= deadline:
                raise TimeoutError  # a chunk redelivered too late: no call nobody awaits
            attempt += 1
            try:
                return await self._judge.judge(spec, item), attempt
            except JudgeError as exc:
                decision = decide(self._policy, exc, attempt, deadline - loop.time())
                if not decision.retry:
                    raise JudgeFailed(exc, attempt) from exc
                self._metrics.retry(call_status(exc))
                self._storms.retried(call_status(exc))
            # The cache renews our lock while we back off (see ``JudgeCache``).
            await asyncio.sleep(decision.delay_s)


def _raise_outage(tasks: Sequence[asyncio.Task[Outcome]]) -> None:
    """Raise the first Redis outage (``rewardq.broker.connections.is_outage``) among the finished
    ``tasks``: Redis is away or full (the rate limiter's and the budget's scripts
    included), so the task scores the chunk again."""
    for task in tasks:
        if task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None and is_outage(exc):
                raise exc


async def _wait_until(tasks: Sequence[asyncio.Task[Outcome]], deadline: float
                      ) -> dict[asyncio.Task[Outcome], float]:
    """Wait until every task of ``tasks`` is done, one of them failed with a Redis outage
    (``rewardq.broker.connections.is_outage``: nothing more can be stored), or ``deadline`` (loop
    time) passed.

    One future, one timer and one callback per task, for the whole chunk; no task is
    cancelled. Returns when each finished task did (loop time; the call's start for those
    done before it), without the tasks still running.
    """
    loop = asyncio.get_running_loop()
    now = loop.time()
    finished_at = {task: now for task in tasks if task.done()}
    running = [task for task in tasks if not task.done()]
    if not running or now >= deadline:
        return finished_at
    woken: asyncio.Future[None] = loop.create_future()
    left = len(running)

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    def on_done(task: asyncio.Task[Outcome]) -> None:
        nonlocal left
        finished_at[task] = loop.time()
        left -= 1
        if left == 0 or (not task.cancelled() and is_outage(task.exception())):
            wake()

    for task in running:
        task.add_done_callback(on_done)
    timer = loop.call_at(deadline, wake)
    try:
        await woken
    finally:
        timer.cancel()
        for task in running:
            task.remove_done_callback(on_done)
    return finished_at
