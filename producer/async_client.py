"""``AsyncRewardClient``: await one item's score from any asyncio code.

verl's reward loop, TRL's async reward functions, agent frameworks and ``rewardq
serve`` ask for rewards one sample at a time, concurrently. Sending each as its own
Celery task would make the broker the bottleneck, so concurrent calls are coalesced
the way a DataLoader batches loads: items that arrive within ``window_s`` of the first
(or until ``chunk_size`` of them) go out together as one ``RewardClient.submit``, and
each await returns as soon as its own chunk is done. Cached pairs come back from that
submit without being enqueued. An item that only the submit can find invalid (metadata
that is no JSON) fails its own await alone: a coalesced submit refused for it is sent
again one item at a time, so the items that met it are scored as if it had not been there.

Nothing here blocks the event loop: Redis work (the cache lookup and enqueueing of a
submit, the one MGET per poll round over every outstanding chunk) runs on one
dedicated thread, and waiting between rounds blocks on the jobs' "done" lists on a
second one (woken as soon as a worker stores a chunk). One poller task per client
serves every outstanding submit.

A client belongs to one event loop at a time; used from a new loop (a second
``asyncio.run``), it starts afresh there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rewardq.broker.errors import (
    BrokerUnavailableError,
    InvalidItemError,
    NoWorkersError,
    RewardqError,
    ScoringTimeoutError,
)
from rewardq.broker.schemas import ScoreItem, ScoreResult, parse_items
from rewardq.broker.settings import Settings
from rewardq.producer.client import PendingScores, RewardClient

__all__ = ["DEFAULT_WINDOW_S", "AsyncRewardClient"]

#: How long the first item of a batch waits for others to join it.
DEFAULT_WINDOW_S = 0.005
_FIRST_POLL_S = 0.002
_MAX_POLL_S = 0.025
#: How often the poller runs the outstanding submits' health checks (no live worker,
#: chunks lost by Redis).
_HEALTH_CHECK_S = 0.5

T = TypeVar("T")


@dataclass
class _Batch:
    """Items waiting to be submitted together, with the futures of their callers."""

    items: list[ScoreItem] = field(default_factory=list)
    futures: list[asyncio.Future[ScoreResult]] = field(default_factory=list)
    step: int | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Loop:
    """Per-event-loop state: the open batch, outstanding submits, the poller."""

    loop: asyncio.AbstractEventLoop
    batch: _Batch = field(default_factory=_Batch)
    waiting: dict[PendingScores, list[asyncio.Future[ScoreResult]]] = field(
        default_factory=dict)
    poller: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    next_health_check: float = 0.0
    flushes: set[asyncio.Task[None]] = field(default_factory=set)


class AsyncRewardClient:
    """Per-item and batch scoring through the worker fleet, for asyncio code.

    Args:
        settings: as for :class:`~rewardq.producer.client.RewardClient`; ``chunk_size`` is also
            the coalescing batch size.
        window_s: how long the first item of a batch waits for more before the batch
            is sent (a few ms: long enough for a burst of concurrent calls to meet,
            short against a judge call).
        client: a ``RewardClient`` to send through (default: one built and owned here).

    Example::

        async with AsyncRewardClient(Settings()) as rq:
            results = await asyncio.gather(*(rq.score(item) for item in items))
    """

    def __init__(self, settings: Settings, *, window_s: float = DEFAULT_WINDOW_S,
                 client: RewardClient | None = None) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.settings = settings
        self.window_s = window_s
        self._owns_client = client is None
        self.client = client if client is not None else RewardClient(settings)
        # One thread for every blocking Redis call: submits keep their order, and no
        # redis-py PubSub or pipeline is ever shared across threads.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardq-io")
        # Waiting between poll rounds blocks (BLPOP) on threads of its own, so that it
        # never holds up a submit on the I/O thread, nor one waiter another (the poller
        # and each ``as_completed`` wait at once).
        self._waiter = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rewardq-wait")
        self._state: _Loop | None = None
        #: Celery tasks (chunks) this client has enqueued, for tests and metrics.
        self.chunks_sent = 0

    # ------------------------------------------------------------------ public API

    async def score(self, item: ScoreItem | Mapping[str, Any], *,
                    step: int | None = None) -> ScoreResult:
        """The judge's result for one item, coalesced with concurrent calls.

        Args:
            item: a ``ScoreItem`` or a mapping with the item JSON fields.
            step: the training step recorded with the chunk (the first item's step
                names a coalesced chunk).

        Returns:
            Its result; a rollout with no final answer to show the judge (empty, or
            its thinking never closed) is ``no_answer``, without a judge call.

        Raises:
            InvalidItemError: the item is invalid (nothing is enqueued for it; the
                items coalesced with it are scored all the same).
            NoWorkersError: no live worker consumes the queue.
            BrokerUnavailableError: Redis stayed unreachable.
        """
        [parsed] = self.client.rubrics.assign(parse_items([item]))
        state = self._loop_state()
        future: asyncio.Future[ScoreResult] = state.loop.create_future()
        batch = state.batch
        if not batch.items:
            batch.step = step
            batch.timer = state.loop.call_later(self.window_s, self._flush, state)
        batch.items.append(parsed)
        batch.futures.append(future)
        if len(batch.items) >= self.settings.chunk_size:
            self._flush(state)
        return await future

    async def score_many(self, items: Iterable[ScoreItem | Mapping[str, Any]], *,
                         step: int | None = None) -> list[ScoreResult]:
        """One result per item, in input order (all items validated first)."""
        parsed = parse_items(items)
        return list(await asyncio.gather(*(self.score(item, step=step) for item in parsed)))

    async def submit(self, items: Iterable[ScoreItem | Mapping[str, Any]], *,
                     step: int | None = None) -> PendingScores:
        """``RewardClient.submit`` without blocking the loop; pair it with
        :meth:`as_completed` or :meth:`result`."""
        materialized = list(items)
        pending: PendingScores = await self.run_blocking(self.client.submit, materialized,
                                                         step=step)
        return pending

    async def as_completed(self, pending: PendingScores, timeout: float | None = None
                           ) -> AsyncIterator[tuple[int, ScoreResult]]:
        """``(position, result)`` pairs of a submit as their chunks finish.

        Raises:
            ScoringTimeoutError: ``timeout`` passed before every chunk finished.
            NoWorkersError: chunks wait and no live worker consumes the queue.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for pair in pending.take_fresh():
            yield pair
        interval = _FIRST_POLL_S
        while pending.pending_task_ids:
            finished = await self.run_blocking(self.client.read_chunks, pending.pending_task_ids)
            pending.absorb(finished)
            fresh = pending.take_fresh()
            for pair in fresh:
                yield pair
            if not pending.pending_task_ids:
                break
            await self.run_blocking(pending.check_health)
            if deadline is not None and time.monotonic() >= deadline:
                raise ScoringTimeoutError(
                    f"job {pending.job_id}: {len(pending.pending_task_ids)} of "
                    f"{pending.chunk_count} chunk(s) still pending after {timeout}s")
            interval = _FIRST_POLL_S if fresh else min(interval * 1.5, _MAX_POLL_S)
            await self._pause([pending], interval)

    async def result(self, pending: PendingScores, timeout: float | None = None
                     ) -> list[ScoreResult]:
        """Every result of a submit, in input order, without blocking the loop."""
        results: list[ScoreResult | None] = [None] * len(pending)
        async for i, result in self.as_completed(pending, timeout=timeout):
            results[i] = result
        return [r for r in results if r is not None]

    async def aclose(self) -> None:
        """Send what is batched, stop polling, release Redis and the thread."""
        state = self._state
        try:
            if state is not None and state.loop is asyncio.get_running_loop():
                if state.batch.items:
                    self._flush(state)
                if state.flushes:
                    await asyncio.gather(*state.flushes, return_exceptions=True)
                if state.poller is not None:
                    state.poller.cancel()
                    await _stopped(state.poller)
        finally:
            self._state = None
            self.close()

    def close(self) -> None:
        """Release the thread and, if this client built it, the ``RewardClient``."""
        self._io.shutdown(wait=False, cancel_futures=True)
        self._waiter.shutdown(wait=False, cancel_futures=True)
        if self._owns_client:
            self.client.close()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _loop_state(self) -> _Loop:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _Loop(loop=loop)
        return self._state

    async def run_blocking(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking call (Redis) on this client's I/O thread, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, lambda: fn(*args, **kwargs))

    async def _pause(self, pendings: list[PendingScores], timeout_s: float) -> None:
        """Until a worker announces a stored chunk of one of ``pendings``, or
        ``timeout_s`` (``RewardClient.wait_for_chunks``), without blocking the loop."""
        if not pendings:
            await asyncio.sleep(timeout_s)
            return
        loop = asyncio.get_running_loop()
        job_ids = [p.job_id for p in pendings]
        await loop.run_in_executor(
            self._waiter, lambda: self.client.wait_for_chunks(job_ids, timeout_s))

    def _flush(self, state: _Loop) -> None:
        """Send the open batch (called by its timer, or when it is full)."""
        batch = state.batch
        if not batch.items:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        state.batch = _Batch()
        task = state.loop.create_task(self._send(state, batch))
        state.flushes.add(task)
        task.add_done_callback(state.flushes.discard)

    async def _send(self, state: _Loop, batch: _Batch) -> None:
        try:
            pending: PendingScores = await self.run_blocking(
                self.client.submit, batch.items, step=batch.step)
        except InvalidItemError as exc:
            if len(batch.items) == 1:
                _fail(batch.futures, exc)
                return
            # One item spoiled the coalesced submit: each alone, so it fails by itself.
            for item, future in zip(batch.items, batch.futures, strict=True):
                await self._send(state, _Batch(items=[item], futures=[future],
                                               step=batch.step))
            return
        except Exception as exc:  # each caller gets the error of its own submit
            _fail(batch.futures, exc)
            return
        self.chunks_sent += pending.chunk_count
        state.waiting[pending] = batch.futures
        self._deliver(state, pending)
        if pending.pending_task_ids:
            if state.poller is None or state.poller.done():
                state.poller = state.loop.create_task(self._poll(state))
            state.wake.set()

    def _deliver(self, state: _Loop, pending: PendingScores) -> None:
        futures = state.waiting[pending]
        for i, result in pending.take_fresh():
            if not futures[i].done():
                futures[i].set_result(result)
        if not pending.pending_task_ids:
            del state.waiting[pending]

    async def _poll(self, state: _Loop) -> None:
        """One MGET per round over every outstanding chunk of this loop."""
        interval = _FIRST_POLL_S
        outage_since: float | None = None
        while True:
            if not state.waiting:
                state.wake.clear()
                await state.wake.wait()
                interval = _FIRST_POLL_S
            pendings = list(state.waiting)
            task_ids = [t for p in pendings for t in p.pending_task_ids]
            try:
                finished = await self.run_blocking(_read_and_absorb, self.client, pendings,
                                                   task_ids)
                outage_since = None
            except BrokerUnavailableError as exc:
                now = time.monotonic()
                outage_since = outage_since or now
                if now - outage_since >= self.settings.redis_retry_s:
                    for p in pendings:
                        _fail(state.waiting.pop(p), exc)
                await asyncio.sleep(_MAX_POLL_S * 10)
                continue
            for p in pendings:
                self._deliver(state, p)
            if state.waiting and time.monotonic() >= state.next_health_check:
                # One round trip checks every outstanding submit (each throttles itself).
                state.next_health_check = time.monotonic() + _HEALTH_CHECK_S
                failures = await self.run_blocking(_check_health, list(state.waiting))
                for p, error in failures.items():
                    _fail(state.waiting.pop(p, ()), error)
            interval = _FIRST_POLL_S if finished else min(interval * 1.5, _MAX_POLL_S)
            await self._pause(list(state.waiting), interval)


def _read_and_absorb(client: RewardClient, pendings: list[PendingScores],
                     task_ids: list[str]) -> dict[str, Any]:
    """On the Redis thread: read the finished chunks (one MGET) and take them in, which
    deletes their results from Redis (one UNLINK): neither round trip on the event loop."""
    finished = client.read_chunks(task_ids)
    for pending in pendings:
        pending.absorb(finished)
    return finished


async def _stopped(task: asyncio.Task[None]) -> None:
    """Wait for a cancelled ``task`` to end. Its own cancellation is swallowed; one of the
    caller's (Ctrl-C cancelling ``asyncio.run``'s main task meanwhile) is not, or the
    interrupt would be lost and the program would carry on."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def _check_health(pendings: list[PendingScores]) -> dict[PendingScores, RewardqError]:
    """Run on the I/O thread: each submit's health check, and who failed it. No live
    worker fails them all (they share the queue); a Redis outage is waited out by the
    result reads instead."""
    failures: dict[PendingScores, RewardqError] = {}
    for p in pendings:
        try:
            p.check_health()
        except BrokerUnavailableError:
            break
        except NoWorkersError as exc:
            return dict.fromkeys(pendings, exc)
        except RewardqError as exc:
            failures[p] = exc
    return failures


def _fail(futures: Iterable[asyncio.Future[T]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
