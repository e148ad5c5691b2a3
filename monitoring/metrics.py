"""Prometheus metrics of one worker process, and the HTTP endpoint that serves them.

Every name starts with ``rewardq_``:

====================================================  =========  ==========================
metric                                                type       labels
====================================================  =========  ==========================
``rewardq_judge_requests_total``                      counter    model, status
``rewardq_judge_latency_seconds``                     histogram  model
``rewardq_judge_prompt_tokens_total``                 counter    model
``rewardq_judge_completion_tokens_total``             counter    model
``rewardq_judge_reasoning_tokens_total``              counter    model
``rewardq_judge_cost_usd_total``                      counter    model
``rewardq_cache_hits_total``                          counter
``rewardq_cache_misses_total``                        counter
``rewardq_dedup_waits_total``                         counter
``rewardq_rate_limit_waits_total``                    counter
``rewardq_rate_limit_wait_seconds_total``             counter
``rewardq_retries_total``                             counter    reason
``rewardq_dead_letters_total``                        counter    kind
``rewardq_dead_letters_cleared_total``                counter
``rewardq_chunks_total``                              counter    status
``rewardq_items_total``                               counter    status
``rewardq_fleet_workers_up``                          gauge
``rewardq_fleet_submit_cache_hits_total``             counter
``rewardq_judge_endpoint_requests_total``             counter    endpoint, status
``rewardq_judge_endpoint_in_flight``                  gauge      endpoint
``rewardq_judge_endpoint_breaker_state``              gauge      endpoint
``rewardq_judge_endpoint_failovers_total``            counter    endpoint
``rewardq_fleet_budget_spent_usd``                    gauge      run
``rewardq_fleet_budget_reserved_usd``                 gauge      run
``rewardq_fleet_budget_limit_usd``                    gauge      run
``rewardq_fleet_budget_step_limit_usd``               gauge      run
``rewardq_fleet_budget_refused_total``                counter    run
``rewardq_fleet_redis_used_memory_bytes``             gauge
``rewardq_fleet_redis_maxmemory_bytes``               gauge
``rewardq_fleet_redis_evicted_keys_total``            counter
``rewardq_fleet_cache_evictions_total``               counter
``rewardq_redis_full_errors_total``                   counter
====================================================  =========  ==========================

Redis memory: ``rewardq_fleet_redis_used_memory_bytes`` and ``..._maxmemory_bytes`` are
Redis' ``used_memory`` and ``maxmemory`` (0: no cap) at scrape time; their ratio is what
``RewardqRedisMemoryHigh`` watches. ``rewardq_fleet_cache_evictions_total`` counts the
verdicts the cache deleted to make room (``rewardq.workers.cache``), and
``rewardq_fleet_redis_evicted_keys_total`` the keys Redis itself evicted (0 under the
``noeviction`` policy rewardq needs; anything else means queued work can be dropped).
``rewardq_redis_full_errors_total`` (per process) counts the writes Redis refused
because it was full (``rewardq.broker.connections.redis_full_errors``; ``RewardqRedisFull``).

The two ``rewardq_fleet_*`` series are read from Redis at scrape time and are the same on
every worker: take their ``max()``, not their ``sum()``. ``rewardq_fleet_workers_up``
counts the workers whose last heartbeat is at most two beat periods old, so it drops
within two heartbeats of a SIGKILL (a dead process cannot say so itself, and Flower's
``flower_worker_online`` stays 1 for minutes). ``rewardq_fleet_submit_cache_hits_total``
counts the items producers answered from the cache at submit, which never reach a worker:
the cache hit rate needs them.

The ``rewardq_fleet_budget_*`` series are fleet-wide too (take their ``max()``), one per
run with a judge budget in Redis (``rewardq.workers.budget``): what the run spent and what the
calls in flight reserved (their worst cases), its limit and each step's limit (absent
while unlimited), and the calls refused; spent is a gauge because ``rewardq budget
reset`` zeroes it. Spend against budget: ``spent_usd / limit_usd``.

The ``rewardq_judge_endpoint_*`` series exist when the judge has several base URLs
(``REWARDQ_JUDGE_BASE_URLS``, see ``rewardq.workers.endpoints``): ``endpoint`` is a base URL
without credentials; ``requests_total`` counts each HTTP call by the endpoint's answer
(``ok`` for a 200, else as :func:`call_status`; ``cancelled`` for a call cancelled
mid-flight); ``breaker_state`` is 0 closed, 1 open, 2 half-open; ``failovers_total``
counts calls that failed on that endpoint and went on at once to another.

``status`` of a judge request is ``ok`` (scored), ``unparseable`` (a 200 without a
score), the HTTP status of an error answer (``429``, ``500``...), ``timeout`` or
``network`` (see :func:`call_status`); every label takes a handful of values, never an
item id, so the series stay few.

Why not ``prometheus_client.Counter``: a worker updates its metrics from two threads
(the gevent hub thread and the asyncio loop thread of ``rewardq.workers.bridge``), and under
``gevent.monkey.patch_all`` the client's ``threading.Lock`` is a gevent lock, which a
native thread must not block on. :class:`WorkerMetrics` keeps plain numbers behind one
*native* lock whose critical sections never yield, and a collector turns them into
samples at scrape time; an update costs a lock round trip and a dict write (< 1 µs).

Where the endpoint listens (``REWARDQ_METRICS_PORT``, see :func:`serve_worker_metrics`):

- unset: no endpoint;
- ``0``: a free port the OS picks;
- ``P``: the first free port of ``P .. P + METRICS_PORT_SPAN - 1``, so several worker
  processes on one host each get their own (in docker-compose each container has its
  own network namespace and they all get ``P``).

The real port is logged (INFO) and advertised over Celery's remote control: every
worker answers the ``rewardq_metrics`` inspect command with its endpoint, which is how
``rewardq stats`` and the tests find the endpoints (:func:`discover_endpoints`).
"""

