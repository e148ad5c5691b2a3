"""The async judge client: a thin I/O shell around the one judge core
(``rewardq.judge.judge_core``).

One ``JudgeClient`` per worker process, living on the process's asyncio loop, holding
one HTTP transport per judge endpoint (and so one connection pool each) reused across
tasks. Before each call the fleet-wide rate limiter (when ``REWARDQ_JUDGE_RPM``/``TPM``
are set) admits it, and after it the reply's token usage is reconciled with the
estimate that was debited. Nothing below retries: ``rewardq.workers.retry`` is the one layer
that does.

Transports (``Settings.judge_transport``), each POSTing the same chat-completions body
to ``<base_url>/chat/completions`` and returning the reply's bytes for
``rewardq.judge.judge_core.read_reply``:

- ``direct`` (the default): one long-lived ``aiohttp.ClientSession`` per endpoint,
  opened on the loop at the first call (``TCPConnector(limit=max_concurrent_requests)``,
  keep-alive), fixed headers (``Authorization: Bearer <key>``, JSON content type), the
  SDK's per-phase timeout of ``judge_timeout_s``. Its errors are built by
  ``rewardq.judge.verdicts.http_error``/``timeout_error``/``network_error``, the functions
  ``classify`` uses for the SDK's, so retries, breakers and dead letters see the same
  errors. The workers are the "async OpenAI client" of the design without the ``openai``
  SDK on the hot path: the SDK's request building and httpx2 layers cost ~0.7 ms of
  client CPU per call over a plain aiohttp POST (``benchmarks/PROFILE.md``).
- ``aiohttp`` / ``httpx``: ``openai.AsyncOpenAI`` (``max_retries=0``) on the SDK's
  aiohttp or default httpx transport, errors mapped by ``rewardq.judge.verdicts.classify``.

The SDK stays the client of the in-process sync judge (``rewardq.producer.sync_judge``) and of
``rewardq bench``'s one-process asyncio baseline.

``JudgeClient(..., transport_factory=...)`` builds each endpoint's transport with another
factory than :func:`http_transport` (any :class:`JudgeTransport`: an in-memory judge lets
a test drive the whole client without a server); the client still learns refused
parameters, routes, counts and reads the reply as it does over HTTP.

With several base URLs (``Settings.judge_endpoints``) ``rewardq.workers.endpoints.EndpointPool``
routes each call (fewest in flight, a circuit breaker per endpoint); a call that finds
its endpoint down fails over at once to another inside the same call, before
``rewardq.workers.retry`` sees an error, on every transport alike. With one base URL the call
goes straight to its transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai
import redis.asyncio as aioredis

from rewardq.broker.errors import (
    BrokerUnavailableError,
    CutReplyError,
    JudgeError,
    PermanentJudgeError,
    UnparseableReplyError,
)
from rewardq.broker.schemas import JudgeSpec, JudgeVerdict, ScoreItem, Usage
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import (
    COMPLETIONS_PATH,
    TokenLogprob,
    answer_text,
    judge_request,
    judge_verdict,
    read_reply,
)
from rewardq.judge.judge_request import LearnedRequests, reply_budget
from rewardq.judge.rubrics import RubricBook, builtin_rubrics
from rewardq.judge.verdicts import (
    classify,
    http_error,
    network_error,
    refused_param,
    status_detail,
    timeout_error,
)
from rewardq.monitoring.costs import PriceTable
from rewardq.monitoring.metrics import WorkerMetrics, call_status
from rewardq.workers.budget import FleetBudget, Unbudgeted
from rewardq.workers.endpoints import Endpoint, EndpointPool, NoEndpointError, is_endpoint_failure
from rewardq.workers.rate_limit import RateLimit, RedisRateLimiter, estimate_tokens

log = logging.getLogger(__name__)

#: httpx's default keep-alive expiry, which the SDK's transports use: an idle connection
#: is closed before a judge's load balancer would drop it under a request.
_KEEPALIVE_S = 5.0


class JudgeTransport(Protocol):
    """One endpoint's HTTP shell: POSTs a chat-completions body, returns the reply."""

    async def post(self, body: dict[str, Any]) -> bytes:
        """The body of a 2xx answer to ``body``.

        Raises:
            TransientJudgeError: timeout, network error, 408/409/429/5xx.
            PermanentJudgeError: any other HTTP error.
        """

    async def close(self) -> None:
        """Close the connection pool."""


