"""The asyncio per-item client and streaming results, against the real fleet."""

from __future__ import annotations

import asyncio
import math

import pytest
from scoring_data import expected, make_items

from rewardq.broker.errors import InvalidItemError, NoWorkersError
from rewardq.broker.schemas import ResultStatus, ScoreItem
from rewardq.broker.settings import Settings
from rewardq.producer.async_client import AsyncRewardClient
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess


def test_2048_concurrent_awaits_make_a_chunk_per_chunk_size_not_a_task_per_item(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    workers(2)
    items = make_items(2048, "per-item")

    async def run() -> tuple[list, int]:
        async with AsyncRewardClient(settings) as client:
            results = await asyncio.gather(*(client.score(item) for item in items))
            return list(results), client.chunks_sent

    results, chunks = asyncio.run(run())
    assert chunks <= math.ceil(2048 / settings.chunk_size) + 8, chunks
    assert [r.id for r in results] == [i["id"] for i in items]
    assert {r.status for r in results} == {ResultStatus.OK}
    assert [(r.score, r.raw_score) for r in results] == [expected(i) for i in items]
    assert judge.stats()["requests_total"] == 2048


def test_cached_pairs_come_back_without_enqueueing(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    workers(1)
    items = make_items(100, "cached")
    with RewardClient(settings) as warm:
        warm.score(items, timeout=60)
    calls = judge.stats()["requests_total"]

    async def run() -> tuple[list, int]:
        async with AsyncRewardClient(settings) as client:
            again = [{**item, "id": item["id"] + "-again"} for item in items]
            return await client.score_many(again), client.chunks_sent

    results, chunks = asyncio.run(run())
    assert chunks == 0 and all(r.cached for r in results)
    assert judge.stats()["requests_total"] == calls


def test_an_invalid_item_fails_its_own_await_only(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """Coalesced with good items: an empty prompt (refused by ``score``), metadata that is
    no JSON (refused by the submit they share) and an empty response (``no_answer``, no
    judge call) each answer their own await; the good items are scored."""
    workers(1)
    good = make_items(5, "mixed")
    not_json = ScoreItem.model_validate({**good[2], "metadata": {"x": object()}})

    async def run() -> list:
        async with AsyncRewardClient(settings) as client:
            calls = [client.score(good[0]), client.score({**good[1], "prompt": ""}),
                     client.score(not_json),
                     client.score({**good[3], "response": ""}), client.score(good[4])]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    first, no_prompt, unserializable, empty, last = asyncio.run(run())
    assert isinstance(no_prompt, InvalidItemError) and "'prompt'" in str(no_prompt)
    assert isinstance(unserializable, InvalidItemError) and "metadata" in str(unserializable)
    assert empty.status is ResultStatus.NO_ANSWER and empty.score is None
    assert first.status is ResultStatus.OK and last.status is ResultStatus.OK
    assert judge.stats()["requests_total"] == 2


def test_results_stream_as_chunks_finish_without_blocking_the_loop(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    judge.configure(latency_ms=200)
    workers(1, worker_concurrency=1)  # one chunk at a time: they finish one after another
    items = make_items(4 * settings.chunk_size, "stream")

    async def run() -> tuple[list[tuple[int, int]], int]:
        ticks = 0

        async def heartbeat() -> None:  # counts while the client waits: the loop is free
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(heartbeat())
        async with AsyncRewardClient(settings) as client:
            pending = await client.submit(items)
            seen = [(i, len(pending.pending_task_ids))
                    async for i, result in client.as_completed(pending, timeout=120)
                    if result.status is ResultStatus.OK]
        beat.cancel()
        return seen, ticks

    seen, ticks = asyncio.run(run())
    assert sorted(i for i, _ in seen) == list(range(len(items)))
    # The first results were handed out while later chunks were still being judged.
    assert seen[0][1] >= 2, seen[:3]
    assert ticks > 10


def test_blocking_as_completed_yields_every_position_once(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    workers(1)
    items = make_items(150, "sync-stream")
    with RewardClient(settings) as client:
        client.score(items[:20], timeout=60)  # some cache hits: they come first
        pending = client.submit(items)
        pairs = list(pending.as_completed(timeout=120))
    positions = [i for i, _ in pairs]
    assert sorted(positions) == list(range(150))
    assert set(positions[:20]) == set(range(20))
    assert all(r.status is ResultStatus.OK for _, r in pairs)


def test_no_worker_is_reported_within_seconds_not_at_the_timeout(
        settings: Settings, judge: JudgeProcess) -> None:
    with RewardClient(settings) as client:
        pending = client.submit(make_items(5, "nobody"))
        # Within 10 s, or result() would raise ScoringTimeoutError instead.
        with pytest.raises(NoWorkersError, match="no rewardq worker is consuming queue "
                                                 "'rewardq.judge'"):
            pending.result(timeout=10)


def test_no_worker_fails_every_await_with_the_clear_message(
        settings: Settings, judge: JudgeProcess) -> None:
    async def run() -> list:
        async with AsyncRewardClient(settings) as client:
            calls = [client.score(item) for item in make_items(5, "nobody-async")]
            return list(await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), timeout=10))

    errors = asyncio.run(run())
    assert all(isinstance(e, NoWorkersError) for e in errors), errors


def test_stopping_the_poller_does_not_swallow_the_callers_cancellation() -> None:
    """Ctrl-C cancels ``asyncio.run``'s main task; if that lands while the client waits
    for its poller to stop, the cancellation must go on (or the interrupt is lost and
    the program carries on: seen once in ``rewardq demo`` on a loaded machine)."""
    from rewardq.producer.async_client import _stopped

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # still stopping when the caller is cancelled
            raise

    async def close(poller: asyncio.Task[None]) -> str:
        poller.cancel()
        await _stopped(poller)
        return "closed"

    async def run() -> tuple[bool, str]:
        poller = asyncio.create_task(slow_to_stop())
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(close(poller))
        await asyncio.sleep(0.05)
        closing.cancel()
        try:
            await closing
        except asyncio.CancelledError:
            cancelled = True
        else:
            cancelled = False
        alone = asyncio.create_task(close(asyncio.create_task(slow_to_stop())))
        return cancelled, await alone

    cancelled, alone = asyncio.run(run())
    assert cancelled  # the caller's own cancellation went through
    assert alone == "closed"  # the poller's cancellation alone is swallowed