from __future__ import annotations

import bisect
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from rewardq.broker.errors import JudgeError

log = logging.getLogger(__name__)

PREFIX = "rewardq"
METRICS_PORT_SPAN = 64
"""How many consecutive ports a worker tries, from ``REWARDQ_METRICS_PORT`` on."""

LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                     120.0)
"""Judge latency buckets: a local judge answers in ms, hosted LLMs in 0.1-30 s."""

RATE_LIMIT_WAIT_MIN_S = 0.005
"""A rate-limiter admission that took less than this was not held back."""

INSPECT_COMMAND = "rewardq_metrics"
"""The Celery inspect command every serving worker answers with its endpoint."""


def _native_lock() -> Any:
    """A lock of the OS, even under ``gevent.monkey.patch_all``."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return threading.Lock()
    return monkey.get_original("_thread", "allocate_lock")()


class _Histogram:
    """Cumulative-on-read bucket counts of one label set (not thread-safe on its own)."""

    __slots__ = ("counts", "total", "count")

    def __init__(self, n_buckets: int) -> None:
        self.counts = [0] * (n_buckets + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0


class WorkerMetrics:
    """The counters of one worker process, cheap to update from any thread or greenlet.

    Args:
        registry: where the collector is registered; ``None`` makes a fresh
            ``CollectorRegistry`` (``self.registry``), so two instances never clash.
        buckets: upper bounds of the judge latency histogram, in seconds.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 buckets: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.buckets = tuple(sorted(buckets))
        self._lock = _native_lock()
        self._requests: dict[tuple[str, str], float] = {}
        self._latency: dict[str, _Histogram] = {}
        self._prompt_tokens: dict[str, float] = {}
        self._completion_tokens: dict[str, float] = {}
        self._reasoning_tokens: dict[str, float] = {}
        self._cost: dict[str, float] = {}
        self._retries: dict[str, float] = {}
        self._dead_letters: dict[str, float] = {}
        self._chunks: dict[str, float] = {}
        self._items: dict[str, float] = {}
        self._endpoint_requests: dict[tuple[str, str], float] = {}
        self._endpoint_in_flight: dict[str, float] = {}
        self._endpoint_breaker: dict[str, float] = {}
        self._endpoint_failovers: dict[str, float] = {}
        self._scalars = {"cache_hits": 0.0, "cache_misses": 0.0, "dedup_waits": 0.0,
                         "rate_limit_waits": 0.0, "rate_limit_wait_seconds": 0.0,
                         "dead_letters_cleared": 0.0}
        self.registry.register(_Collector(self))

    # -- hot path -----------------------------------------------------------------

    def judge_call(self, model: str, status: str, latency_s: float) -> None:
        """One judge request finished (answered or not) after ``latency_s`` seconds.

        Args:
            model: the judge model asked.
            status: see :func:`call_status` (``ok``, ``unparseable``, ``429``, ...).
            latency_s: wall time of the request.
        """
        key = (model, status)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0.0) + 1.0
            hist = self._latency.get(model)
            if hist is None:
                hist = self._latency[model] = _Histogram(len(self.buckets))
            hist.counts[bisect.bisect_left(self.buckets, latency_s)] += 1
            hist.total += latency_s
            hist.count += 1

    def cache_lookup(self, hits: int, misses: int) -> None:
        """A claim found ``hits`` cached verdicts and ``misses`` fingerprints to judge."""
        with self._lock:
            self._scalars["cache_hits"] += hits
            self._scalars["cache_misses"] += misses

    def dedup_wait(self) -> None:
        """An item waited for another caller's judge call instead of making its own."""
        with self._lock:
            self._scalars["dedup_waits"] += 1

    def rate_limited(self, seconds: float) -> None:
        """A judge call spent ``seconds`` in the fleet-wide rate limiter.

        Pass what ``RedisRateLimiter.acquire`` returns, for every call: the seconds add
        up, and a call counts as held back when it waited at least
        ``RATE_LIMIT_WAIT_MIN_S`` (an admission at once still costs a Redis round trip).
        """
        with self._lock:
            if seconds >= RATE_LIMIT_WAIT_MIN_S:
                self._scalars["rate_limit_waits"] += 1
            self._scalars["rate_limit_wait_seconds"] += seconds

    def retry(self, reason: str) -> None:
        """A judge call is about to be retried; ``reason`` as from :func:`call_status`."""
        with self._lock:
            self._retries[reason] = self._retries.get(reason, 0.0) + 1

    def dead_letter(self, kind: str) -> None:
        """A dead letter of ``kind`` (e.g. ``item``, ``chunk``) was recorded."""
        with self._lock:
            self._dead_letters[kind] = self._dead_letters.get(kind, 0.0) + 1

    def dead_letters_cleared(self, n: int) -> None:
        """``n`` item dead letters were cleared: the same work got a verdict since."""
        with self._lock:
            self._scalars["dead_letters_cleared"] += n

    def usage(self, model: str, prompt_tokens: int, completion_tokens: int,
              cost_usd: float, *, reasoning_tokens: int = 0) -> None:
        """Tokens (and their price) of one judge reply that the provider bills; the
        reasoning tokens are part of the completion tokens."""
        with self._lock:
            self._prompt_tokens[model] = self._prompt_tokens.get(model, 0.0) + prompt_tokens
            self._completion_tokens[model] = (self._completion_tokens.get(model, 0.0)
                                              + completion_tokens)
            if reasoning_tokens:
                self._reasoning_tokens[model] = (self._reasoning_tokens.get(model, 0.0)
                                                 + reasoning_tokens)
            self._cost[model] = self._cost.get(model, 0.0) + cost_usd

    def chunk(self, status: str, item_statuses: Iterable[str] = ()) -> None:
        """A chunk task ended with ``status`` (``ok``, ``failed``...); its items' statuses."""
        counted: dict[str, int] = {}
        for s in item_statuses:
            counted[s] = counted.get(s, 0) + 1
        with self._lock:
            self._chunks[status] = self._chunks.get(status, 0.0) + 1
            for s, n in counted.items():
                self._items[s] = self._items.get(s, 0.0) + n

    def endpoint_call(self, endpoint: str, status: str) -> None:
        """One HTTP call to judge endpoint ``endpoint`` ended with ``status``."""
        key = (endpoint, status)
        with self._lock:
            self._endpoint_requests[key] = self._endpoint_requests.get(key, 0.0) + 1

    def endpoint_in_flight(self, endpoint: str, calls: int) -> None:
        """``calls`` judge calls of this process are now in flight to ``endpoint``."""
        with self._lock:
            self._endpoint_in_flight[endpoint] = float(calls)

    def endpoint_breaker(self, endpoint: str, state: int) -> None:
        """``endpoint``'s circuit breaker is now ``state`` (0 closed, 1 open, 2 half-open)."""
        with self._lock:
            self._endpoint_breaker[endpoint] = float(state)

    def endpoint_failover(self, endpoint: str) -> None:
        """A call failed on ``endpoint`` and goes on at once to another endpoint."""
        with self._lock:
            self._endpoint_failovers[endpoint] = self._endpoint_failovers.get(endpoint, 0.0) + 1

    def endpoint_snapshot(self) -> EndpointSnapshot:
        """A consistent copy of the per-endpoint series (taken under the lock)."""
        with self._lock:
            return EndpointSnapshot(requests=dict(self._endpoint_requests),
                                    in_flight=dict(self._endpoint_in_flight),
                                    breaker=dict(self._endpoint_breaker),
                                    failovers=dict(self._endpoint_failovers))

    # -- reading ------------------------------------------------------------------

    def snapshot(self) -> MetricsSnapshot:
        """A consistent copy of every counter (taken under the lock)."""
        with self._lock:
            return MetricsSnapshot(
                requests=dict(self._requests),
                latency={m: (list(h.counts), h.total, h.count)
                         for m, h in self._latency.items()},
                prompt_tokens=dict(self._prompt_tokens),
                completion_tokens=dict(self._completion_tokens),
                reasoning_tokens=dict(self._reasoning_tokens),
                cost_usd=dict(self._cost), retries=dict(self._retries),
                dead_letters=dict(self._dead_letters), chunks=dict(self._chunks),
                items=dict(self._items), scalars=dict(self._scalars))


