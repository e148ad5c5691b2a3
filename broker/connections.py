"""Every Redis client rewardq opens, and the one policy for Redis outages.

One factory per flavour (blocking and asyncio) gives every component — producer,
workers, cache, rate limiter, dead letters, heartbeats, stats, CLI — the same
timeouts, health checks and connection retries, from ``Settings``. A Redis outage looks
the same everywhere: redis-py's connection and timeout errors, or our
``BrokerUnavailableError`` that wraps them (:data:`OUTAGE_ERRORS`). What to do about one
is decided once too: :func:`is_outage` says whether an error is one, and
:func:`with_outage_retries` runs an operation again with backoff until Redis is back or
the patience runs out.

A Redis that answers but refuses writes because its memory reached ``maxmemory`` (Redis'
``OOM command not allowed``) is its own condition: :func:`is_redis_full` recognizes it
however it arrives (redis-py's ``OutOfMemoryError``, or the text of a Lua script's
error), :func:`redis_full_error` names it as a :class:`~rewardq.broker.errors.RedisFullError`
("Redis is full (maxmemory N, used M)"), and the retries treat it as an outage: it ends
as soon as memory is freed (evictions, expiry, a raised cap), without a restart.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from rewardq.broker.errors import BrokerUnavailableError, RedisFullError
from rewardq.broker.settings import Settings

__all__ = ["OUTAGE_ERRORS", "async_redis_client", "describe_memory", "is_outage", "is_redis_full",
           "outage_delay", "redis_client", "redis_full_error", "redis_full_errors",
           "redis_memory", "with_outage_retries"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a Redis restart, failover or network cut raises (``BusyLoadingError``, raised
#: while a restarted Redis loads its data, is a ``ConnectionError``), and what a full
#: Redis answers a write with (``OutOfMemoryError``; ``RedisFullError`` is a
#: ``BrokerUnavailableError``): both end by themselves, so both are waited out.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError,
                                              redis.exceptions.TimeoutError,
                                              redis.exceptions.OutOfMemoryError,
                                              BrokerUnavailableError)

#: The text of Redis' answer to a write while its memory is at ``maxmemory``: redis-py
#: turns the ``OOM`` code into ``OutOfMemoryError``, but an error raised inside a Lua
#: script reaches the client as a plain ``ResponseError`` carrying this text (Redis 6).
_FULL_TEXT = "used memory > 'maxmemory'"


class _FullCounter:
    """How many times this process met a full Redis (``rewardq_redis_full_errors_total``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # never held across I/O
        self.count = 0
        #: (used_memory, maxmemory) as last read from Redis, for messages without a client
        self.last_memory: tuple[int | None, int | None] = (None, None)

    def add(self) -> None:
        with self._lock:
            self.count += 1


_FULL = _FullCounter()



def reply_text(value: object) -> str:
    """A Redis reply (bytes without ``decode_responses``, or already text) as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def redis_full_errors() -> int:
    """How many times this process met a full Redis so far (every write refused counts;
    an operation retried through a full Redis counts each refusal)."""
    return _FULL.count


def is_redis_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it was raised from) is Redis refusing a write because
    its memory reached ``maxmemory``."""
    for _ in range(6):  # kombu and Celery wrap redis-py's errors
        if exc is None:
            return False
        if isinstance(exc, RedisFullError | redis.exceptions.OutOfMemoryError):
            return True
        if isinstance(exc, redis.exceptions.ResponseError) and _FULL_TEXT in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_outage(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a Redis outage to wait out, the one test every component uses:
    one of :data:`OUTAGE_ERRORS`, or a full Redis however it arrives (a Lua script's
    refused write reaches the client as a plain ``ResponseError``, see
    :func:`is_redis_full`)."""
    return isinstance(exc, OUTAGE_ERRORS) or is_redis_full(exc)


def redis_memory(client: redis.Redis | None) -> tuple[int | None, int | None]:
    """``(used_memory, maxmemory)`` of the Redis behind ``client`` (``INFO memory``, a
    read: it works while Redis is full); the last values read in this process when
    ``client`` is ``None`` or cannot be asked. ``maxmemory`` 0 means no cap."""
    if client is not None:
        try:
            info = client.info("memory")
            _FULL.last_memory = (int(info["used_memory"]), int(info.get("maxmemory", 0)))
        except (redis.RedisError, KeyError, ValueError):
            pass
    return _FULL.last_memory


def describe_memory(used: int | None, maxmemory: int | None) -> str:
    """``maxmemory 8.0 MB, used 8.1 MB`` (``unknown`` where a value is)."""
    def size(n: int | None) -> str:
        return "unknown" if n is None else "none" if n == 0 else f"{n / 1e6:.1f} MB"
    return f"maxmemory {size(maxmemory)}, used {size(used)}"


def redis_full_error(what: str, cause: BaseException | None = None, *,
                     client: redis.Redis | None = None,
                     memory: tuple[int | None, int | None] | None = None) -> RedisFullError:
    """The :class:`RedisFullError` of ``what`` (e.g. "cannot enqueue chunk j-0") failing
    because Redis is full, with Redis' ``(used_memory, maxmemory)``: ``memory``, else read
    through ``client``, else the last known; counted in :func:`redis_full_errors`. Raise
    it ``from cause``."""
    _FULL.add()
    if memory is not None and memory[0] is not None:
        _FULL.last_memory = memory
    used, maxmemory = memory if memory is not None else redis_memory(client)
    return RedisFullError(
        f"Redis is full ({describe_memory(used, maxmemory)}): raise maxmemory or free "
        f"memory (the verdict cache gives way by itself; queued chunks, results and "
        f"leases never do: see docs/memory.md). {what}; work resumes by itself once "
        f"memory is free" + (f" [{cause}]" if cause is not None else ""),
        used_bytes=used, maxmemory_bytes=maxmemory)

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

    A full Redis (:func:`is_redis_full`) is waited out the same way: it ends once memory
    is freed; the log line and, in the end, the error say "Redis is full".

    Raises:
        whatever of :data:`OUTAGE_ERRORS` the operation last raised, once the outage
        outlasts ``patience_s`` (or reaches ``deadline``); a :class:`RedisFullError`
        when Redis was full.
    """
    attempt = 0
    give_up: float | None = None
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_outage(exc):
                raise
            full = is_redis_full(exc)
            if full and not isinstance(exc, RedisFullError):
                _FULL.add()
            attempt += 1
            now = time.time()
            give_up = give_up or now + patience_s
            delay = outage_delay(attempt)
            if now + delay >= min(give_up, deadline or give_up):
                if full and not isinstance(exc, RedisFullError):
                    raise redis_full_error(f"gave up after {patience_s:.0f}s", exc) from exc
                raise
            if attempt == 1:
                if full:
                    used, maxmemory = _FULL.last_memory
                    log.warning("Redis is full (%s): %s; raise maxmemory or free memory "
                                "(docs/memory.md); retrying for up to %.0fs",
                                describe_memory(used, maxmemory), exc, patience_s)
                else:
                    log.warning("Redis unavailable (%s); retrying for up to %.0fs", exc,
                                patience_s)
            sleep(delay)
