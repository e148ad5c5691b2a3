"""Prometheus metrics of one gateway process (``GET /metrics``).

====================================================  =========  ==========================
metric                                                type       labels
====================================================  =========  ==========================
``rewardq_gateway_requests_total``                    counter    endpoint, token, code
``rewardq_gateway_request_seconds``                   histogram  endpoint
``rewardq_gateway_requests_in_flight``                gauge      token
``rewardq_gateway_requests_queued``                   gauge      token
``rewardq_gateway_items_rescored_total``              counter
``rewardq_gateway_items_total``                       counter    token, status, cached
``rewardq_gateway_judge_tokens_total``                counter    token, kind
``rewardq_gateway_prompt_not_in_query_total``         counter    token
``rewardq_gateway_chunks_sent_total``                 counter
====================================================  =========  ==========================

``requests_in_flight`` counts a token's scoring requests held by the process, waiting in
its queue or being scored; ``requests_queued`` those waiting for a slot;
``items_rescored_total`` items sent to the fleet again after a transient failure (a
judge outage shows here long before any request fails).

``token`` is the caller's token *name* (``anonymous`` without auth, ``unauthenticated``
for a request refused with 401); ``endpoint`` one of the routes (``other`` for any
unknown path), so the series stay few. ``judge_tokens_total`` counts the judge's prompt
and completion tokens of the items a caller had judged (cache hits cost nothing): with
``rewardq_judge_cost_usd_total`` of the workers it tells who spent what.

The gateway is one asyncio thread, so ``prometheus_client``'s own metric classes serve
(the workers need a native lock of their own, see ``rewardq.monitoring.metrics``).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.gateway.auth import token_name

#: A request refused for want of a valid token.
UNAUTHENTICATED = "unauthenticated"
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    """The counters of one gateway process, in a registry of their own.

    Args:
        registry: where they are registered; ``None`` makes a fresh one (``self.registry``).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("rewardq_gateway_requests", "HTTP requests answered",
                                ["endpoint", "token", "code"], registry=r)
        self.request_seconds = Histogram(
            "rewardq_gateway_request_seconds", "Time from request to the response's end",
            ["endpoint"], buckets=REQUEST_BUCKETS_S, registry=r)
        self.items = Counter("rewardq_gateway_items", "Item results returned",
                             ["token", "status", "cached"], registry=r)
        self.judge_tokens = Counter("rewardq_gateway_judge_tokens",
                                    "Judge tokens spent on the caller's items (not cached)",
                                    ["token", "kind"], registry=r)
        self.prompt_not_in_query = Counter(
            "rewardq_gateway_prompt_not_in_query",
            "OpenRLHF queries that did not start with their prompt (judged whole)",
            ["token"], registry=r)
        self.items_rescored = Counter(
            "rewardq_gateway_items_rescored",
            "Items sent to the fleet again after a transient failure", registry=r)

    def watch_in_flight(self, read: Callable[[], Mapping[str, int]],
                        queued: Callable[[], Mapping[str, int]]) -> None:
        """Report ``read()`` (token name -> requests held) and ``queued()`` (token name ->
        requests waiting for a slot) as gauges."""
        self.registry.register(_InFlightCollector(read, "rewardq_gateway_requests_in_flight",
                                                  "Scoring requests held, per token"))
        self.registry.register(_InFlightCollector(queued, "rewardq_gateway_requests_queued",
                                                  "Scoring requests waiting for a slot, "
                                                  "per token"))

    def watch_chunks(self, read: Callable[[], int]) -> None:
        """Report ``read()`` (Celery tasks the gateway enqueued) as a counter."""
        self.registry.register(_ChunksCollector(read))

    def count_results(self, token: str, results: Iterable[ScoreResult]) -> None:
        """Count results returned to ``token``'s caller, and the judge tokens they cost."""
        # Summed first: a labels() lookup per result would cost more than the rest of a
        # request's handling.
        counts: Tally[tuple[str, str]] = Tally()
        prompt = completion = 0
        for result in results:
            counts[ResultStatus(result.status).value, "true" if result.cached else "false"] += 1
            if result.usage is not None and not result.cached:
                prompt += result.usage.prompt_tokens
                completion += result.usage.completion_tokens
        for (status, cached), n in counts.items():
            self.items.labels(token, status, cached).inc(n)
        if prompt or completion:
            self.judge_tokens.labels(token, "prompt").inc(prompt)
            self.judge_tokens.labels(token, "completion").inc(completion)

    def exposition(self) -> bytes:
        """The text exposition format of every metric here."""
        return generate_latest(self.registry)


class AccountingMiddleware:
    """ASGI middleware (outermost): counts every request by endpoint, token and status
    code, and times it to the end of its response.

    Args:
        app: the ASGI app it wraps.
        metrics: where the counts go.
        endpoints: the routes' paths; any other path counts as ``other``.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, endpoints: frozenset[str]
                 ) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500
        started = time.perf_counter()

        async def watched_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            name = token_name(scope) or (UNAUTHENTICATED if status == 401 else "none")
            self.metrics.requests.labels(endpoint, name, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(
                time.perf_counter() - started)


class _InFlightCollector(Collector):
    """A per-token gauge read from the token queues at scrape time."""

    def __init__(self, read: Callable[[], Mapping[str, int]], name: str, doc: str) -> None:
        self._read = read
        self._name = name
        self._doc = doc

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._doc, labels=["token"])
        for name, count in sorted(self._read().items()):
            family.add_metric([name], count)
        yield family


class _ChunksCollector(Collector):
    """``rewardq_gateway_chunks_sent_total``: batch submits plus coalesced per-item ones."""

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("rewardq_gateway_chunks_sent",
                                  "Chunks (Celery tasks) this gateway enqueued",
                                  value=self._read())
