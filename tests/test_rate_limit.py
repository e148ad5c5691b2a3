"""The fleet-wide rate limiter against a real Redis: the real Lua, no mocks.

Decisions are asserted, not durations: limits are slow enough (seconds per request)
that a run of immediate calls falls inside one emission interval however slow the
machine, and the concurrent tests read admission times from Redis's own clock.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import TypeVar

import pytest
import redis
import redis.asyncio

from broker.connections import OUTAGE_ERRORS
from broker.embedded import EmbeddedRedis, free_port
from broker.errors import BrokerUnavailableError, ConfigError
from broker.keys import rate_limit_key
from broker.settings import Settings
from workers.rate_limit import (
    ADMIT_LUA,
    DEFAULT_BURST_S,
    RateLimit,
    RedisRateLimiter,
    estimate_tokens,
)

T = TypeVar("T")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.config_resetstat()
    client.close()
    return redis_server.url


def run(url: str, body: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
    """Run ``body`` with a fresh asyncio client on a fresh event loop."""
    async def main() -> T:
        client = redis.asyncio.Redis.from_url(url)
        try:
            return await body(client)
        finally:
            await client.aclose()
    return asyncio.run(main())


def limiter(client: redis.asyncio.Redis, limit: RateLimit,
            model: str = "judge") -> RedisRateLimiter:
    """A limiter with seeded jitter."""
    return RedisRateLimiter(client, model, limit, rng=random.Random(0))


async def decisions(rl: RedisRateLimiter, costs: list[int]) -> list[float]:
    """One ``try_acquire`` per cost, back to back: 0.0 admitted, else seconds to wait."""
    return [await rl.try_acquire(cost) for cost in costs]


def evalsha_calls(url: str) -> int:
    client = redis.Redis.from_url(url)
    stats = client.info("commandstats")
    client.close()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def tat_ms(url: str, model: str, dimension: str) -> float | None:
    client = redis.Redis.from_url(url)
    raw = client.get(rate_limit_key(model, dimension))
    client.close()
    return None if raw is None else float(raw)


# --- value objects and the estimate ---------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"rpm": 0}, {"tpm": -5}, {"burst_s": -0.1},
                                    {"burst_s": float("nan")}, {"rpm": True}])
def test_impossible_limits_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_limit_from_settings() -> None:
    assert RateLimit.from_settings(Settings(judge_rpm=3000, judge_tpm=90_000)) == RateLimit(
        rpm=3000, tpm=90_000, burst_s=DEFAULT_BURST_S)
    assert RateLimit.from_settings(Settings()).unlimited


def test_estimate_tokens_counts_chars_over_four_plus_overhead_and_reply() -> None:
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "x" * 9},                       # 3 tokens (ceil)
        {"role": "user", "content": [{"type": "text", "text": "y" * 8},
                                     {"type": "image_url", "image_url": {"url": "u"}}]},
        {"role": "assistant", "content": None},
    ]
    assert estimate_tokens(messages, max_tokens=64) == 3 + 2 + 3 * 3 + 64
    assert estimate_tokens([], max_tokens=0) == 0
    with pytest.raises(ValueError):
        estimate_tokens([], max_tokens=-1)


# --- one caller: the arithmetic of the real script ------------------------------------


def test_no_limit_returns_at_once_and_never_touches_redis(url: str) -> None:
    async def body(client: redis.asyncio.Redis) -> list[float]:
        rl = limiter(client, RateLimit())
        waited = [await rl.acquire(10**9) for _ in range(100)]
        await rl.reconcile(10, 10**6)
        return waited + [await rl.try_acquire(5)]

    assert run(url, body) == [0.0] * 101
    client = redis.Redis.from_url(url)
    assert client.dbsize() == 0
    assert not any(name.startswith(("cmdstat_eval", "cmdstat_script"))
                   for name in client.info("commandstats"))
    client.close()


@pytest.mark.parametrize(("burst_s", "burst", "wait_s"), [
    (0.0, 1, 10.0), (DEFAULT_BURST_S, 1, 10.0), (50.0, 5, 10.0),
    (25.0, 2, 5.0),  # 2.5 requests of burst: the third is half an interval away
])
def test_rpm_admits_the_burst_then_asks_to_wait(
        url: str, burst_s: float, burst: int, wait_s: float) -> None:
    # 6 RPM: one request per 10 s, so 12 back-to-back calls all fall in one interval.
    async def body(client: redis.asyncio.Redis) -> list[float]:
        return await decisions(limiter(client, RateLimit(rpm=6, burst_s=burst_s)), [1] * 12)

    got = run(url, body)
    assert [w == 0 for w in got] == [True] * burst + [False] * (12 - burst)
    assert all(wait_s - 1.0 < w <= wait_s for w in got[burst:])
    assert tat_ms(url, "judge", "tpm") is None  # no token limit: token key untouched


def test_tpm_weighs_requests_by_tokens(url: str) -> None:
    # 600 TPM = 100 ms per token; burst 10 s = 100 tokens.
    limit = RateLimit(tpm=600, burst_s=10.0)

    async def body(client: redis.asyncio.Redis) -> tuple[list[float], list[float]]:
        exact = await decisions(limiter(client, limit, "a"), [40, 40, 20, 1])
        over = await decisions(limiter(client, limit, "b"), [40, 40, 40])
        return exact, over

    exact, over = run(url, body)
    assert exact[:3] == [0.0, 0.0, 0.0]     # 100 tokens: exactly the burst
    assert 0.0 < exact[3] <= 0.1            # one more token: wait for one token's time
    assert over[:2] == [0.0, 0.0]
    assert 1.5 < over[2] <= 2.0             # 120 tokens: 20 over, 2 s


def test_request_refused_by_tpm_consumes_no_rpm_and_vice_versa(url: str) -> None:
    async def tpm_refuses(client: redis.asyncio.Redis) -> tuple[list[float], list[float]]:
        # 10 requests and 100 tokens of burst; 100 tokens spent at once.
        rl = limiter(client, RateLimit(rpm=60, tpm=600, burst_s=10.0))
        refused = await decisions(rl, [100] + [50] * 5)
        return refused, await decisions(rl, [0] * 10)

    refused, zero_token = run(url, tpm_refuses)
    assert refused[0] == 0.0 and all(w > 0 for w in refused[1:])
    # 9 requests left: the 5 refused ones took none of the rpm capacity.
    assert [w == 0 for w in zero_token] == [True] * 9 + [False]

    async def rpm_refuses(client: redis.asyncio.Redis) -> list[float]:
        rl = limiter(client, RateLimit(rpm=6, tpm=600, burst_s=10.0), "other")
        return await decisions(rl, [10] * 6)

    got = run(url, rpm_refuses)
    assert got[0] == 0.0 and all(w > 8.0 for w in got[1:])  # rpm (10 s) refuses
    tokens_tat, requests_tat = tat_ms(url, "other", "tpm"), tat_ms(url, "other", "rpm")
    assert tokens_tat is not None and requests_tat is not None
    # The token stream holds exactly the admitted request's 10 tokens (1 s), not 60.
    assert requests_tat - tokens_tat == pytest.approx(10_000 - 1_000, abs=1.0)


def test_reconcile_moves_the_token_stream_forward_and_back(url: str) -> None:
    limit = RateLimit(tpm=600, burst_s=10.0)  # 100 ms per token, 100 tokens of burst

    async def body(client: redis.asyncio.Redis) -> list[float]:
        rl = limiter(client, limit)
        out = await decisions(rl, [50])
        await rl.reconcile(50, 90)               # used 40 more: 90 of 100 spent
        out += await decisions(rl, [20])         # 110 > 100: wait ~1 s
        await rl.reconcile(90, 10)               # used 80 fewer: 10 spent
        out += await decisions(rl, [90, 1])      # exactly full, then refused
        return out

    after_50, after_forward, *after_back = run(url, body)
    assert after_50 == 0.0
    assert 0.9 < after_forward <= 1.0
    assert after_back[0] == 0.0 and 0.0 < after_back[1] <= 0.1


def test_reconcile_never_gives_credit_below_now(url: str) -> None:
    limit = RateLimit(tpm=600, burst_s=10.0)

    async def body(client: redis.asyncio.Redis) -> list[float]:
        rl = limiter(client, limit)
        out = await decisions(rl, [10])
        await rl.reconcile(10_000, 0)            # far more "saved" than was ever spent
        assert await client.exists(rate_limit_key("judge", "tpm")) == 0
        return out + await decisions(rl, [100, 1])

    assert run(url, body)[:2] == [0.0, 0.0]
    assert 0.0 < run(url, lambda c: limiter(c, limit).try_acquire(1)) <= 0.1


def test_reconcile_on_an_idle_stream_charges_from_now(url: str) -> None:
    limit = RateLimit(tpm=600, burst_s=10.0)

    async def body(client: redis.asyncio.Redis) -> list[float]:
        rl = limiter(client, limit)
        await rl.reconcile(0, 50)                # 50 tokens nobody estimated
        return await decisions(rl, [60, 50])

    refused, admitted = run(url, body)
    assert 0.9 < refused <= 1.0 and admitted == 0.0


def test_reconcile_without_token_limit_writes_nothing(url: str) -> None:
    run(url, lambda c: limiter(c, RateLimit(rpm=60)).reconcile(1, 5000))
    client = redis.Redis.from_url(url)
    assert client.dbsize() == 0
    client.close()


def test_request_larger_than_the_token_burst_is_admitted_not_deadlocked(url: str) -> None:
    limit = RateLimit(tpm=600, burst_s=1.0)  # burst: 10 tokens (1 s); 300 tokens = 30 s

    async def idle(client: redis.asyncio.Redis) -> list[float]:
        return await decisions(limiter(client, limit, "idle"), [300, 1])

    admitted, then = run(url, idle)
    assert admitted == 0.0          # an idle stream admits it whole
    assert 28.0 < then <= 29.1      # and later requests pay for all 300 tokens

    async def busy(client: redis.asyncio.Redis) -> tuple[float, float, float]:
        rl = limiter(client, limit, "busy")
        small = await rl.try_acquire(5)         # 0.5 s of backlog
        waited = await rl.acquire(300)          # must wait for the backlog, then pass
        return small, waited, await rl.try_acquire(1)

    small, waited, after = run(url, busy)
    assert small == 0.0
    assert waited > 0.4             # it did wait for Redis's clock to pass the backlog
    assert after > 28.0


def test_models_do_not_share_state(url: str) -> None:
    limit = RateLimit(rpm=6, tpm=600, burst_s=0.0)

    async def body(client: redis.asyncio.Redis) -> list[float]:
        a, b = limiter(client, limit, "model-a"), limiter(client, limit, "model-b")
        return await decisions(a, [1, 1]) + await decisions(b, [1, 1])

    got = run(url, body)
    assert got[0] == 0.0 and got[1] > 0 and got[2] == 0.0 and got[3] > 0
    client = redis.Redis.from_url(url)
    assert sorted(client.keys()) == sorted(
        rate_limit_key(m, d).encode() for m in ("model-a", "model-b") for d in ("rpm", "tpm"))
    client.close()


def test_keys_expire_once_the_limiter_is_idle(url: str) -> None:
    # 6,000 RPM: 10 ms per request; 60,000 TPM: 1 ms per token, 50 tokens = 50 ms.
    async def body(client: redis.asyncio.Redis) -> tuple[list[int], int]:
        await limiter(client, RateLimit(rpm=6000, tpm=60_000)).acquire(50)
        ttls = [await client.pttl(rate_limit_key("judge", d)) for d in ("rpm", "tpm")]
        await asyncio.sleep(0.2)
        return ttls, await client.exists(*(rate_limit_key("judge", d) for d in ("rpm", "tpm")))

    (rpm_ttl, tpm_ttl), left = run(url, body)
    assert 0 < rpm_ttl <= 10 and 0 < tpm_ttl <= 50
    assert left == 0


def test_a_lost_redis_is_an_outage_that_the_task_retries() -> None:
    """Both limiter calls raise ``BrokerUnavailableError`` when Redis is gone, and that is
    one of the outage policy's errors (issue 10: it was not, so the item was
    dead-lettered instead of its chunk being scored again)."""
    async def body() -> list[BaseException]:
        client = redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
        rl = limiter(client, RateLimit(rpm=60, tpm=6000))
        raised = []
        for call in (lambda: rl.acquire(10), lambda: rl.reconcile(10, 20)):
            with pytest.raises(BrokerUnavailableError) as info:
                await call()
            raised.append(info.value)
        await client.aclose()
        return raised

    errors = asyncio.run(body())

    assert all(isinstance(e, OUTAGE_ERRORS) for e in errors)
    assert all("rate limiter for 'judge'" in str(e) for e in errors)


def test_negative_token_counts_are_refused(url: str) -> None:
    async def body(client: redis.asyncio.Redis) -> None:
        rl = limiter(client, RateLimit(tpm=600))
        with pytest.raises(ValueError):
            await rl.acquire(-1)
        with pytest.raises(ValueError):
            await rl.reconcile(-1, 3)

    run(url, body)


# --- many callers ---------------------------------------------------------------------


def _hammer(url: str, model: str, rpm: int, seconds: float, seed: int,
            start: Barrier, out: Queue[list[int]]) -> None:
    """One OS process calling the real admission script as fast as it is told to wait.

    Each attempt runs in MULTI with a TIME right after the script, so an admission's
    timestamp is Redis's clock at (within microseconds of) the admission itself.
    """
    client = redis.Redis.from_url(url)
    script = client.register_script(ADMIT_LUA)
    keys = [rate_limit_key(model, "rpm"), rate_limit_key(model, "tpm")]
    args = RateLimit(rpm=rpm).admit_args(1)
    rng = random.Random(seed)
    admitted_us: list[int] = []
    start.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pipe = client.pipeline(transaction=True)
        script(keys=keys, args=args, client=pipe)
        pipe.time()
        wait_ms, (sec, usec) = pipe.execute()
        if wait_ms == 0:
            admitted_us.append(sec * 1_000_000 + usec)
        else:  # often wake early, so processes collide at every slot
            time.sleep(rng.uniform(0, wait_ms / 1000))
    out.put(admitted_us)
    client.close()


def max_in_window(stamps_us: list[int], window_us: int) -> int:
    """Most stamps inside any closed window of ``window_us``."""
    stamps, best, lo = sorted(stamps_us), 0, 0
    for hi, stamp in enumerate(stamps):
        while stamp - stamps[lo] > window_us:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.parametrize(("rpm", "window_max"), [(600, 11), (3000, 52)])
def test_eight_processes_never_exceed_rate_plus_burst_in_any_second(
        url: str, rpm: int, window_max: int) -> None:
    # 600 RPM, default burst (< 1 request): 10/s + 1. 3,000 RPM: 50/s + 2.5 burst = 52,
    # the bound of 55 with room to spare.
    procs, seconds = 8, 2.0
    # spawn, not fork: the test process may hold threads and sockets of earlier tests.
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(url, "shared", rpm, seconds, i, start, out))
               for i in range(procs)]
    for w in workers:
        w.start()
    stamps = [s for _ in workers for s in out.get(timeout=30)]
    for w in workers:
        w.join(10)
        assert w.exitcode == 0

    interval_us = 60_000_000 / rpm
    assert max_in_window(stamps, 1_000_000) <= window_max <= 55
    span_us = max(stamps) - min(stamps)
    tolerance_us = max(DEFAULT_BURST_S * 1_000_000, interval_us)
    assert len(stamps) <= (span_us + tolerance_us) / interval_us
    assert len(stamps) >= 0.5 * span_us / interval_us  # callers kept busy: no stall
    assert len(set(stamps)) == len(stamps)


def test_many_waiters_on_separate_connections_are_paced_without_busy_polling(
        url: str) -> None:
    # Four limiters (one per "worker process", each its own connection pool) with 16
    # waiting tasks each, at 2,400 RPM (25 ms per request, burst 2 requests).
    limit, processes, tasks = RateLimit(rpm=2400), 4, 16
    n = processes * tasks

    async def body(client: redis.asyncio.Redis) -> tuple[list[float], int]:
        clients = [redis.asyncio.Redis.from_url(url) for _ in range(processes)]
        limiters = [limiter(c, limit, "paced") for c in clients]
        began = await client.time()
        waited = await asyncio.gather(*(rl.acquire(1) for rl in limiters
                                        for _ in range(tasks)))
        ended = await client.time()
        for c in clients:
            await c.aclose()
        elapsed_ms = (ended[0] - began[0]) * 1000 + (ended[1] - began[1]) // 1000
        return list(waited), elapsed_ms

    waited, elapsed_ms = run(url, body)
    assert len(waited) == n and all(w >= 0 for w in waited)
    # Redis's clock: n admissions need at least (n - burst) intervals.
    assert elapsed_ms >= n * 25 - 50 - 1
    # One call per waiting head per slot, not a poll loop (a busy loop makes thousands).
    assert evalsha_calls(url) <= 2 * processes * n
