"""Per-process worker resources: the asyncio bridge and what lives on its loop.

Built lazily on a process's first task (after Celery forked or started its pool), torn
down at worker shutdown: one loop thread, one ``JudgeClient`` (its HTTP sessions, one
per judge endpoint), one asyncio Redis client and one ``ChunkScorer``, shared by every
greenlet of the process.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis

from rewardq.broker.connections import async_redis_client
from rewardq.broker.schemas import ScoreChunk, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.judge.rubrics import rubric_book
from rewardq.monitoring.costs import PriceTable
from rewardq.monitoring.metrics import WorkerMetrics
from rewardq.workers.bridge import AsyncioBridge
from rewardq.workers.budget import FleetBudget, in_step
from rewardq.workers.cache import JudgeCache
from rewardq.workers.group_judging import GroupJudging
from rewardq.workers.judge_client import JudgeClient
from rewardq.workers.retry import RetryPolicy
from rewardq.workers.scoring import ChunkScorer


class WorkerRuntime:
    """Everything one worker process shares across its tasks.

    Args:
        settings: the worker's settings (judge endpoint, key, limits, Redis URL).
    """

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        #: Loaded here, at worker start: a bad rubrics file stops the worker with its error.
        self.rubrics = rubric_book(settings)
        self.metrics = metrics or WorkerMetrics()
        self.bridge = AsyncioBridge()
        self._scorer: ChunkScorer | None = None
        self._judge: JudgeClient | None = None
        self._redis: aioredis.Redis | None = None
        self._cache: JudgeCache | None = None

    def score(self, chunk: ScoreChunk, timeout_s: float) -> list[ScoreResult]:
        """Score ``chunk`` on the loop thread; cooperative for the calling greenlet.

        Raises:
            TimeoutError: the chunk took longer than ``timeout_s``.
            rewardq.broker.connections.OUTAGE_ERRORS: Redis went away mid-chunk (the task
                scores the chunk again once it is back).
        """
        scorer = self._scorer or self.bridge.run(self._build(), timeout=30)
        # The step is the chunk's, for the judge budget of each call it makes.
        return self.bridge.run(in_step(chunk.step, scorer.score(chunk), chunk.deadline),
                               timeout=timeout_s)

    async def _build(self) -> ChunkScorer:
        # Runs on the loop thread, so the clients bind to the loop that will use them.
        if self._scorer is None:
            s = self.settings
            # Blocking pool: hundreds of coroutines share a bounded set of connections.
            self._redis = async_redis_client(s, max_connections=64)
            prices = PriceTable.from_settings(s)
            self._judge = JudgeClient(s, self._redis, self.metrics, prices, self.rubrics,
                                      budget=FleetBudget.from_settings(s, self._redis, prices))
            # Locks are renewed while held (see ``JudgeCache``), so their TTL only bounds
            # how long a dead worker's locks keep others waiting.
            self._cache = JudgeCache(self._redis, ttl_s=s.cache_ttl_s,
                                     lock_ttl_ms=int(s.inflight_lock_ttl_s * 1000),
                                     max_memory_ratio=s.cache_max_memory_ratio)
            policy = RetryPolicy(max_attempts=s.judge_max_attempts)
            groups = GroupJudging(self._judge, self._redis, policy, self.metrics,
                                  cache_ttl_s=s.cache_ttl_s,
                                  lease_ms=int(s.inflight_lock_ttl_s * 1000),
                                  max_memory_ratio=s.cache_max_memory_ratio)
            self._scorer = ChunkScorer(self._judge, self._cache, policy, self.metrics,
                                       rubrics=self.rubrics, groups=groups)
        return self._scorer

    def close(self) -> None:
        """Close the clients and stop the loop thread."""
        if self._scorer is not None:
            # Blocking wait on purpose: at shutdown the gevent hub may no longer switch.
            future = asyncio.run_coroutine_threadsafe(self._close(), self.bridge.loop)
            with contextlib.suppress(Exception):
                future.result(timeout=10)
        self.bridge.close()

    async def _close(self) -> None:
        if self._cache is not None:
            await self._cache.close()
        if self._judge is not None:
            await self._judge.close()
        if self._redis is not None:
            await self._redis.aclose()
        self._scorer = None
