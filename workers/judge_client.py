"""The async judge client: a thin I/O shell around the one judge core (``broker.judge_core``).

One ``JudgeClient`` per worker process, living on the process's asyncio loop, holding
one ``AsyncOpenAI`` client (and so one connection pool) reused across tasks. The SDK's
own retries are off (``max_retries=0``): ``workers.retry`` is the one layer that retries.
SDK errors become transient or permanent ``JudgeError`` s by ``broker.verdicts.classify``,
the one classification the sync judge shares. Before each call the fleet-wide rate
limiter (when ``REWARDQ_JUDGE_RPM``/``TPM`` are set) admits it, and after it the
reply's token usage is reconciled with the estimate that was debited.

With several base URLs (``Settings.judge_endpoints``) there is one ``AsyncOpenAI``
client per endpoint and ``workers.endpoints.EndpointPool`` routes each call (fewest in
flight, a circuit breaker per endpoint); a call that finds its endpoint down fails over
at once to another inside the same call, before ``workers.retry`` sees an error. With
one base URL the call goes straight to its client, as it always did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

import httpx2
import openai
import redis.asyncio as aioredis

from broker.errors import BrokerUnavailableError, UnparseableReplyError
from broker.judge_core import (
    COMPLETIONS_PATH,
    TokenLogprob,
    judge_request,
    judge_verdict,
    read_reply,
)
from broker.rubrics import RubricBook, builtin_rubrics
from broker.schemas import JudgeSpec, JudgeVerdict, ScoreItem, Usage
from broker.settings import Settings
from broker.verdicts import classify
from monitoring.costs import PriceTable
from monitoring.metrics import WorkerMetrics, call_status
from workers.budget import FleetBudget, Unbudgeted
from workers.endpoints import Endpoint, EndpointPool, is_endpoint_failure
from workers.rate_limit import RateLimit, RedisRateLimiter, estimate_tokens

log = logging.getLogger(__name__)


def _openai_client(settings: Settings, base_url: str) -> openai.AsyncOpenAI:
    http_client = openai.DefaultAioHttpClient() if settings.judge_transport == "aiohttp" \
        else None
    return openai.AsyncOpenAI(base_url=base_url,
                              api_key=settings.judge_api_key.get_secret_value(),
                              timeout=settings.judge_timeout_s, max_retries=0,
                              http_client=http_client)


class TimedReply(NamedTuple):
    """A chat completion's reply (``broker.judge_core.ChatReply``) and how long it took."""

    content: str | None
    usage: Usage
    tokens: tuple[TokenLogprob, ...] | None
    latency_s: float