@dataclass(frozen=True)
class MetricsSnapshot:
    """Plain copies of a :class:`WorkerMetrics`' counters at one instant."""

    requests: Mapping[tuple[str, str], float]
    latency: Mapping[str, tuple[list[int], float, int]]
    prompt_tokens: Mapping[str, float]
    completion_tokens: Mapping[str, float]
    reasoning_tokens: Mapping[str, float]
    cost_usd: Mapping[str, float]
    retries: Mapping[str, float]
    dead_letters: Mapping[str, float]
    chunks: Mapping[str, float]
    items: Mapping[str, float]
    scalars: Mapping[str, float]


@dataclass(frozen=True)
class EndpointSnapshot:
    """Plain copies of a :class:`WorkerMetrics`' per-endpoint series at one instant."""

    requests: Mapping[tuple[str, str], float]
    in_flight: Mapping[str, float]
    breaker: Mapping[str, float]
    failovers: Mapping[str, float]


class _Collector(Collector):
    """Turns a :class:`WorkerMetrics` snapshot into Prometheus metric families."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s = self._metrics.snapshot()
        yield _counter("judge_requests", "Judge requests by model and outcome.",
                       ["model", "status"], {k: v for k, v in s.requests.items()})
        latency = HistogramMetricFamily(f"{PREFIX}_judge_latency_seconds",
                                        "Wall time of one judge request.", labels=["model"])
        bounds = [*(repr(float(b)) for b in self._metrics.buckets), "+Inf"]
        for model, (counts, total, _count) in s.latency.items():
            cumulative, running = [], 0
            for bound, n in zip(bounds, counts, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            latency.add_metric([model], cumulative, total)
        yield latency
        for name, doc, values in (
                ("judge_prompt_tokens", "Prompt (input) tokens billed.", s.prompt_tokens),
                ("judge_completion_tokens", "Completion (output) tokens billed.",
                 s.completion_tokens),
                ("judge_reasoning_tokens", "Reasoning tokens billed (part of the "
                                           "completion tokens).", s.reasoning_tokens),
                ("judge_cost_usd", "Judge cost in US dollars (price table x tokens).",
                 s.cost_usd)):
            yield _counter(name, doc, ["model"], {(m,): v for m, v in values.items()})
        for name, doc in (
                ("cache_hits", "Fingerprints answered from the verdict cache."),
                ("cache_misses", "Fingerprints not in the cache when claimed."),
                ("dedup_waits", "Items that waited for another caller's judge call."),
                ("rate_limit_waits", "Judge calls held back by the fleet-wide rate limiter."),
                ("rate_limit_wait_seconds", "Seconds judge calls waited for the rate limiter."),
                ("dead_letters_cleared", "Item dead letters cleared: the same work got a "
                                         "verdict since.")):
            yield _counter(name, doc, [], {(): s.scalars[name]})
        yield _counter("retries", "Judge calls retried, by reason.", ["reason"],
                       {(k,): v for k, v in s.retries.items()})
        yield _counter("dead_letters", "Dead letters recorded, by kind.", ["kind"],
                       {(k,): v for k, v in s.dead_letters.items()})
        yield _counter("chunks", "Chunk tasks finished, by outcome.", ["status"],
                       {(k,): v for k, v in s.chunks.items()})
        yield _counter("items", "Items scored, by result status.", ["status"],
                       {(k,): v for k, v in s.items.items()})
        yield from _endpoint_families(self._metrics.endpoint_snapshot())
        from rewardq.broker.connections import redis_full_errors
        yield _counter("redis_full_errors", "Redis writes refused because Redis was full "
                       "(maxmemory reached).", [], {(): float(redis_full_errors())})


def _endpoint_families(e: EndpointSnapshot) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    if not (e.requests or e.in_flight or e.breaker):
        return  # one endpoint: no per-endpoint series
    yield _counter("judge_endpoint_requests", "Judge HTTP calls by endpoint and outcome.",
                   ["endpoint", "status"], {k: v for k, v in e.requests.items()})
    for name, doc, values in (
            ("judge_endpoint_in_flight", "Judge calls of this process in flight, by endpoint.",
             e.in_flight),
            ("judge_endpoint_breaker_state",
             "Circuit breaker of each judge endpoint: 0 closed, 1 open, 2 half-open.",
             e.breaker)):
        gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["endpoint"])
        for endpoint, value in values.items():
            gauge.add_metric([endpoint], value)
        yield gauge
    yield _counter("judge_endpoint_failovers",
                   "Judge calls that failed on an endpoint and went on to another.",
                   ["endpoint"], {(k,): v for k, v in e.failovers.items()})


def _counter(name: str, doc: str, labels: list[str],
             values: Mapping[tuple[str, ...], float]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family


def call_status(error: JudgeError | None) -> str:
    """The ``status`` label of a judge request that raised ``error`` (``None``: scored):
    the HTTP status when the judge answered with an error, else the error's kind
    (``timeout``, ``network``, ``unparseable``, ``other``)."""
    if error is None:
        return "ok"
    if error.status_code is not None:
        return str(error.status_code)
    return error.kind.value


# -- the endpoint -----------------------------------------------------------------

_served: dict[str, Any] = {}
"""This process's endpoint, for the inspect command (Celery's panel is process-global)."""


def start_metrics_server(port: int, registry: CollectorRegistry, *, addr: str = "0.0.0.0",
                         span: int = METRICS_PORT_SPAN) -> int:
    """Serve ``registry`` at ``http://addr:<port>/metrics`` from a daemon thread.

    Args:
        port: ``0`` for a free port the OS picks; otherwise the first port of
            ``port .. port + span - 1`` that is free.
        registry: what to serve (``WorkerMetrics.registry``).
        addr: the interface to bind; metrics hold no secrets, and Prometheus scrapes
            from another host or container.
        span: how many consecutive ports to try.

    Returns:
        The port actually bound.

    Raises:
        OSError: every port of the range is taken.
    """
    candidates = [0] if port == 0 else list(range(port, port + max(1, span)))
    last_error: OSError | None = None
    for candidate in candidates:
        try:
            server, _thread = start_http_server(candidate, addr=addr, registry=registry)
        except OSError as exc:
            last_error = exc
            continue
        bound: int = server.server_port
        return bound
    raise OSError(f"no free metrics port in {port}..{port + span - 1}: {last_error}")


class FleetCollector(Collector):
    """Fleet-wide series read from Redis at each scrape (see the module docstring)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        from rewardq.broker.fleet import BEAT_INTERVAL_S, live_workers
        from rewardq.broker.keys import SUBMIT_CACHE_HITS

        try:
            now = time.time()
            beats = live_workers(self._client, queue=None)
            hits = self._client.get(SUBMIT_CACHE_HITS)
        except Exception as exc:  # Redis away: no fleet series this scrape, never a 500
            log.debug("fleet metrics not read: %s", exc)
            return
        up = sum(1 for b in beats if now - b.beat_at <= 2 * BEAT_INTERVAL_S)
        yield GaugeMetricFamily("rewardq_fleet_workers_up",
                                "Workers with a heartbeat at most two beat periods old.",
                                value=up)
        yield CounterMetricFamily("rewardq_fleet_submit_cache_hits",
                                  "Items producers answered from the cache at submit.",
                                  value=float(hits or 0))
        yield from _budget_families(self._client)
        yield from _memory_families(self._client)


