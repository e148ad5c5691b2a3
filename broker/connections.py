"""Every Redis client rewardq opens, and the one policy for Redis outages.

One factory per flavour (blocking and asyncio) gives every component — producer,
workers, cache, rate limiter, dead letters, heartbeats, stats, CLI — the same
timeouts, health checks and connection retries, from ``Settings``. A Redis outage looks
the same everywhere: redis-py's connection and timeout errors, or our
``BrokerUnavailableError`` that wraps them (:data:`OUTAGE_ERRORS`). What to do about one
is decided once too: :func:`with_outage_retries` runs an operation again with backoff
until Redis is back or the patience runs out.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from broker.errors import BrokerUnavailableError
from broker.settings import Settings

__all__ = ["OUTAGE_ERRORS", "async_redis_client", "outage_delay", "redis_client",
           "with_outage_retries"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a Redis restart, failover or network cut raises (``BusyLoadingError``, raised
#: while a restarted Redis loads its data, is a ``ConnectionError``).
OUTAGE_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError,
                                              redis.exceptions.TimeoutError,
                                              BrokerUnavailableError)

#: Seconds before a connection attempt or a reply counts as lost.
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 10.0
#: A pooled connection idle this long is pinged before use (catches half-dead sockets).
HEALTH_CHECK_S = 30


def _retry() -> Retry:
    # A few quick reconnects inside redis-py; longer outages are with_outage_retries' job.
    return Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=3)


def redis_client(settings: Settings, *, socket_timeout: float = SOCKET_TIMEOUT_S,
                 max_connections: int | None = None) -> redis.Redis:
    """A blocking client on ``settings.broker_url`` (password and ``rediss://`` from it)."""
    kwargs: dict[str, Any] = {}
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    return redis.Redis.from_url(
        settings.broker_url, socket_timeout=socket_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=HEALTH_CHECK_S,
        retry=_retry(), retry_on_error=[redis.exceptions.ConnectionError], **kwargs)


def async_redis_client(settings: Settings, *, max_connections: int = 64,
                       wait_for_connection_s: float = 30.0) -> aioredis.Redis:
    """An asyncio client on ``settings.broker_url`` with a *blocking* pool: hundreds of
    coroutines share ``max_connections`` and wait up to ``wait_for_connection_s`` for one."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.broker_url, max_connections=max_connections, timeout=wait_for_connection_s,
        socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_S, retry=_retry(),
        retry_on_error=[redis.exceptions.ConnectionError])
    return aioredis.Redis(connection_pool=pool)


def outage_delay(attempt: int, *, base_s: float = 0.25, cap_s: float = 5.0,
                 rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based) after a Redis outage.

    Exponential with equal jitter: never less than half the step, so a fleet retrying a
    restarting Redis neither hammers it nor waits longer than ``cap_s``.
    """
    step = min(cap_s, base_s * 2.0 ** min(max(0, attempt - 1), 60))
    jitter: float = (rng or random).uniform(0.0, step / 2)
    return step / 2 + jitter


def with_outage_retries(operation: Callable[[], T], patience_s: float,
                        deadline: float | None = None,
                        sleep: Callable[[float], Any] = time.sleep) -> T:
    """``operation()``, run again with backoff while Redis is unreachable.

    Args:
        operation: what to run (again); must be safe to repeat.
        patience_s: how long one outage may last before giving up.
        deadline: unix time after which nobody wants the answer any more.
        sleep: how to wait (``time.sleep`` is cooperative under gevent's patching).

    Raises:
        whatever of :data:`OUTAGE_ERRORS` the operation last raised, once the outage
        outlasts ``patience_s`` (or reaches ``deadline``).
    """
    attempt = 0
    give_up: float | None = None
    while True:
        try:
            return operation()
        except OUTAGE_ERRORS as exc:
            attempt += 1
            now = time.time()
            give_up = give_up or now + patience_s
            delay = outage_delay(attempt)
            if now + delay >= min(give_up, deadline or give_up):
                raise
            if attempt == 1:
                log.warning("Redis unavailable (%s); retrying for up to %.0fs", exc,
                            patience_s)
            sleep(delay)