class SdkTransport:
    """POSTs through ``openai.AsyncOpenAI`` on the SDK's aiohttp or httpx transport.

    Args:
        settings: key, timeout and ``judge_transport`` (``aiohttp`` or ``httpx``).
        base_url: the endpoint, e.g. ``http://127.0.0.1:8008/v1``.
    """

    def __init__(self, settings: Settings, base_url: str) -> None:
        http_client = openai.DefaultAioHttpClient() if settings.judge_transport == "aiohttp" \
            else None
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=settings.judge_api_key.get_secret_value(),
            timeout=settings.judge_timeout_s, max_retries=0, http_client=http_client)

    async def post(self, body: dict[str, Any]) -> bytes:
        """See :meth:`JudgeTransport.post`."""
        try:
            # The raw route: the SDK's per-call transform of the params (TypedDict
            # introspection) and pydantic parse of the reply cost more client CPU than
            # the HTTP exchange itself (benchmarks/PROFILE.md).
            response = await self._client.post(COMPLETIONS_PATH, cast_to=httpx2.Response,
                                               body=body)
        except openai.APIError as exc:
            raise classify(exc) from exc
        return response.content

    async def close(self) -> None:
        """See :meth:`JudgeTransport.close`."""
        await self._client.close()


class DirectTransport:
    """POSTs with one long-lived ``aiohttp.ClientSession``, as the SDK would, minus its
    per-call layers.

    What goes on the wire is what the SDK sends that matters: the body as compact UTF-8
    JSON (NaN refused), ``Authorization: Bearer <key>``, ``Content-Type`` and ``Accept``
    ``application/json``; not the SDK's ``X-Stainless-*`` telemetry, nor the
    ``OpenAI-Organization``/``OpenAI-Project`` headers the SDK takes from
    ``OPENAI_ORG_ID``/``OPENAI_PROJECT_ID`` (use an SDK transport for those). The
    timeout is the SDK's: ``judge_timeout_s`` to get a connection, to connect, and
    between reads. HTTPS uses the SDK's SSL context (certifi, ``SSL_CERT_FILE``).

    The session is opened at the first call, on the loop that makes it (an aiohttp
    session belongs to one loop: the worker's, see ``rewardq.workers.bridge``).

    Args:
        settings: key, timeout, ``max_concurrent_requests`` (the connection limit).
        base_url: the endpoint, e.g. ``http://127.0.0.1:8008/v1``.
    """

    def __init__(self, settings: Settings, base_url: str) -> None:
        self._url = base_url.rstrip("/") + COMPLETIONS_PATH
        self._https = urlsplit(base_url).scheme == "https"
        self._limit = settings.max_concurrent_requests
        timeout = settings.judge_timeout_s
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout,
                                              sock_connect=timeout, sock_read=timeout)
        self._headers = {
            "Authorization": f"Bearer {settings.judge_api_key.get_secret_value()}",
            "Content-Type": "application/json", "Accept": "application/json",
            "User-Agent": "rewardq"}
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # The SDK's SSL context (certifi, SSL_CERT_FILE), built only where it is used.
        ssl = httpx2.create_ssl_context(trust_env=True) if self._https else True
        connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=_KEEPALIVE_S,
                                         ssl=ssl)
        self._session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                              timeout=self._timeout)
        return self._session

    async def post(self, body: dict[str, Any]) -> bytes:
        """See :meth:`JudgeTransport.post`."""
        session = self._session or self._open()
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()
        try:
            async with session.post(self._url, data=data) as response:
                content = await response.read()
                status, headers = response.status, response.headers
        # aiohttp's timeouts are TimeoutErrors (an OSError too), so they go first.
        except TimeoutError as exc:
            raise timeout_error(f"no answer within {self._timeout.sock_read:g}s "
                                f"({type(exc).__name__})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise network_error(f"{type(exc).__name__}: {exc}") from exc
        if status >= 400:
            raise http_error(status, headers, status_detail(status, content),
                             param=refused_param(status, content))
        return content

    async def close(self) -> None:
        """See :meth:`JudgeTransport.close`."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class LearningTransport:
    """A transport that learns which parameters its endpoint refuses, per model
    (``rewardq.judge.judge_request.LearnedRequests``): the refused call is made again at once
    without them, and every later call leaves them out. One WARNING per lesson.

    Args:
        inner: the endpoint's transport.
        base_url: the endpoint, named in the warning.
    """

    def __init__(self, inner: JudgeTransport, base_url: str) -> None:
        self._inner = inner
        self._base_url = base_url
        self._learned = LearnedRequests()

    async def post(self, body: dict[str, Any]) -> bytes:
        """See :meth:`JudgeTransport.post`."""
        body = self._learned.adapt(body)
        while True:
            try:
                return await self._inner.post(body)
            except PermanentJudgeError as error:
                retry = self._learned.retry_body(body, error, self._base_url)
                if retry is None:
                    raise
                body = retry

    async def close(self) -> None:
        """See :meth:`JudgeTransport.close`."""
        await self._inner.close()


#: Builds one endpoint's transport from the settings and the endpoint's base URL.
TransportFactory = Callable[[Settings, str], JudgeTransport]


def http_transport(settings: Settings, base_url: str) -> JudgeTransport:
    """The HTTP transport ``settings.judge_transport`` names, for the endpoint ``base_url``."""
    if settings.judge_transport == "direct":
        return DirectTransport(settings, base_url)
    return SdkTransport(settings, base_url)


def judge_transport(settings: Settings, base_url: str,
                    factory: TransportFactory = http_transport) -> JudgeTransport:
    """The transport ``factory`` builds for the endpoint ``base_url``, learning the
    parameters the endpoint refuses."""
    return LearningTransport(factory(settings, base_url), base_url)


class TimedReply(NamedTuple):
    """A chat completion's reply (``rewardq.judge.judge_core.ChatReply``) and how long it took;
    ``content`` is the judge's final answer (``rewardq.judge.judge_core.answer_text``)."""

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
        rubrics: the run's rubrics (``rewardq.judge.rubrics.rubric_book``); built-in by default.
        budget: the fleet-wide judge budget every call reserves from (none: unlimited).
        transport_factory: builds each endpoint's transport (default :func:`http_transport`);
            the client wraps each in a :class:`LearningTransport`.
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis | None = None,
                 metrics: WorkerMetrics | None = None, prices: PriceTable | None = None,
                 rubrics: RubricBook | None = None, budget: FleetBudget | None = None,
                 *, transport_factory: TransportFactory = http_transport) -> None:
        self._rubrics = rubrics or builtin_rubrics()
        endpoints = settings.judge_endpoints
        # One transport (one connection pool) per endpoint; the first alone when there is one.
        self._transports = [judge_transport(settings, url, transport_factory)
                            for url in endpoints]
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
                                    reply_budget(spec))
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
            BudgetExceededError: the fleet-wide judge budget (``rewardq.workers.budget``) cannot
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
                if self._pool is None:
                    content = await self._transports[0].post(body)
                else:
                    content = await self._routed_post(self._pool, model, body)
            except NoEndpointError:  # no call was made: nothing to count
                await hold.release()
                raise
            except JudgeError as error:
                await hold.release()
                self._metrics.judge_call(model, call_status(error),
                                         time.perf_counter() - started)
                raise
            except BaseException:
                await hold.release()
                raise
            latency_s = time.perf_counter() - started
        reply = read_reply(content)
        await hold.settle(reply.usage, model)
        usage = reply.usage or Usage()
        if limiter is not None and reply.usage is not None:
            await self._reconcile(limiter, estimate, usage)
        self._metrics.usage(model, usage.prompt_tokens, usage.completion_tokens,
                            self._prices.cost(model, usage.prompt_tokens,
                                              usage.completion_tokens),
                            reasoning_tokens=usage.reasoning_tokens)
        try:
            answer = answer_text(reply, max_tokens)
        except CutReplyError as error:
            self._metrics.judge_call(model, call_status(error), latency_s)
            raise
        return TimedReply(answer, usage, reply.tokens, latency_s)

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
                           body: dict[str, Any]) -> bytes:
        """The POST on the endpoint with the fewest calls in flight; a call that finds
        its endpoint down (:func:`~rewardq.workers.endpoints.is_endpoint_failure`) goes on at once
        to another live one, each endpoint tried at most once.

        Raises:
            NoEndpointError: every breaker is open (transient: the item is retried).
            TransientJudgeError, PermanentJudgeError: the last endpoint tried failed.
        """
        tried: list[Endpoint] = []
        endpoint = pool.acquire()
        if endpoint is None:
            raise pool.unavailable_error()
        while True:
            started = time.perf_counter()
            try:
                content = await self._transports[endpoint.index].post(body)
            except JudgeError as error:
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
            return content

    async def close(self) -> None:
        """Close the connection pools."""
        for transport in self._transports:
            await transport.close()