def _memory_families(client: Any) -> Iterator[Metric]:
    """Redis' memory and evictions, and the verdicts the cache deleted to make room."""
    from prometheus_client.core import GaugeMetricFamily

    from rewardq.broker.keys import CACHE_EVICTIONS

    try:
        memory = client.info("memory")
        stats = client.info("stats")
        evictions = client.get(CACHE_EVICTIONS)
    except Exception as exc:  # Redis away, or INFO refused (a managed Redis): no series
        log.debug("Redis memory metrics not read: %s", exc)
        return
    yield GaugeMetricFamily("rewardq_fleet_redis_used_memory_bytes",
                            "Redis' used_memory.", value=float(memory.get("used_memory", 0)))
    yield GaugeMetricFamily("rewardq_fleet_redis_maxmemory_bytes",
                            "Redis' maxmemory (0: no cap).",
                            value=float(memory.get("maxmemory", 0)))
    yield CounterMetricFamily("rewardq_fleet_redis_evicted_keys",
                              "Keys Redis itself evicted (0 under noeviction).",
                              value=float(stats.get("evicted_keys", 0)))
    yield CounterMetricFamily("rewardq_fleet_cache_evictions",
                              "Verdicts the cache deleted to make room under maxmemory.",
                              value=float(evictions or 0))


