"""Several judge endpoints: least-outstanding routing, circuit breakers, failover, metrics.

The state machine and the choice are pure (a clock of the test's own, no sleeps);
the judge client is driven in-process against real local judges over HTTP, one of them
a port nobody listens on; the acceptance test runs real worker processes against three
``python -m rewardq.judge_server`` processes and SIGKILLs one mid-run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import worker_logs
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scoring_data import expected, make_items
from worker_endpoints import worker_endpoints

from rewardq.broker.embedded import free_port
from rewardq.broker.errors import JudgeErrorKind, PermanentJudgeError, TransientJudgeError
from rewardq.broker.schemas import ResultStatus
from rewardq.broker.settings import Settings
from rewardq.judge_server.config import JudgeConfig
from rewardq.judge_server.server import BackgroundJudgeServer
from rewardq.monitoring.metrics import WorkerMetrics
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess, start_judge
from rewardq.workers.endpoints import (
    BreakerState,
    CircuitBreaker,
    EndpointPool,
    NoEndpointError,
    endpoint_label,
    is_endpoint_failure,
)
from rewardq.workers.judge_client import JudgeClient
from rewardq.workers.retry import RetryPolicy, decide

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples carrying ``labels``."""
    return sum(v for (n, lbls), v in found.items()
               if n == name and labels.items() <= dict(lbls).items())


def scrape(metrics: WorkerMetrics) -> Samples:
    return samples(generate_latest(metrics.registry).decode())


# -- the breaker: a pure state machine ----------------------------------------------

def test_breaker_opens_after_consecutive_failures_and_a_probe_decides() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, cooldown_s=10.0, clock=clock)
    assert b.state is BreakerState.CLOSED and b.available()
    assert b.failed() is None and b.failed() is None
    assert b.succeeded() is None  # a success in between resets the count
    assert b.failed() is None and b.failed() is None
    assert b.failed() is BreakerState.OPEN  # three in a row
    assert not b.available() and b.reopens_in_s() == pytest.approx(10.0)
    clock.now += 9.9
    assert not b.available()
    clock.now += 0.1
    assert b.available() and b.reopens_in_s() == 0.0
    assert b.start_call() is BreakerState.HALF_OPEN  # this call is the probe
    assert not b.available()  # one probe at a time
    assert b.failed() is BreakerState.OPEN  # the probe failed: open again, a new cooldown
    assert not b.available() and b.reopens_in_s() == pytest.approx(10.0)
    clock.now += 10.0
    assert b.start_call() is BreakerState.HALF_OPEN
    assert b.succeeded() is BreakerState.CLOSED
    assert b.available() and b.consecutive_failures == 0
    assert b.failed() is None  # counting starts afresh


def test_a_failure_of_a_call_started_before_the_breaker_opened_keeps_its_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=5.0, clock=clock)
    assert b.failed() is BreakerState.OPEN
    clock.now += 4.0
    assert b.failed() is None  # a late failure of an older call
    clock.now += 1.0
    assert b.available()


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
    b.failed()
    clock.now += 1.0
    b.start_call()
    assert b.state is BreakerState.HALF_OPEN and not b.available()
    b.abandoned()  # cancelled mid-flight
    assert b.available() and b.state is BreakerState.HALF_OPEN


def test_a_breaker_needs_a_positive_threshold_and_cooldown() -> None:
    with pytest.raises(ValueError, match="failures >= 1"):
        CircuitBreaker(failures=0, cooldown_s=1.0)
    with pytest.raises(ValueError, match="cooldown_s > 0"):
        CircuitBreaker(failures=1, cooldown_s=0.0)


@pytest.mark.parametrize(("error", "down"), [
    (TransientJudgeError("x", kind=JudgeErrorKind.NETWORK), True),
    (TransientJudgeError("x", kind=JudgeErrorKind.TIMEOUT), True),
    (TransientJudgeError("x", status_code=500), True),
    (TransientJudgeError("x", status_code=503), True),
    (TransientJudgeError("x", status_code=429), False),
    (PermanentJudgeError("x", status_code=400), False),
    (PermanentJudgeError("x", status_code=401), False),
])
def test_only_a_down_endpoint_counts_against_its_breaker(error: TransientJudgeError,
                                                         down: bool) -> None:
    assert is_endpoint_failure(error) is down


