"""``RewardClient``: what a trainer calls to score a step's batch through the fleet.

``submit`` validates the items at the edge, answers cached pairs straight from Redis,
splits the rest into chunks (one Celery task per chunk, never per item) and returns a
``PendingScores`` handle at once, so the trainer can keep its GPU busy. The handle's
``result()`` (or ``await handle``) gives one ``ScoreResult`` per item, in input order.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Sequence
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult, ResultSet

from broker.app import TASK_SCORE_CHUNK, create_app
from broker.errors import BrokerUnavailableError, ScoringTimeoutError
from broker.keys import cache_key, judge_fingerprint
from broker.schemas import (
    JudgeSpec,
    JudgeVerdict,
    ResultStatus,
    ScoreChunk,
    ScoreItem,
    ScoreResult,
    parse_items,
)
from broker.settings import Settings


class RewardClient:
    """Submits scoring jobs to the worker fleet and hands back their results.

    Args:
        settings: Redis URL, judge model and prompt version, chunk size, deadlines.

    One client per trainer process; it is thread-safe, but waits are serialized because
    the result backend's pub/sub connection is not (one consumer per process).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: Celery = create_app(settings)
        self._redis = redis.Redis.from_url(settings.broker_url, socket_timeout=10,
                                           socket_connect_timeout=5)
        self.spec = JudgeSpec(model=settings.judge_model,
                              prompt_version=settings.judge_prompt_version,
                              temperature=settings.judge_temperature,
                              max_tokens=settings.judge_max_tokens)
        self.wait_lock = threading.Lock()

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
            BrokerUnavailableError: Redis could not be reached.
        """
        parsed = parse_items(items)
        fingerprints = [judge_fingerprint(self.spec, item) for item in parsed]
        results: list[ScoreResult | None] = [None] * len(parsed)
        try:
            cached = self._redis.mget([cache_key(fp) for fp in fingerprints]) if parsed else []
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"cannot read the judge cache: {exc}") from exc
        misses: list[int] = []
        for i, (item, value) in enumerate(zip(parsed, cached, strict=True)):
            if value is None:
                misses.append(i)
            else:
                results[i] = ScoreResult.from_verdict(
                    item.id, JudgeVerdict.model_validate_json(value), cached=True)
        job_id = uuid.uuid4().hex
        deadline = time.time() + (deadline_s or self.settings.chunk_deadline_s)
        size = self.settings.chunk_size
        chunks: list[tuple[list[int], AsyncResult]] = []
        try:
            for n, start in enumerate(range(0, len(misses), size)):
                positions = misses[start:start + size]
                chunk = ScoreChunk(job_id=job_id, chunk_index=n, step=step, spec=self.spec,
                                   items=[parsed[i] for i in positions], deadline=deadline)
                handle = self.app.send_task(TASK_SCORE_CHUNK,
                                            args=[chunk.model_dump(mode="json")],
                                            task_id=f"{job_id}-{n}")
                chunks.append((positions, handle))
        except Exception as exc:  # kombu raises its own and redis' connection errors
            if isinstance(exc, (redis.RedisError, ConnectionError, OSError)):
                raise BrokerUnavailableError(f"cannot enqueue scoring jobs: {exc}") from exc
            raise
        return PendingScores(self, parsed, results, chunks, job_id=job_id, step=step)

    def score(self, items: Iterable[ScoreItem | dict[str, Any]], *, step: int | None = None,
              timeout: float | None = None) -> list[ScoreResult]:
        """``submit`` then ``result``: blocks until every item has a result."""
        return self.submit(items, step=step).result(timeout=timeout)

    def close(self) -> None:
        """Release Redis connections and the Celery producer pool."""
        self._redis.close()
        self.app.close()


class PendingScores:
    """The results of one ``submit``, some maybe already known (cache hits).

    Attributes:
        job_id: id shared by the job's chunks (task ids are ``<job_id>-<n>``).
        step: the training step given to ``submit``.
        cache_hits_at_submit: items answered from the cache without being enqueued.
    """

    def __init__(self, client: RewardClient, items: Sequence[ScoreItem],
                 results: list[ScoreResult | None],
                 chunks: list[tuple[list[int], AsyncResult]], *, job_id: str,
                 step: int | None) -> None:
        self._client = client
        self._items = items
        self._results = results
        self._chunks = chunks
        self.job_id = job_id
        self.step = step
        self.cache_hits_at_submit = len(items) - sum(len(p) for p, _ in chunks)
        self._submitted_perf = time.perf_counter()
        self._submitted_unix = time.time()

    @property
    def chunk_count(self) -> int:
        """How many Celery tasks this submit enqueued."""
        return len(self._chunks)

    def done(self) -> bool:
        """True once every chunk has finished (without waiting)."""
        return all(handle.ready() for _, handle in self._chunks)

    def result(self, timeout: float | None = None, *, partial: bool = False
               ) -> list[ScoreResult]:
        """One result per submitted item, in input order.

        Args:
            timeout: seconds to wait; ``None`` waits until the chunks' deadline.
            partial: on timeout, return what is done and mark the rest ``timeout``
                instead of raising (late results still land in the cache).

        Raises:
            ScoringTimeoutError: ``timeout`` passed and ``partial`` is false.
            BrokerUnavailableError: the result backend could not be reached.
        """
        pending = [handle for _, handle in self._chunks if not handle.ready()]
        if pending:
            with self._client.wait_lock:
                try:
                    ResultSet(pending, app=self._client.app).join_native(
                        timeout=timeout, propagate=False)
                except TimeoutError as exc:
                    if not partial:
                        raise ScoringTimeoutError(
                            f"job {self.job_id}: {len(pending)} chunk(s) pending after "
                            f"{timeout}s") from exc
                except redis.RedisError as exc:
                    raise BrokerUnavailableError(f"result backend unreachable: {exc}") from exc
        for positions, handle in self._chunks:
            self._collect(positions, handle)
        return [r if r is not None else ScoreResult.failure(
                    self._items[i].id, ResultStatus.TIMEOUT,
                    "no result before the caller's timeout")
                for i, r in enumerate(self._results)]

    def _collect(self, positions: list[int], handle: AsyncResult) -> None:
        if self._results[positions[0]] is not None or not handle.ready():
            return
        if handle.successful():
            for i, raw in zip(positions, handle.result, strict=True):
                self._results[i] = ScoreResult.model_validate(raw)
        else:
            error = f"chunk task failed: {handle.result!r}"
            for i in positions:
                self._results[i] = ScoreResult.failure(self._items[i].id, ResultStatus.FAILED,
                                                       error)

    def finished_at_perf(self) -> float | None:
        """When the last chunk's result was stored, on ``time.perf_counter``'s clock.

        ``None`` until every chunk is done, and when nothing was enqueued.
        """
        stamps = [handle.date_done for _, handle in self._chunks]
        if not stamps or any(s is None for s in stamps):
            return None
        last = max(s.timestamp() for s in stamps if s is not None)
        return self._submitted_perf + (last - self._submitted_unix)

    def __await__(self) -> Generator[Any, None, list[ScoreResult]]:
        return asyncio.to_thread(self.result).__await__()