_BUDGET_FIELDS = ("spent", "reserved", "limit", "step_limit", "refused")


def _budget_families(client: Any) -> Iterator[Metric]:
    """The ``rewardq_fleet_budget_*`` series of every run in ``rewardq:budget:runs``."""
    from prometheus_client.core import GaugeMetricFamily

    from rewardq.broker.keys import BUDGET_RUNS, BUDGET_UNITS_PER_USD, budget_key

    try:
        runs = sorted(r.decode() if isinstance(r, bytes) else str(r)
                      for r in client.smembers(BUDGET_RUNS))
        with client.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.hmget(budget_key(run), list(_BUDGET_FIELDS))
            rows = pipe.execute() if runs else []
        gone = [run for run, row in zip(runs, rows, strict=True) if not any(row)]
        if gone:  # their hash expired: drop them from the index
            client.srem(BUDGET_RUNS, *gone)
    except Exception as exc:  # Redis away: no budget series this scrape, never a 500
        log.debug("budget metrics not read: %s", exc)
        return
    families = {
        "spent": GaugeMetricFamily("rewardq_fleet_budget_spent_usd",
                                   "US dollars the run's judge calls spent (settled).",
                                   labels=["run"]),
        "reserved": GaugeMetricFamily("rewardq_fleet_budget_reserved_usd",
                                      "US dollars reserved by judge calls in flight "
                                      "(their worst cases).", labels=["run"]),
        "limit": GaugeMetricFamily("rewardq_fleet_budget_limit_usd",
                                   "The run's judge budget in US dollars.", labels=["run"]),
        "step_limit": GaugeMetricFamily("rewardq_fleet_budget_step_limit_usd",
                                        "Each training step's judge budget in US dollars.",
                                        labels=["run"]),
    }
    refused = CounterMetricFamily("rewardq_fleet_budget_refused",
                                  "Judge calls not made: the budget could not cover them.",
                                  labels=["run"])
    for run, row in zip(runs, rows, strict=True):
        if not any(row):
            continue
        values = dict(zip(_BUDGET_FIELDS, row, strict=True))
        for name, family in families.items():
            raw = values[name]
            try:
                amount = int(raw) if raw is not None else (None if "limit" in name else 0)
            except ValueError:  # "none": unlimited
                amount = None
            if amount is not None:
                family.add_metric([run], amount / BUDGET_UNITS_PER_USD)
        refused.add_metric([run], float(int(values["refused"] or 0)))
    yield from families.values()
    yield refused