def test_endpoint_labels_carry_no_credentials() -> None:
    assert endpoint_label("https://user:secret@judge.example/v1") == "https://judge.example/v1"
    assert endpoint_label("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


# -- the pool: least outstanding, skipping open breakers -----------------------------

URLS = ["http://a/v1", "http://b/v1", "http://c/v1"]


def test_calls_go_to_the_endpoint_with_fewest_in_flight() -> None:
    pool = EndpointPool(URLS, failures=3, cooldown_s=10.0, clock=Clock())
    a, b, c = pool.endpoints
    held = [pool.acquire() for _ in range(6)]  # ties round-robin: two each
    assert [e.in_flight for e in pool.endpoints] == [2, 2, 2]
    pool.release(a, "ok", failure=False)
    pool.release(a, "ok", failure=False)
    assert pool.acquire() is a and pool.acquire() is a  # a is the least busy
    pool.release(c, "ok", failure=False)
    assert pool.acquire() is c
    assert len(held) == 6


def test_ties_rotate_so_one_call_at_a_time_spreads_evenly() -> None:
    pool = EndpointPool(URLS, failures=3, cooldown_s=10.0, clock=Clock())
    counts = dict.fromkeys(URLS, 0)
    for _ in range(300):
        e = pool.acquire()
        assert e is not None
        counts[e.base_url] += 1
        pool.release(e, "ok", failure=False)
    assert counts == dict.fromkeys(URLS, 100)


def test_open_and_already_tried_endpoints_are_skipped_until_none_is_left() -> None:
    clock = Clock()
    pool = EndpointPool(URLS, failures=1, cooldown_s=10.0, clock=clock)
    a, b, c = pool.endpoints
    assert pool.acquire(exclude=[a, c]) is b  # a failover goes elsewhere
    pool.release(b, "network", failure=True)  # b opens
    assert b.breaker.state is BreakerState.OPEN
    for _ in range(10):
        e = pool.acquire()
        assert e in (a, c)
        pool.release(e, "ok", failure=False)
    assert pool.acquire(exclude=[a, c]) is None
    for e in (a, c):
        got = pool.acquire(exclude=[x for x in (a, c) if x is not e])
        assert got is e
        pool.release(e, "500", failure=True)
    assert pool.acquire() is None  # every breaker open
    error = pool.unavailable_error()
    assert isinstance(error, NoEndpointError) and isinstance(error, TransientJudgeError)
    assert error.retry_after_s == pytest.approx(10.0)
    # The retry layer retries it after the cooldown, so the item is not lost.
    decision = decide(RetryPolicy(), error, attempt=1, remaining_s=60.0)
    assert decision.retry and decision.delay_s >= 10.0
    clock.now += 10.0
    probe = pool.acquire()  # b opened first; all three may probe now
    assert probe is not None and probe.breaker.state is BreakerState.HALF_OPEN


def test_a_half_open_endpoint_gets_one_probe_and_its_success_closes_it(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    metrics = WorkerMetrics()
    pool = EndpointPool(URLS[:2], failures=2, cooldown_s=0.5, clock=clock, metrics=metrics)
    a, b = pool.endpoints
    caplog.set_level("INFO", logger="rewardq.workers.endpoints")
    for _ in range(2):
        assert pool.acquire(exclude=[a]) is b
        pool.release(b, "network", failure=True)
    s = scrape(metrics)
    label_b = {"endpoint": "http://b/v1"}
    assert value(s, "rewardq_judge_endpoint_breaker_state", **label_b) == 1
    assert value(s, "rewardq_judge_endpoint_breaker_state", endpoint="http://a/v1") == 0
    assert value(s, "rewardq_judge_endpoint_requests_total", status="network", **label_b) == 2
    opened = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(opened) == 1 and "http://b/v1" in opened[0].getMessage()

    assert pool.acquire() is a  # b is out: a gets the call, and keeps it in flight
    clock.now += 0.5
    assert pool.acquire() is b  # b, with fewer in flight, gets the probe
    s = scrape(metrics)
    assert value(s, "rewardq_judge_endpoint_breaker_state", **label_b) == 2
    assert value(s, "rewardq_judge_endpoint_in_flight", **label_b) == 1
    assert pool.acquire() is a and pool.acquire() is a  # no second call to b meanwhile
    pool.release(b, "ok", failure=False)
    s = scrape(metrics)
    assert value(s, "rewardq_judge_endpoint_breaker_state", **label_b) == 0
    assert value(s, "rewardq_judge_endpoint_in_flight", **label_b) == 0
    assert value(s, "rewardq_judge_endpoint_in_flight", endpoint="http://a/v1") == 3
    closed = [r for r in caplog.records if r.levelname == "INFO"]
    assert len(closed) == 1 and "closed" in closed[0].getMessage()
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


# -- the judge client over real HTTP -------------------------------------------------

def dead_url() -> str:
    """A base URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}/v1"


async def calls(client: JudgeClient, settings: Settings, n: int,
                between_s: float = 0.0) -> list[Any]:
    """``n`` sequential ``client.complete`` calls; each reply or the error it raised."""
    out: list[Any] = []
    for i in range(n):
        body = {"model": settings.judge_model, "max_tokens": 32, "messages": [
            {"role": "user", "content": f"What is {i} + 1? The answer is {i + 1}."}]}
        try:
            out.append(await client.complete(settings.judge_model, body, 32))
        except TransientJudgeError as exc:
            out.append(exc)
        await asyncio.sleep(between_s)
    return out


def complete_n(settings: Settings, metrics: WorkerMetrics, n: int) -> list[Any]:
    """``n`` sequential calls of a fresh ``JudgeClient`` (see :func:`calls`)."""
    async def run() -> list[Any]:
        client = JudgeClient(settings, metrics=metrics)
        try:
            return await calls(client, settings, n)
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.fixture
def live_judges() -> Iterator[list[BackgroundJudgeServer]]:
    """Two judges in threads of this process."""
    with BackgroundJudgeServer(JudgeConfig()) as a, BackgroundJudgeServer(JudgeConfig()) as b:
        yield [a, b]


def requests_total(server: BackgroundJudgeServer) -> int:
    total: int = httpx.get(server.base_url.removesuffix("/v1") + "/stats").json()[
        "requests_total"]
    return total


def test_a_dead_endpoint_costs_no_call_and_its_breaker_opens(
        live_judges: list[BackgroundJudgeServer]) -> None:
    dead = dead_url()
    settings = Settings(judge_base_urls=[dead, *(j.base_url for j in live_judges)],
                        judge_breaker_failures=2, judge_breaker_cooldown_s=600,
                        judge_timeout_s=10)
    metrics = WorkerMetrics()
    replies = complete_n(settings, metrics, 40)

    assert all(not isinstance(r, Exception) for r in replies), replies
    counts = [requests_total(j) for j in live_judges]
    assert sum(counts) == 40 and min(counts) >= 15, counts
    s = scrape(metrics)
    assert value(s, "rewardq_judge_endpoint_breaker_state", endpoint=dead) == 1
    for j, count in zip(live_judges, counts, strict=True):
        assert value(s, "rewardq_judge_endpoint_breaker_state", endpoint=j.base_url) == 0
        assert value(s, "rewardq_judge_endpoint_requests_total", endpoint=j.base_url,
                     status="ok") == count
    # Two failed attempts on the dead one opened it; each went on to a live endpoint.
    failed = value(s, "rewardq_judge_endpoint_requests_total", endpoint=dead)
    assert failed == 2
    assert value(s, "rewardq_judge_endpoint_failovers_total", endpoint=dead) == failed


def test_5xx_fails_over_and_a_probe_closes_the_breaker_once_the_endpoint_recovers(
        live_judges: list[BackgroundJudgeServer]) -> None:
    healthy, sick = live_judges
    admin = sick.base_url.removesuffix("/v1") + "/admin/config"
    httpx.post(admin, json={"error_rate": 1.0, "error_kinds": ["500"]}).raise_for_status()
    settings = Settings(judge_base_urls=[healthy.base_url, sick.base_url],
                        judge_breaker_failures=3, judge_breaker_cooldown_s=0.05)
    metrics = WorkerMetrics()
    phases: list[Samples] = []

    async def run() -> list[Any]:
        client = JudgeClient(settings, metrics=metrics)
        try:
            first = await calls(client, settings, 10)
            phases.append(scrape(metrics))
            httpx.post(admin, json={"error_rate": 0.0}).raise_for_status()
            phases.append({("before", ()): requests_total(sick)})
            return first + await calls(client, settings, 10, between_s=0.06)
        finally:
            await client.close()

    replies = asyncio.run(run())
    assert all(not isinstance(r, Exception) for r in replies), replies
    sick_open, before, s = phases[0], phases[1][("before", ())], scrape(metrics)
    assert value(sick_open, "rewardq_judge_endpoint_breaker_state",
                 endpoint=sick.base_url) == 1
    assert value(sick_open, "rewardq_judge_endpoint_requests_total", endpoint=sick.base_url,
                 status="500") >= 3
    assert value(sick_open, "rewardq_judge_endpoint_failovers_total",
                 endpoint=sick.base_url) >= 3
    assert value(s, "rewardq_judge_endpoint_breaker_state", endpoint=sick.base_url) == 0
    assert requests_total(sick) - before >= 3  # probed, closed, and back in the rotation


def test_every_endpoint_down_fails_transiently_and_says_when_to_try_again() -> None:
    urls = [dead_url(), dead_url()]
    settings = Settings(judge_base_urls=urls, judge_breaker_failures=1,
                        judge_breaker_cooldown_s=600)
    metrics = WorkerMetrics()
    first, second = complete_n(settings, metrics, 2)
    # The first call tried both (failover), the second found every breaker open.
    assert isinstance(first, TransientJudgeError) and not isinstance(first, NoEndpointError)
    assert isinstance(second, NoEndpointError) and second.retry_after_s is not None
    assert 0 < second.retry_after_s <= 600
    s = scrape(metrics)
    for url in urls:
        assert value(s, "rewardq_judge_endpoint_breaker_state", endpoint=url) == 1
        assert value(s, "rewardq_judge_endpoint_requests_total", endpoint=url) == 1
    assert value(s, "rewardq_judge_requests_total") == 2  # two HTTP attempts, no third


def test_one_endpoint_takes_the_direct_path_without_per_endpoint_series(
        live_judges: list[BackgroundJudgeServer]) -> None:
    settings = Settings(judge_base_url=live_judges[0].base_url)
    metrics = WorkerMetrics()
    assert all(not isinstance(r, Exception) for r in complete_n(settings, metrics, 3))
    s = scrape(metrics)
    assert value(s, "rewardq_judge_endpoint_requests_total") == 0
    assert not [name for name, _ in s if "endpoint" in name]


# -- acceptance: real workers, three judge processes, one SIGKILLed ---------------

@pytest.fixture
def judge_processes() -> Iterator[list[JudgeProcess]]:
    """Three ``python -m rewardq.judge_server`` processes, 30 ms per answer."""
    started: list[JudgeProcess] = []
    try:
        for _ in range(3):
            started.append(start_judge(latency_ms=30))
        yield started
    finally:
        for j in started:
            j.stop()


def total_requests(judges: list[JudgeProcess]) -> int:
    return sum(j.stats()["requests_total"] for j in judges)


@pytest.mark.timeout(360)
def test_a_judge_sigkilled_mid_run_costs_no_item_and_the_rest_share_the_load(
        settings: Settings, workers, judge_processes: list[JudgeProcess],
        tmp_path: Path) -> None:
    """Acceptance: 2,000 items, 3 judge endpoints, one SIGKILLed mid-run -> all ``ok``,
    the live endpoints' calls within +-20% of each other's mean, the dead one's breaker
    open on every worker (read from their metrics endpoints)."""
    live, victim = judge_processes[:2], judge_processes[2]
    urls = [j.base_url for j in judge_processes]
    workers(2, metrics_port=0, judge_base_urls=urls, judge_breaker_failures=3,
            judge_breaker_cooldown_s=600, max_concurrent_requests=16)
    items = make_items(2000, "route")
    with RewardClient(settings) as client:
        pending = client.submit(items, step=1)
        deadline = time.monotonic() + 120
        while total_requests(judge_processes) < 400:
            assert time.monotonic() < deadline, "the judges got no traffic"
            time.sleep(0.02)
        before_kill = victim.stats()["requests_total"]
        os.kill(victim.process.pid, signal.SIGKILL)
        results = pending.result(timeout=300)

    assert victim.process.wait(10) == -signal.SIGKILL
    assert [r.id for r in results] == [i["id"] for i in items]
    bad = [r for r in results if r.status is not ResultStatus.OK]
    assert not bad, f"{len(bad)} not ok, e.g. {bad[:3]}\n{worker_logs(tmp_path)[-3000:]}"
    assert [r.score for r in results] == [expected(i)[0] for i in items]

    counts = [j.stats()["requests_total"] for j in live]
    mean = sum(counts) / len(counts)
    print(f"\nlive endpoints' calls {counts}; the victim had {before_kill} before its kill; "
          f"retried items {sum(r.attempts > 1 for r in results)}")
    assert all(abs(c - mean) <= 0.2 * mean for c in counts), counts
    assert sum(counts) + before_kill >= 2000

    endpoints = worker_endpoints(settings)
    assert len(endpoints) == 2
    found = [samples(httpx.get(e.url_for("127.0.0.1")).text) for e in endpoints.values()]
    for s in found:
        assert value(s, "rewardq_judge_endpoint_breaker_state", endpoint=victim.base_url) == 1
        for j in live:
            assert value(s, "rewardq_judge_endpoint_breaker_state", endpoint=j.base_url) == 0
    for j, count in zip(live, counts, strict=True):
        assert sum(value(s, "rewardq_judge_endpoint_requests_total", endpoint=j.base_url,
                         status="ok") for s in found) == count
    assert sum(value(s, "rewardq_judge_endpoint_failovers_total", endpoint=victim.base_url)
               for s in found) >= 2 * 3  # the failures that opened each worker's breaker
    assert worker_logs(tmp_path).count("circuit breaker open") == 2  # one WARNING per worker
