"""Reliability with real processes: crashes, judge faults, duplicates, deadlines, outages.

Every test here runs real ``celery -P gevent`` workers against the local judge server
and a real Redis. Long ones carry an explicit ``timeout`` mark; figures (e.g. how long a
SIGKILLed worker's chunks took to come back) are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import worker_logs
from hypothesis import given
from hypothesis import strategies as st
from scoring_data import expected, make_items

from rewardq.broker.app import create_app
from rewardq.broker.embedded import EmbeddedRedis, free_port
from rewardq.broker.errors import BrokerUnavailableError, InvalidItemError, ScoringTimeoutError
from rewardq.broker.schemas import JudgeSpec, ResultStatus, ScoreItem, parse_items
from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess
from rewardq.workers.tasks import MalformedChunkError, parse_chunk_message


def wait_for_calls(judge: JudgeProcess, at_least: int, timeout: float = 120.0) -> None:
    """Block until the judge has received ``at_least`` requests."""
    deadline = time.monotonic() + timeout
    while judge.stats()["requests_total"] < at_least:
        if time.monotonic() > deadline:
            pytest.fail(f"the judge did not get {at_least} requests within {timeout}s")
        time.sleep(0.02)


def tasks_run_per_worker(settings: Settings) -> dict[str, int]:
    """How many scoring tasks each live worker has run (Celery's inspect stats)."""
    app = create_app(settings)
    try:
        stats = app.control.inspect(timeout=2).stats() or {}
    finally:
        app.close()
    return {name: s["total"].get("rewardq.score_chunk", 0) for name, s in stats.items()}


# --- bad input at the edges: pure, fuzzed ----------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
_item_like = st.fixed_dictionaries(
    {}, optional={"id": _json | st.text(min_size=1, max_size=8), "prompt": _json | st.text(),
                  "response": _json | st.text(), "reference": _json, "uid": _json,
                  "metadata": _json, "extra": _json})


@given(st.lists(_item_like | _json, max_size=6))
def test_item_validation_names_each_bad_item_and_raises_nothing_else(raw: list[object]
                                                                     ) -> None:
    try:
        items = parse_items(raw)
    except InvalidItemError as exc:
        assert exc.problems
        assert all(p.startswith("item ") for p in exc.problems)
        bad = {int(p.split()[1].split(":")[0]) for p in exc.problems}
        assert bad <= set(range(len(raw)))
        return
    assert len(items) == len(raw) and all(isinstance(i, ScoreItem) for i in items)


_SPEC = JudgeSpec(model="m", prompt_version="v1").model_dump(mode="json")


@given(items=st.lists(_item_like | _json, min_size=1, max_size=6),
       envelope=st.fixed_dictionaries({}, optional={
           "job_id": _json, "chunk_index": _json, "step": _json, "spec": _json | st.just(_SPEC),
           "deadline": _json, "junk": _json}),
       extra_args=st.lists(_json, max_size=2))
def test_any_task_message_parses_to_items_and_invalid_results_or_is_malformed(
        items: list[object], envelope: dict[str, object], extra_args: list[object]) -> None:
    payload = {"job_id": "j", "chunk_index": 0, "spec": _SPEC, "deadline": 1e10,
               **envelope, "items": items}
    try:
        chunk, invalid = parse_chunk_message((payload, *extra_args), {})
    except MalformedChunkError as exc:
        assert str(exc).startswith("malformed chunk message: ")
        return
    assert not extra_args
    valid = len(chunk.items) if chunk is not None else 0
    assert valid + len(invalid) == len(items)
    assert all(r.status is ResultStatus.INVALID and r.error for r in invalid.values())


@pytest.mark.timeout(300)
def test_a_worker_sigkilled_mid_run_loses_nothing(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path) -> None:
    """Acceptance: 1,000 items, 2 workers, judge latency 200 ms, one worker SIGKILLed
    mid-run -> all 1,000 results arrive, all ``ok``. (Long: ~15-30 s.)"""
    judge.configure(latency_ms=200)
    # Short leases and locks so the dead worker's chunks and locks lapse in seconds.
    victim, survivor = workers(2, worker_concurrency=8, chunk_lease_s=3.0,
                               inflight_lock_ttl_s=3.0)
    items = make_items(1000, "crash")
    with RewardClient(settings) as client:
        pending = client.submit(items, step=1)
        wait_for_calls(judge, 300)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        results = pending.result(timeout=240)
        recovered_s = time.monotonic() - killed_at

    calls = judge.stats()["requests_total"]
    print(f"\nSIGKILL -> all results: {recovered_s:.1f}s; judge calls {calls} for 1000 items")
    assert victim.wait(10) == -signal.SIGKILL and survivor.poll() is None
    assert [r.id for r in results] == [i["id"] for i in items]
    bad = [r for r in results if r.status is not ResultStatus.OK]
    assert not bad, f"{len(bad)} not ok, e.g. {bad[:3]}\n{worker_logs(tmp_path)[-3000:]}"
    assert [r.score for r in results] == [expected(i)[0] for i in items]
    # The redelivered chunks cost only what was in flight in the dead worker
    # (8 chunks of chunk_size items at most), not their finished items.
    assert 1000 <= calls <= 1000 + 8 * settings.chunk_size


@pytest.mark.timeout(240)
def test_judge_faults_are_retried_until_every_item_is_ok(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """Acceptance: 30% injected 429/500 -> all ``ok``; /stats shows the retries; no item
    is judged twice once it has succeeded."""
    judge.configure(error_rate=0.3, error_kinds=["429", "500"], retry_after_s=0.05,
                    latency_ms=20, seed=4)
    workers(2, judge_max_attempts=12)
    items = make_items(400, "faulty")
    with RewardClient(settings) as client:
        results = client.score(items, timeout=180)

    stats = judge.stats()
    by_status = stats["responses_by_status"]
    assert all(r.status is ResultStatus.OK for r in results), \
        [r for r in results if r.status is not ResultStatus.OK][:3]
    assert [r.score for r in results] == [expected(i)[0] for i in items]
    assert by_status.get("429", 0) > 0 and by_status.get("500", 0) > 0
    assert by_status["200"] == 400 and stats["requests_total"] > 400
    assert stats["max_ok_per_prompt"] == 1
    retried = [r for r in results if r.attempts > 1]
    assert retried and sum(r.attempts for r in results) == stats["requests_total"]


@pytest.mark.timeout(180)
def test_200_copies_of_one_item_across_two_workers_make_one_judge_call(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """Acceptance: identical requests in flight at once, in one chunk or across workers,
    make exactly one judge call."""
    judge.configure(latency_ms=1000)
    workers(2, worker_concurrency=32)
    one = make_items(1, "dup")[0]
    copies = [{**one, "id": f"dup-copy-{n}"} for n in range(200)]
    small_chunks = settings.model_copy(update={"chunk_size": 4})
    with RewardClient(small_chunks) as client:
        pending = client.submit(copies)
        results = pending.result(timeout=120)

    per_worker = tasks_run_per_worker(settings)
    assert pending.chunk_count == 50
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
    assert judge.stats()["requests_total"] == 1
    assert {r.status for r in results} == {ResultStatus.OK}
    assert {r.score for r in results} == {expected(one)[0]}
    assert sum(not r.cached for r in results) == 1  # one owner; every copy else joined


@pytest.mark.timeout(180)
def test_a_judge_call_longer_than_the_lock_ttl_is_not_duplicated(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """In-flight locks are renewed while held: a 6 s call under a 2.4 s lock TTL stays
    the only call, though a second worker wants the same item all along."""
    judge.configure(latency_ms=6000)
    workers(2, inflight_lock_ttl_s=2.4, worker_concurrency=1)
    one = make_items(1, "slow")[0]
    with RewardClient(settings.model_copy(update={"chunk_size": 1})) as client:
        results = client.score([{**one, "id": f"slow-{n}"} for n in range(2)], timeout=60)

    assert [r.status for r in results] == [ResultStatus.OK] * 2
    assert judge.stats()["requests_total"] == 1
    assert sorted(tasks_run_per_worker(settings).values()) == [1, 1]


@pytest.mark.timeout(180)
def test_a_chunk_running_longer_than_its_lease_is_not_handed_out_twice(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """A live worker renews its chunks' leases: a chunk taking 2.5x its lease runs once."""
    judge.configure(latency_ms=7500)
    workers(2, chunk_lease_s=3.0)
    with RewardClient(settings) as client:
        results = client.score(make_items(4, "lease"), timeout=60)

    assert {r.status for r in results} == {ResultStatus.OK}
    assert sum(tasks_run_per_worker(settings).values()) == 1
    assert judge.stats()["requests_total"] == 4


@pytest.mark.timeout(180)
def test_partial_results_let_the_trainer_move_on_and_late_ones_land_in_the_cache(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    judge.configure(latency_ms=2500)
    workers(1)
    items = make_items(30, "late")
    with RewardClient(settings) as client:
        pending = client.submit(items)
        partial = pending.result(timeout=0.5, partial=True)
        with pytest.raises(ScoringTimeoutError, match="still pending"):
            pending.result(timeout=0.1)
        pending.result(timeout=120)  # the fleet goes on after the trainer moved on
        again = client.submit(items)
        cached = again.result(timeout=10)

    assert [r.id for r in partial] == [i["id"] for i in items]
    assert {r.status for r in partial} == {ResultStatus.TIMEOUT}
    assert all(r.score is None and r.error for r in partial)
    assert again.chunk_count == 0 and again.cache_hits_at_submit == 30
    assert [r.score for r in cached] == [expected(i)[0] for i in items]
    assert judge.stats()["requests_total"] == 30


@pytest.mark.timeout(120)
def test_await_pending_in_asyncio_code(settings: Settings, workers,
                                       judge: JudgeProcess) -> None:
    workers(1)
    items = make_items(12, "awaited")

    async def trainer_step() -> tuple[list[ResultStatus], int]:
        with RewardClient(settings) as client:
            pending = client.submit(items)
            ticks = 0

            async def keep_busy() -> None:  # the loop stays free while results come in
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            busy = asyncio.create_task(keep_busy())
            results = await pending
            busy.cancel()
            return [r.status for r in results], ticks

    statuses, ticks = asyncio.run(trainer_step())

    assert statuses == [ResultStatus.OK] * 12
    assert ticks > 0


def test_submit_to_an_unreachable_redis_fails_clearly_and_at_once() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with RewardClient(settings) as client, pytest.raises(BrokerUnavailableError,
                                                         match="judge cache"):
        client.submit(make_items(3, "nowhere"))


@pytest.mark.timeout(300)
def test_redis_restarted_mid_run_the_run_completes_or_fails_clearly(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path) -> None:
    """Acceptance: Redis restarted during a run -> completes, or a clear error within
    the deadline; never a hang. (Long: ~20-40 s.)"""
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    port = free_port()
    server = EmbeddedRedis(port=port, data_dir=data_dir, persist=True).start()
    try:
        own = settings.model_copy(update={"redis_url": server.url})
        judge.configure(latency_ms=300)
        workers(2, redis_url=server.url, worker_concurrency=4, chunk_lease_s=5.0,
                inflight_lock_ttl_s=5.0)
        items = make_items(400, "restart")
        with RewardClient(own) as client, ThreadPoolExecutor(1) as waiter:
            pending = client.submit(items)
            wait_for_calls(judge, 100)
            server.stop()
            # The trainer is waiting for its results while Redis is away.
            results_future = waiter.submit(pending.result, timeout=150)
            time.sleep(1.0)
            server = EmbeddedRedis(port=port, data_dir=data_dir, persist=True).start()
            started = time.monotonic()
            try:
                results = results_future.result()
            except (BrokerUnavailableError, ScoringTimeoutError) as exc:
                pytest.fail(f"did not complete after a 1 s Redis restart: {exc!r}\n"
                            f"{worker_logs(tmp_path)[-4000:]}")
            waited = time.monotonic() - started
        print(f"\nRedis restart -> all results {waited:.1f}s after it came back; "
              f"judge calls {judge.stats()['requests_total']} for 400 items")
        bad = [r for r in results if r.status is not ResultStatus.OK]
        assert not bad, f"{len(bad)} not ok, e.g. {bad[:3]}\n{worker_logs(tmp_path)[-4000:]}"
        assert [r.score for r in results] == [expected(i)[0] for i in items]
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_a_trainer_waiting_on_a_redis_gone_for_good_gets_a_clear_error(
        settings: Settings, judge: JudgeProcess) -> None:
    """Redis never comes back: ``result()`` raises ``BrokerUnavailableError`` once the
    outage outlasts ``redis_retry_s``, even without a timeout of its own: no hang."""
    with EmbeddedRedis() as server:
        own = settings.model_copy(update={"redis_url": server.url, "redis_retry_s": 2.0})
        client = RewardClient(own)
        pending = client.submit(make_items(5, "gone"))  # no worker: stays pending
        server.stop()
        try:
            with pytest.raises(BrokerUnavailableError, match="result backend unreachable"):
                pending.result()
        finally:
            client.close()