def serve_worker_metrics(metrics: WorkerMetrics, port: int, *, node: str,
                         addr: str = "0.0.0.0", fleet: Any = None) -> int:
    """Start a worker process's endpoint and advertise it (log line + inspect command).

    Call once per worker process, after the worker is up (Celery's ``worker_ready``):
    not at import time, or ``celery inspect`` would open endpoints too.

    Args:
        metrics: the process's metrics.
        port: ``Settings.metrics_port`` (see the module docstring for 0 and ranges).
        node: the worker's Celery node name (``sender.hostname`` of ``worker_ready``).
        addr: the interface to bind.
        fleet: a Redis client: also export the fleet-wide series read from it.

    Returns:
        The port bound.
    """
    if fleet is not None:
        metrics.registry.register(FleetCollector(fleet))
    bound = start_metrics_server(port, metrics.registry, addr=addr)
    host = socket.gethostname() if addr in ("0.0.0.0", "::", "") else addr
    _served.update(node=node, port=bound, url=f"http://{host}:{bound}/metrics")
    log.info("worker %s serves metrics at %s", node, _served["url"])
    return bound


def _register_inspect_command() -> None:
    from celery.worker.control import inspect_command

    @inspect_command(name=INSPECT_COMMAND)  # type: ignore[untyped-decorator]
    def rewardq_metrics(state: Any) -> dict[str, Any]:
        """The worker's Prometheus endpoint ({} when it serves none)."""
        return dict(_served)


_register_inspect_command()


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where one worker serves its metrics."""

    node: str
    port: int
    url: str

    def url_for(self, host: str) -> str:
        """The endpoint's URL with ``host`` instead of the worker's own host name."""
        return f"http://{host}:{self.port}/metrics"


def discover_endpoints(app: Any, timeout_s: float = 1.0) -> dict[str, MetricsEndpoint]:
    """Ask every worker for its endpoint (the ``rewardq_metrics`` inspect command).

    Args:
        app: a Celery app on the fleet's broker (``rewardq.broker.app.create_app``).
        timeout_s: how long to collect replies.

    Returns:
        Celery node name -> endpoint, for the workers that serve one.
    """
    replies = app.control.broadcast(INSPECT_COMMAND, reply=True, timeout=timeout_s) or []
    found = {}
    for answer in replies:
        for node, reply in answer.items():
            if isinstance(reply, dict) and reply.get("port"):
                found[node] = MetricsEndpoint(node=node, port=int(reply["port"]),
                                              url=str(reply["url"]))
    return found
