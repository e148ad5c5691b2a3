"""Score items through the fleet until each is scored or has failed for good, within a
deadline: what every scoring endpoint of the gateway answers with.

A worker retries a judge call a few times (``REWARDQ_JUDGE_MAX_ATTEMPTS``, about a second
and a half in all), then answers the item ``failed``. A judge outage of a few seconds
outlasts that, and a remote-RM client cannot wait it out itself: OpenRLHF spends its 5
tries, 1 s apart, and trains on a ``None``. So the gateway sends such items to the fleet
again, in rounds with a growing pause between them (:data:`FIRST_PAUSE_S` doubling up to
:data:`MAX_PAUSE_S`, with jitter), for as long as the request's deadline allows, and
answers only when every item is final:

- **final**: ``ok``; ``no_answer`` (the rollout has nothing to judge); ``invalid``;
  ``budget_exceeded``; ``failed`` for a permanent reason: the judge refused the request
  (4xx other than 408/409/429), a reply without a readable score after the worker's
  attempts, a rubric mismatch, an internal error.
- **transient**, sent again: ``failed`` because the judge answered 408, 409, 429 or 5xx,
  timed out, could not be reached or had every endpoint's circuit breaker open;
  ``timeout`` (a chunk deadline passed); no live worker (the round waits for one);
  Redis unreachable or a chunk lost with it.

What is still transient at the deadline comes back as ``timeout`` (its error names the
last failure). A round re-sent after a failure judges only what failed: verdicts that
succeeded are in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from rewardq.broker.errors import (
    BrokerUnavailableError,
    ChunksLostError,
    InvalidItemError,
    NoWorkersError,
    RewardqError,
)
from rewardq.broker.schemas import ResultStatus, ScoreItem, ScoreResult
from rewardq.producer.async_client import AsyncRewardClient
from rewardq.producer.client import PendingScores

#: Pause before the second round of an item; it doubles each round up to MAX_PAUSE_S.
FIRST_PAUSE_S = 1.0
MAX_PAUSE_S = 8.0
#: Requests of at most this many items are scored item by item, so concurrent requests
#: share chunks (one-rollout remote-RM requests); larger ones are submitted as a batch.
PER_ITEM_MAX = 8
#: How often a round that found no live worker looks for one.
WORKER_POLL_S = 1.0

#: Failures of a judge call worth another round: the error texts ``rewardq.judge.verdicts`` and
#: the workers' endpoint pool write for them.
_TRANSIENT_ERROR = re.compile(
    r"(?:^|: )(?:judge answered HTTP (?:408|409|429|5\d\d)\b|judge timed out|"
    r"judge unreachable|no judge endpoint available)")


def is_transient(result: ScoreResult) -> bool:
    """Whether ``result`` may well be ``ok`` if its item is sent again."""
    status = ResultStatus(result.status)
    if status is ResultStatus.TIMEOUT:
        return True
    if status is ResultStatus.FAILED:
        return bool(_TRANSIENT_ERROR.search(result.error or ""))
    return False


@dataclass
class Unscored:
    """An item still waiting for a final result, and why it is not final yet.

    Attributes:
        index: the item's position in the request.
        reason: the last failure, as ``<status or error class>: <message>``.
        no_workers: no live worker consumed the queue.
        broker: Redis could not be reached (or lost the item's chunk).
    """

    index: int
    reason: str
    no_workers: bool = False
    broker: bool = False


@dataclass
class Progress:
    """What one request's scoring has done so far (for its stream's lines and metrics).

    Attributes:
        chunks: chunks submitted for it as batches (per-item scores share theirs).
        cache_hits: items its first batch submit answered from the cache.
        expired: why each item that timed out at the deadline was not final.
    """

    chunks: int = 0
    cache_hits: int = 0
    expired: dict[int, Unscored] = field(default_factory=dict)
    _rounds: int = 0
    _pending: PendingScores | None = None

    def pending_chunks(self) -> int:
        """Chunks of the current batch round still being judged."""
        return len(self._pending.pending_task_ids) if self._pending is not None else 0

    def submitted(self, pending: PendingScores) -> None:
        """Record a batch round's submit."""
        if not self._rounds:
            self.cache_hits = pending.cache_hits_at_submit
        self._rounds += 1
        self.chunks += pending.chunk_count
        self._pending = pending


