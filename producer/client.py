"""``RewardClient``: what a trainer calls to score a step's batch through the fleet.

``submit`` validates the items at the edge, answers cached pairs straight from Redis,
splits the rest into chunks (one Celery task per chunk, never per item) and returns a
``PendingScores`` handle at once, so the trainer can keep its GPU busy. The handle's
``result()`` (or ``await handle``) gives one ``ScoreResult`` per item, in input order.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Generator, Iterable, Sequence
from datetime import datetime
from typing import Any

import redis
from celery import Celery, states

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

_FIRST_POLL_S = 0.002
_MAX_POLL_S = 0.025


class RewardClient:
    """Submits scoring jobs to the worker fleet and hands back their results.

    Args:
        settings: Redis URL, judge model and prompt version, chunk size, deadlines.

    Results are read from Celery's Redis result backend by polling the chunks' result
    keys with one MGET per round (a few ms apart), not by pub/sub: no subscription can
    miss a chunk that finished before it, and any number of threads may wait at once.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: Celery = create_app(settings)
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=10,
                                           socket_connect_timeout=5)
        self.spec = JudgeSpec(model=settings.judge_model,
                              prompt_version=settings.judge_prompt_version,
                              temperature=settings.judge_temperature,
                              max_tokens=settings.judge_max_tokens)

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
            cached = self.redis.mget([cache_key(fp) for fp in fingerprints]) if parsed else []
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
        chunks: list[tuple[list[int], str]] = []
        try:
            for n, start in enumerate(range(0, len(misses), size)):
                positions = misses[start:start + size]
                chunk = ScoreChunk(job_id=job_id, chunk_index=n, step=step, spec=self.spec,
                                   items=[parsed[i] for i in positions], deadline=deadline)
                task_id = f"{job_id}-{n}"
                self.app.send_task(TASK_SCORE_CHUNK, args=[chunk.model_dump(mode="json")],
                                   task_id=task_id)
                chunks.append((positions, task_id))
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
                 job_id: str, step: int | None) -> None:
        self._client = client
        self._items = items
        self._results = results
        # task id -> item positions, until its result is read
        self._pending = {task_id: positions for positions, task_id in chunks}
        self._chunk_count = len(chunks)
        self._done_at: list[float] = []
        self.job_id = job_id
        self.step = step
        self.cache_hits_at_submit = len(items) - sum(len(p) for p, _ in chunks)
        self._submitted_perf = time.perf_counter()
        self._submitted_unix = time.time()

    @property
    def chunk_count(self) -> int:
        """How many Celery tasks this submit enqueued."""
        return self._chunk_count

    def done(self) -> bool:
        """True once every chunk has finished (one Redis round trip, no waiting)."""
        self._poll()
        return not self._pending

    def result(self, timeout: float | None = None, *, partial: bool = False
               ) -> list[ScoreResult]:
        """One result per submitted item, in input order.

        Args:
            timeout: seconds to wait; ``None`` waits for as long as it takes.
            partial: on timeout, return what is done and mark the rest ``timeout``
                instead of raising (late results still land in the cache).

        Raises:
            ScoringTimeoutError: ``timeout`` passed and ``partial`` is false.
            BrokerUnavailableError: the result backend stayed unreachable for
                ``settings.redis_retry_s`` (or until ``timeout``); shorter outages, such
                as a Redis restart, are waited out.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = _FIRST_POLL_S
        outage_since: float | None = None
        while True:
            try:
                if self.done():
                    break
                outage_since = None
            except BrokerUnavailableError:
                # Redis restarting or failing over: keep polling for a while, then give up.
                now = time.monotonic()
                outage_since = outage_since or now
                if deadline is not None and now >= deadline and partial:
                    break
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
                break
            time.sleep(interval if left is None else min(interval, left))
            interval = min(interval * 1.5, _MAX_POLL_S)
        return [r if r is not None else ScoreResult.failure(
                    self._items[i].id, ResultStatus.TIMEOUT,
                    "no result before the caller's timeout")
                for i, r in enumerate(self._results)]

    def _poll(self) -> None:
        if not self._pending:
            return
        backend = self._client.app.backend
        task_ids = list(self._pending)
        try:
            raws = self._client.redis.mget([backend.get_key_for_task(t) for t in task_ids])
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"result backend unreachable: {exc}") from exc
        for task_id, raw in zip(task_ids, raws, strict=True):
            if raw is None:
                continue
            meta = backend.decode_result(raw)
            if meta["status"] not in states.READY_STATES:
                continue
            self._collect(self._pending.pop(task_id), meta)
            if meta.get("date_done"):
                self._done_at.append(datetime.fromisoformat(meta["date_done"]).timestamp())

    def _collect(self, positions: list[int], meta: dict[str, Any]) -> None:
        if meta["status"] == states.SUCCESS:
            for i, raw in zip(positions, meta["result"], strict=True):
                self._results[i] = ScoreResult.model_validate(raw)
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
