"""``RewardClient``: what a trainer calls to score a step's batch through the fleet.

``submit`` validates the items at the edge, answers cached pairs straight from Redis,
splits the rest into chunks (one Celery task per chunk, never per item) and returns a
``PendingScores`` handle at once, so the trainer can keep its GPU busy. The handle's
``result()`` (or ``await handle``) gives one ``ScoreResult`` per item, in input order;
``as_completed()`` gives them as their chunks finish.

Results are read in one place, :meth:`RewardClient.read_chunks` (one MGET over the
chunks' result keys), which the blocking waits here and the asyncio client
(:mod:`rewardq.producer.async_client`) both use. A wait that finds no live worker consuming the
queue says so (:class:`~rewardq.broker.errors.NoWorkersError`) within seconds instead of
sitting out its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import redis
from celery import Celery, states
from kombu.utils.url import maybe_sanitize_url
from pydantic_core import PydanticSerializationError

from rewardq.broker.app import QUEUE_JUDGE, create_app
from rewardq.broker.connections import is_redis_full, redis_client, redis_full_error
from rewardq.broker.errors import (
    BrokerUnavailableError,
    ChunksLostError,
    InvalidItemError,
    NoWorkersError,
    ScoringTimeoutError,
)
from rewardq.broker.fleet import BEAT_INTERVAL_S, chunk_size_for, fleet_counts, live_workers
from rewardq.broker.jobs import (
    ChunkMeta,
    forget_chunks,
    item_results,
    read_chunks,
    read_results_by_polling,
    send_chunks,
    visible_chunks,
    wait_for_chunk_done,
)
from rewardq.broker.keys import SUBMIT_CACHE_HITS, cache_key, judge_fingerprints
from rewardq.broker.schemas import (
    SCORE_RESULTS,
    ResultStatus,
    ScoreChunk,
    ScoreItem,
    ScoreResult,
    parse_items,
)
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import judge_spec
from rewardq.judge.rollout_view import view_items
from rewardq.judge.rubrics import rubric_book

_FIRST_POLL_S = 0.002
_MAX_POLL_S = 0.025
#: A wait fails with NoWorkersError once no live worker has consumed its queue for this
#: long (over two heartbeat periods: a worker starting, or a Redis restart that wiped
#: the beats, is not mistaken for an empty fleet), and no chunk finished meanwhile.
NO_WORKER_GRACE_S = 5.0
_WORKER_CHECK_EVERY_S = 1.0
#: A chunk Redis has not known (no queue entry, no lease, no result) for this long is
#: lost; checked every this often while a job waits.
LOST_AFTER_S = 5.0

log = logging.getLogger(__name__)



class RewardClient:
    """Submits scoring jobs to the worker fleet and hands back their results.

    Args:
        settings: Redis URL, judge model and prompt version, chunk size, deadlines.

    Results are read from Celery's Redis result backend by polling the chunks' result
    keys with one MGET per round, not by pub/sub: no subscription can miss a chunk that
    finished before it, and any number of threads may wait at once. Between rounds the
    waiter blocks on its job's "done" list (BLPOP, up to 25 ms), which a worker pushes
    to once a chunk's result is stored: a result is read as soon as it lands, not a
    poll interval later.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Results are polled (read_chunks), so sending a chunk subscribes to nothing.
        self.app: Celery = read_results_by_polling(create_app(settings))
        self.redis = redis_client(settings)
        #: The run's rubrics, loaded once here (a bad file fails the client's creation).
        self.rubrics = rubric_book(settings)
        self.spec = judge_spec(settings, self.rubrics)
        self.queue = QUEUE_JUDGE
        self._fleet_chunk_size: tuple[float, int] | None = None  # (read at, size)

    @classmethod
    def from_env(cls) -> RewardClient:
        """A client built from ``REWARDQ_*`` environment variables."""
        return cls(Settings())

    def submit(self, items: Iterable[ScoreItem | dict[str, Any]], *, step: int | None = None,
               deadline_s: float | None = None) -> PendingScores:
        """Enqueue a step's items for scoring; returns at once.

        Args:
            items: ``ScoreItem`` s or mappings with the item JSON fields.
            step: the training step, recorded with the jobs (and any dead letters).
            deadline_s: seconds after which workers stop trying; default
                ``settings.chunk_deadline_s``.

        Raises:
            InvalidItemError: some item is invalid; the message names each item and
                field, and nothing was enqueued.
            RedisFullError: Redis refused a write for memory (a ``BrokerUnavailableError``
                saying "Redis is full"); it names the first chunk not enqueued.
            BrokerUnavailableError: Redis could not be reached.
        """
        parsed = self.rubrics.assign(parse_items(items))
        # Only what the judge will see travels on: a rollout with nothing to judge is
        # answered here (no_answer), the others carry their view as their response.
        results: list[ScoreResult | None] = []
        for n, viewed in enumerate(view_items(parsed, self.spec, self.rubrics)):
            if isinstance(viewed, ScoreItem):
                parsed[n] = viewed
                results.append(None)
            else:
                results.append(viewed)
        to_judge = [i for i, result in enumerate(results) if result is None]
        # A verdict cached under the spec's fingerprint answers at once, unless the spec
        # asks for more than one plain call per item (an ensemble, group judging): the
        # workers combine those.
        lookup = to_judge and not self.spec.judges and self.spec.samples == 1 \
            and self.spec.group is None
        try:
            cached = self.redis.mget([cache_key(fp) for fp in judge_fingerprints(
                self.spec, [parsed[i] for i in to_judge])]) if lookup \
                else [None] * len(to_judge)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"cannot read the judge cache: {exc}") from exc
        misses = [i for i, value in zip(to_judge, cached, strict=True) if value is None]
        hits = [(i, value) for i, value in zip(to_judge, cached, strict=True)
                if value is not None]
        if hits:
            found = ScoreResult.from_cached_verdicts([parsed[i].id for i, _ in hits],
                                                      [v for _, v in hits])
            for (i, _), result in zip(hits, found, strict=True):
                results[i] = result
        if hits:  # operators' cache hit rate counts these too
            try:
                self.redis.incrby(SUBMIT_CACHE_HITS, len(hits))
            except redis.RedisError as exc:
                if is_redis_full(exc):
                    raise redis_full_error("cannot count cache hits (nothing enqueued)",
                                           exc, client=self.redis) from exc
                raise BrokerUnavailableError(f"cannot count cache hits: {exc}") from exc
        job_id = uuid.uuid4().hex
        deadline = time.time() + (deadline_s or self.settings.chunk_deadline_s)
        size = self.chunk_size() if misses else self.settings.chunk_size
        chunks: list[tuple[list[int], str]] = []
        # Every chunk is built and serialized before the first is sent: an item that
        # cannot become JSON fails the submit with nothing enqueued.
        messages: list[dict[str, Any]] = []
        problems: list[str] = []
        for n, start in enumerate(range(0, len(misses), size)):
            positions = misses[start:start + size]
            chunk = ScoreChunk(job_id=job_id, chunk_index=n, step=step, spec=self.spec,
                               items=[parsed[i] for i in positions], deadline=deadline)
            try:
                messages.append(chunk.model_dump(mode="json"))
            except PydanticSerializationError:
                problems += _unserializable(parsed, positions)
            chunks.append((positions, f"{job_id}-{n}"))
        if problems:
            raise InvalidItemError(problems)
        send_chunks(self.app, [([message], task_id)
                               for message, (_, task_id) in zip(messages, chunks, strict=True)])
        return PendingScores(self, parsed, results, chunks, job_id=job_id, step=step,
                             messages=dict(zip((t for _, t in chunks), messages,
                                               strict=True)))

    def score(self, items: Iterable[ScoreItem | dict[str, Any]], *, step: int | None = None,
              timeout: float | None = None) -> list[ScoreResult]:
        """``submit`` then ``result``: blocks until every item has a result."""
        return self.submit(items, step=step).result(timeout=timeout)

    def read_chunks(self, task_ids: Sequence[str]) -> dict[str, ChunkMeta]:
        """The finished chunks among ``task_ids`` and their stored results (one MGET).

        Raises:
            BrokerUnavailableError: the result backend could not be reached.
        """
        return read_chunks(self.app, self.redis, task_ids)

    def wait_for_chunks(self, job_ids: Sequence[str], timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, waking as soon as a worker announces a stored chunk
        of one of ``job_ids`` (``rewardq.broker.jobs.wait_for_chunk_done``); whether one did.
        With Redis away this is a plain sleep: the next poll reports the outage."""
        try:
            return wait_for_chunk_done(self.redis, job_ids, timeout_s)
        except redis.RedisError:
            time.sleep(timeout_s)
            return False

    def visible_chunks(self, task_ids: Sequence[str]) -> set[str] | None:
        """Which chunks Redis still knows (queued, held, or with a result); ``None`` when
        the broker is not Redis and nothing can be said."""
        return visible_chunks(self.app, self.redis, self.queue, task_ids)

    def chunk_size(self) -> int:
        """Items per chunk for the live fleet: ``settings.chunk_size``, or fewer where a
        worker makes only a few judge calls at once (``rewardq.broker.fleet.chunk_size_for``).
        Heartbeats are read at most once per beat interval; with Redis away, the
        configured size (publishing the chunks then decides the submit's fate).
        """
        now = time.monotonic()
        if self._fleet_chunk_size is None or now - self._fleet_chunk_size[0] >= BEAT_INTERVAL_S:
            try:
                beats = live_workers(self.redis, self.queue)
            except redis.RedisError:
                return self.settings.chunk_size
            self._fleet_chunk_size = (now, chunk_size_for(self.settings.chunk_size, beats))
        return self._fleet_chunk_size[1]

    def live_worker_count(self) -> int:
        """How many workers consuming this client's queue sent a heartbeat lately.

        Raises:
            BrokerUnavailableError: Redis could not be reached.
        """
        try:
            return len(live_workers(self.redis, self.queue))
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"cannot read worker heartbeats: {exc}") from exc

    def fleet_counts(self) -> tuple[int, int]:
        """``(live, starting)`` workers of this client's queue (``rewardq.broker.fleet``).

        Raises:
            BrokerUnavailableError: Redis could not be reached.
        """
        try:
            return fleet_counts(self.redis, self.queue)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"cannot read worker heartbeats: {exc}") from exc

    def close(self) -> None:
        """Release Redis connections and the Celery producer pool."""
        self.redis.close()
        self.app.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PendingScores:
    """The results of one ``submit``, some maybe already known (cache hits).

    Attributes:
        job_id: id shared by the job's chunks (task ids are ``<job_id>-<n>``).
        step: the training step given to ``submit``.
        cache_hits_at_submit: items answered from the cache without being enqueued.
    """

    def __init__(self, client: RewardClient, items: Sequence[ScoreItem],
                 results: list[ScoreResult | None], chunks: list[tuple[list[int], str]], *,
                 job_id: str, step: int | None,
                 messages: dict[str, dict[str, Any]] | None = None) -> None:
        self._client = client
        self._items = items
        self._results = results
        # task id -> item positions, until its result is read
        self._pending = {task_id: positions for positions, task_id in chunks}
        self._chunk_count = len(chunks)
        self._done_at: list[float] = []
        # positions known but not yet handed out by as_completed()
        self._fresh = [i for i, r in enumerate(results) if r is not None]
        self.job_id = job_id
        self.step = step
        self.cache_hits_at_submit = len(items) - sum(len(p) for p, _ in chunks)
        self._submitted_perf = time.perf_counter()
        self._submitted_unix = time.time()
        self._next_worker_check = time.monotonic() + _WORKER_CHECK_EVERY_S
        self._no_workers_since: float | None = None
        # task id -> its chunk JSON, to send a chunk again if Redis loses it
        self._messages = messages or {}
        self._unseen_since: dict[str, float] = {}
        self._next_loss_check = time.monotonic() + LOST_AFTER_S
        #: Chunks this job sent again because Redis had lost them.
        self.resent_chunks = 0

    @property
    def chunk_count(self) -> int:
        """How many Celery tasks this submit enqueued."""
        return self._chunk_count

    def __len__(self) -> int:
        """How many items were submitted."""
        return len(self._items)

    @property
    def pending_task_ids(self) -> list[str]:
        """Task ids of the chunks whose results have not been read yet."""
        return list(self._pending)

    def done(self) -> bool:
        """True once every chunk has finished (one Redis round trip, no waiting)."""
        self.absorb(self._client.read_chunks(self.pending_task_ids))
        return not self._pending

    def absorb(self, finished: dict[str, ChunkMeta]) -> None:
        """Take in the finished chunks among ``finished`` (others' task ids are ignored).

        The results taken in are deleted from Redis at once (``rewardq.broker.jobs.forget_chunks``,
        one UNLINK, best effort): nobody reads them again, and their memory is what a
        step leaves behind until they would expire.
        """
        taken = []
        for task_id, meta in finished.items():
            positions = self._pending.pop(task_id, None)
            if positions is None:
                continue
            taken.append(task_id)
            self._collect(positions, meta)
            self._fresh.extend(positions)
            self._no_workers_since = None  # progress: somebody is working
            if meta.get("date_done"):
                self._done_at.append(datetime.fromisoformat(meta["date_done"]).timestamp())
        forget_chunks(self._client.app, self._client.redis, taken)

    def take_fresh(self) -> list[tuple[int, ScoreResult]]:
        """The ``(position, result)`` pairs that arrived since the last call."""
        fresh, self._fresh = self._fresh, []
        return [(i, r) for i in fresh if (r := self._results[i]) is not None]

    def check_health(self) -> None:
        """While chunks wait, make sure they can still finish: some worker consumes the
        queue (checked every second), and Redis still knows every
        chunk (checked every few seconds; a lost chunk is sent again, with a warning).

        Raises:
            NoWorkersError: chunks are pending and no live worker has consumed the queue
                for ``NO_WORKER_GRACE_S`` (a worker process still starting, announced
                by its ``starting`` beat, is waited for).
            ChunksLostError: Redis lost chunks and ``settings.reenqueue_lost_chunks`` is
                off.
            BrokerUnavailableError: Redis could not be reached.
        """
        now = time.monotonic()
        if self._pending and now >= self._next_worker_check:
            self._next_worker_check = now + _WORKER_CHECK_EVERY_S
            if any(self._client.fleet_counts()):  # a live worker, or one still starting
                self._no_workers_since = None
            elif self._no_workers_since is None:
                self._no_workers_since = now
            elif now - self._no_workers_since >= NO_WORKER_GRACE_S:
                raise NoWorkersError(
                    f"no rewardq worker is consuming queue {self._client.queue!r} on "
                    f"{maybe_sanitize_url(self._client.settings.broker_url)}: "
                    f"{len(self._pending)} chunk(s) of job {self.job_id} are waiting. "
                    f"Start one with `rewardq worker` (same REWARDQ_REDIS_URL); the "
                    f"chunks stay queued and run once one is up.")
        if self._pending and now >= self._next_loss_check:
            self._next_loss_check = now + LOST_AFTER_S / 2
            self._recover_lost(now)

    def _recover_lost(self, now: float) -> None:
        pending = self.pending_task_ids
        visible = self._client.visible_chunks(pending)
        if visible is None:
            return
        lost = []
        for task_id in pending:
            if task_id in visible:
                self._unseen_since.pop(task_id, None)
            elif now - self._unseen_since.setdefault(task_id, now) >= LOST_AFTER_S:
                lost.append(task_id)
        if not lost:
            return
        items = sum(len(self._pending[t]) for t in lost)
        what = (f"job {self.job_id}: Redis lost {len(lost)} chunk(s) ({items} items): "
                f"in no queue, held by no worker and without a result for "
                f"{LOST_AFTER_S:.0f}s (did Redis restart without its data?)")
        if not self._client.settings.reenqueue_lost_chunks or any(
                t not in self._messages for t in lost):
            raise ChunksLostError(f"{what}; re-enqueueing is off (REWARDQ_REENQUEUE_LOST_"
                                  f"CHUNKS=false): data loss")
        send_chunks(self._client.app, [([self._messages[t]], t) for t in lost])
        for task_id in lost:
            self._unseen_since.pop(task_id, None)
        self.resent_chunks += len(lost)
        log.warning("%s; sent them again (verdicts already cached are reused)", what)

    def result(self, timeout: float | None = None, *, partial: bool = False
               ) -> list[ScoreResult]:
        """One result per submitted item, in input order.

        Args:
            timeout: seconds to wait; ``None`` waits for as long as it takes.
            partial: on timeout, return what is done and mark the rest ``timeout``
                instead of raising (late results still land in the cache).

        Raises:
            ScoringTimeoutError: ``timeout`` passed and ``partial`` is false.
            NoWorkersError: chunks are pending and no live worker consumes the queue
                for ``NO_WORKER_GRACE_S`` (5 s) while no chunk finished.
            ChunksLostError: Redis lost chunks and re-enqueueing them is off; lost
                chunks are otherwise sent again and the wait goes on.
            BrokerUnavailableError: the result backend stayed unreachable for
                ``settings.redis_retry_s`` (or until ``timeout``); shorter outages, such
                as a Redis restart, are waited out.
        """
        for _ in self._wait(timeout, partial=partial):
            pass
        return self._final()

    def as_completed(self, timeout: float | None = None, *, partial: bool = False
                     ) -> Iterator[tuple[int, ScoreResult]]:
        """``(position, result)`` pairs as their chunks finish; cache hits come first.

        Every position is yielded exactly once. Args and errors as :meth:`result`; with
        ``partial``, the items still pending at the timeout are yielded last as
        ``timeout`` results.
        """
        yield from self.take_fresh()
        for _ in self._wait(timeout, partial=partial):
            yield from self.take_fresh()
        yield from self.take_fresh()
        final = self._final()
        for i in range(len(final)):
            if self._results[i] is None:
                yield i, final[i]

    def _wait(self, timeout: float | None, *, partial: bool) -> Iterator[None]:
        """Poll until done (yielding after each round that found something) or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = _FIRST_POLL_S
        outage_since: float | None = None
        while True:
            try:
                before = len(self._pending)
                if self.done():
                    return
                if len(self._pending) < before:
                    yield
                self.check_health()
                outage_since = None
            except BrokerUnavailableError:
                # Redis restarting or failing over: keep polling for a while, then give up.
                now = time.monotonic()
                outage_since = outage_since or now
                if deadline is not None and now >= deadline and partial:
                    return
                patience = self._client.settings.redis_retry_s
                if now - outage_since >= patience or (deadline is not None and now >= deadline):
                    raise
                interval = _MAX_POLL_S * 10
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if not partial:
                    raise ScoringTimeoutError(
                        f"job {self.job_id}: {len(self._pending)} of {self._chunk_count} "
                        f"chunk(s) still pending after {timeout}s")
                return
            pause = interval if left is None else min(interval, left)
            if outage_since is None:  # woken early by a worker that stored a chunk
                self._client.wait_for_chunks([self.job_id], pause)
            else:
                time.sleep(pause)
            interval = min(interval * 1.5, _MAX_POLL_S)

    def _final(self) -> list[ScoreResult]:
        return [r if r is not None else ScoreResult.failure(
                    self._items[i].id, ResultStatus.TIMEOUT,
                    "no result before the caller's timeout")
                for i, r in enumerate(self._results)]

    def _collect(self, positions: list[int], meta: ChunkMeta) -> None:
        if meta["status"] == states.SUCCESS:
            # One validation pass per chunk, not a model_validate call per item.
            for i, result in zip(positions, SCORE_RESULTS.validate_python(item_results(meta)),
                                 strict=True):
                self._results[i] = result
            return
        error = meta.get("result")
        if isinstance(error, dict):
            error = f"{error.get('exc_type')}: {error.get('exc_message')}"
        for i in positions:
            self._results[i] = ScoreResult.failure(
                self._items[i].id, ResultStatus.FAILED, f"chunk task failed: {error}")

    def finished_at_perf(self) -> float | None:
        """When the last chunk's result was stored, on ``time.perf_counter``'s clock.

        ``None`` until every chunk is done, and when nothing was enqueued.
        """
        if self._pending or not self._done_at:
            return None
        return self._submitted_perf + (max(self._done_at) - self._submitted_unix)

    def __await__(self) -> Generator[Any, None, list[ScoreResult]]:
        return asyncio.to_thread(self.result).__await__()


def _unserializable(items: Sequence[ScoreItem], positions: Sequence[int]) -> list[str]:
    """One problem per item among ``positions`` that cannot be serialized to JSON."""
    problems = []
    for i in positions:
        try:
            items[i].model_dump(mode="json")
        except PydanticSerializationError as exc:
            problems.append(f"item {i} (id={items[i].id!r}): field 'metadata': not JSON "
                            f"serializable: {exc}")
    return problems