class JudgeClient:
    """Calls an OpenAI-compatible chat-completions endpoint and reads a score back.

    Args:
        settings: endpoint, key, transport, timeout, rate limits, per-process concurrency.
        redis: the worker's asyncio Redis client (holds the fleet-wide rate-limit state).
        metrics: where calls, tokens, cost and rate-limit waits are counted.
        prices: the price table for cost accounting.
        rubrics: the run's rubrics (``broker.rubrics.rubric_book``); built-in by default.
        budget: the fleet-wide judge budget every call reserves from (none: unlimited).
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None,
                 metrics: WorkerMetrics | None = None, prices: PriceTable | None = None,
                 rubrics: RubricBook | None = None, budget: FleetBudget | None = None
                 ) -> None:
        self._rubrics = rubrics or builtin_rubrics()
        endpoints = settings.judge_endpoints
        # One client (one connection pool) per endpoint; the first alone when there is one.
        self._clients = [_openai_client(settings, url) for url in endpoints]
        self._client = self._clients[0]
        self._slots = asyncio.Semaphore(settings.max_concurrent_requests)
        self._metrics = metrics or WorkerMetrics()
        self._pool = None if len(endpoints) == 1 else EndpointPool(
            endpoints, failures=settings.judge_breaker_failures,
            cooldown_s=settings.judge_breaker_cooldown_s, metrics=self._metrics)
        self._prices = prices or PriceTable.from_settings(settings)
        self._limit = RateLimit.from_settings(settings)
        self._redis = redis
        self._limiters: dict[str, RedisRateLimiter] = {}
        self._budget: FleetBudget | Unbudgeted = budget or Unbudgeted()

    def _limiter(self, model: str) -> RedisRateLimiter | None:
        if self._limit.unlimited or self._redis is None:
            return None
        if model not in self._limiters:
            self._limiters[model] = RedisRateLimiter(self._redis, model, self._limit)
        return self._limiters[model]

    async def judge(self, spec: JudgeSpec, item: ScoreItem) -> JudgeVerdict:
        """One judge call for ``item`` (no retries, no cache).

        Raises:
            TransientJudgeError: rate limit, timeout, 408/409/5xx or a network error.
            PermanentJudgeError: any other HTTP error.
            UnparseableReplyError: the reply holds no readable score.
            RubricMismatchError: this worker's rubric for the item is not the producer's.
            BrokerUnavailableError: the rate limiter could not reach Redis before the
                call (an outage: the task scores the chunk again).
        """
        rubric = self._rubrics.rubric_for(spec, item)  # RubricMismatchError: no call made
        reply = await self.complete(spec.model, judge_request(spec, rubric, item),
                                    spec.max_tokens)
        try:
            verdict = judge_verdict(reply.content, reply.usage, reply.tokens,
                                    mode=rubric.score_mode_for(spec), scale=rubric.scale)
        except UnparseableReplyError as error:
            self._metrics.judge_call(spec.model, call_status(error), reply.latency_s)
            raise
        self._metrics.judge_call(spec.model, "ok", reply.latency_s)
        return verdict

    async def complete(self, model: str, body: dict[str, Any], max_tokens: int) -> TimedReply:
        """One chat-completions call with ``body``, however its verdict is read: every
        kind of judge call (one item, a group, a pair) goes through here, so through
        the concurrency slots, the fleet-wide rate limiter and the usage accounting.

        The caller reads the reply and counts the call as ``ok`` (or unparseable) in
        ``metrics.judge_call``; a call that fails here is counted here.

        Raises:
            TransientJudgeError, PermanentJudgeError: as :meth:`judge`.
            BudgetExceededError: the fleet-wide judge budget (``workers.budget``) cannot
                cover the call's worst case; it was not made.
            BrokerUnavailableError: the rate limiter or the budget could not reach Redis
                before the call. After the call, a failed token reconcile or budget
                settle is logged, never raised: the reply is kept.
        """
        limiter = self._limiter(model)
        estimate = estimate_tokens(body["messages"], max_tokens)
        async with self._slots:
            if limiter is not None:
                self._metrics.rate_limited(await limiter.acquire(estimate))
            # BudgetExceededError: the call is not made (its item: budget_exceeded).
            hold = await self._budget.reserve(model, body, max_tokens)
            started = time.perf_counter()
            try:
                # The raw route: the SDK's per-call transform of the params (TypedDict
                # introspection) and pydantic parse of the reply cost more client CPU
                # than the HTTP exchange itself (issue 5: 1.7 -> 0.9 ms per call).
                if self._pool is None:
                    response = await self._client.post(COMPLETIONS_PATH,
                                                       cast_to=httpx2.Response, body=body)
                else:
                    response = await self._routed_post(self._pool, model, body)
            except openai.APIError as exc:
                await hold.release()
                error = classify(exc)
                self._metrics.judge_call(model, call_status(error),
                                         time.perf_counter() - started)
                raise error from exc
            except BaseException:
                await hold.release()
                raise
            latency_s = time.perf_counter() - started
        reply = read_reply(response.content)
        await hold.settle(reply.usage, model)
        usage = reply.usage or Usage()
        if limiter is not None and reply.usage is not None:
            await self._reconcile(limiter, estimate, usage)
        self._metrics.usage(model, usage.prompt_tokens, usage.completion_tokens,
                            self._prices.cost(model, usage.prompt_tokens,
                                              usage.completion_tokens))
        return TimedReply(reply.content, usage, reply.tokens, latency_s)

    async def _reconcile(self, limiter: RedisRateLimiter, estimate: int, usage: Usage) -> None:
        # The verdict is paid for: a Redis blip here must not cost a second judge call.
        # Left uncorrected, the token limit keeps the estimate, which reserves the whole
        # max_tokens for the reply and so errs on the safe side.
        try:
            await limiter.reconcile(estimate, usage.prompt_tokens + usage.completion_tokens)
        except BrokerUnavailableError as exc:
            log.warning("token usage not reconciled with the rate limiter (%s); it keeps "
                        "the estimate of %d tokens", exc, estimate)

    async def _routed_post(self, pool: EndpointPool, model: str,
                           body: dict[str, Any]) -> httpx2.Response:
        """The raw POST on the endpoint with the fewest calls in flight; a call that finds
        its endpoint down (:func:`~workers.endpoints.is_endpoint_failure`) goes on at once
        to another live one, each endpoint tried at most once.

        Raises:
            NoEndpointError: every breaker is open (transient: the item is retried).
            openai.APIError: the last endpoint tried failed (the caller classifies it).
        """
        tried: list[Endpoint] = []
        endpoint = pool.acquire()
        if endpoint is None:
            raise pool.unavailable_error()
        while True:
            started = time.perf_counter()
            try:
                response: httpx2.Response = await self._clients[endpoint.index].post(
                    COMPLETIONS_PATH, cast_to=httpx2.Response, body=body)
            except openai.APIError as exc:
                error = classify(exc)
                failure = is_endpoint_failure(error)
                status = call_status(error)
                pool.release(endpoint, status, failure=failure)
                tried.append(endpoint)
                following = pool.acquire(exclude=tried) if failure else None
                if following is None:
                    raise
                # This request is over; the caller counts only the last one.
                self._metrics.judge_call(model, status, time.perf_counter() - started)
                self._metrics.endpoint_failover(endpoint.label)
                endpoint = following
                continue
            except BaseException as exc:  # no answer either way: the breaker learns nothing
                status = "cancelled" if isinstance(exc, asyncio.CancelledError) else "other"
                pool.release(endpoint, status, failure=None)
                raise
            pool.release(endpoint, "ok", failure=False)
            return response

    async def close(self) -> None:
        """Close the connection pools."""
        for client in self._clients:
            await client.close()