class FleetScorer:
    """Final results per item within a deadline (see the module docstring).

    Args:
        client: the gateway's fleet client.
        has_workers: returns whether a live worker consumes the queue (blocking: it is
            run on a thread).
        on_rescore: called with the number of items sent to the fleet again.
        on_chunks: called with the number of chunks each batch submit enqueued.
    """

    def __init__(self, client: AsyncRewardClient, has_workers: Callable[[], bool], *,
                 on_rescore: Callable[[int], None] = lambda n: None,
                 on_chunks: Callable[[int], None] = lambda n: None) -> None:
        self.client = client
        self._has_workers = has_workers
        self._on_rescore = on_rescore
        self._on_chunks = on_chunks
        self._workers_back: asyncio.Future[None] | None = None

    async def results(self, items: Sequence[ScoreItem], deadline: float, *,
                      step: int | None = None, progress: Progress | None = None,
                      ) -> AsyncIterator[tuple[int, ScoreResult]]:
        """``(index, result)`` of every item once its result is final, or ``timeout`` at
        ``deadline`` (a ``time.monotonic()`` value).

        Args:
            progress: filled as it goes (chunks, cache hits, why items expired).
        """
        progress = progress if progress is not None else Progress()
        todo = list(range(len(items)))
        reasons: dict[int, Unscored] = {}
        pause = FIRST_PAUSE_S
        while todo:
            failed: list[Unscored] = []
            async for index, outcome in self._round(items, todo, deadline, step, progress):
                if isinstance(outcome, ScoreResult):
                    yield index, outcome
                else:
                    failed.append(outcome)
            reasons.update((u.index, u) for u in failed)
            todo = [u.index for u in failed]
            if not todo or time.monotonic() >= deadline:
                break
            if all(u.no_workers for u in failed):
                await self._wait_for_workers(deadline)
            else:
                await asyncio.sleep(min(random.uniform(pause / 2, pause),
                                        max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, MAX_PAUSE_S)
            if time.monotonic() >= deadline:
                break
            self._on_rescore(len(todo))
        for index in todo:
            progress.expired[index] = reasons[index]
            yield index, _expired(items[index], reasons[index].reason)

    async def _round(self, items: Sequence[ScoreItem], todo: list[int], deadline: float,
                     step: int | None, progress: Progress
                     ) -> AsyncIterator[tuple[int, ScoreResult | Unscored]]:
        """One pass of ``todo`` through the fleet: final results, and what to send again."""
        if len(todo) <= PER_ITEM_MAX:
            rounds = self._per_item(items, todo, deadline, step)
        else:
            rounds = self._batch(items, todo, deadline, step, progress)
        async for index, outcome in rounds:
            if isinstance(outcome, ScoreResult) and is_transient(outcome):
                yield index, Unscored(index, f"{ResultStatus(outcome.status).value}: "
                                              f"{outcome.error}")
            else:
                yield index, outcome

    async def _per_item(self, items: Sequence[ScoreItem], todo: list[int], deadline: float,
                        step: int | None
                        ) -> AsyncIterator[tuple[int, ScoreResult | Unscored]]:
        tasks = {asyncio.ensure_future(self.client.score(items[i], step=step)): i
                 for i in todo}
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for task in done:
                    yield tasks[task], _outcome(items[tasks[task]], tasks[task], task)
        finally:
            for task in pending:
                task.cancel()
        for task in pending:
            yield tasks[task], Unscored(tasks[task], "no result yet")

    async def _batch(self, items: Sequence[ScoreItem], todo: list[int], deadline: float,
                     step: int | None, progress: Progress
                     ) -> AsyncIterator[tuple[int, ScoreResult | Unscored]]:
        left = set(todo)
        reason, no_workers, broker = "no result yet", False, False
        try:
            pending = await self.client.submit([items[i] for i in todo], step=step)
            progress.submitted(pending)
            self._on_chunks(pending.chunk_count)
            async with asyncio.timeout_at(_loop_time(deadline)):
                async for position, result in self.client.as_completed(pending):
                    index = todo[position]
                    left.discard(index)
                    yield index, result
        except TimeoutError:
            pass
        except NoWorkersError as exc:
            reason, no_workers = f"no_workers: {exc}", True
        except (BrokerUnavailableError, ChunksLostError) as exc:
            reason, broker = f"{type(exc).__name__}: {exc}", True
        for index in sorted(left):
            yield index, Unscored(index, reason, no_workers, broker)

    async def _wait_for_workers(self, deadline: float) -> None:
        """Until a live worker consumes the queue, or ``deadline``; one poll for every
        request that waits."""
        if self._workers_back is None or self._workers_back.done():
            self._workers_back = asyncio.ensure_future(self._poll_workers())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._workers_back),
                                   max(0.0, deadline - time.monotonic()))

    async def _poll_workers(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self._has_workers):
                    return
            except RewardqError:
                pass
            await asyncio.sleep(WORKER_POLL_S)


def _outcome(item: ScoreItem, index: int, task: asyncio.Future[ScoreResult]
             ) -> ScoreResult | Unscored:
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, NoWorkersError):
        return Unscored(index, f"no_workers: {exc}", no_workers=True)
    if isinstance(exc, BrokerUnavailableError | ChunksLostError):
        return Unscored(index, f"{type(exc).__name__}: {exc}", broker=True)
    if isinstance(exc, InvalidItemError):
        return ScoreResult.failure(item.id, ResultStatus.INVALID, str(exc))
    if isinstance(exc, Exception):
        return ScoreResult.failure(item.id, ResultStatus.FAILED,
                                   f"internal error: {type(exc).__name__}: {exc}")
    raise exc


def _expired(item: ScoreItem, reason: str) -> ScoreResult:
    return ScoreResult.failure(item.id, ResultStatus.TIMEOUT,
                               f"not scored before the request's deadline; last: {reason}")


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
