"""``GroupMedians``: GRPO groups that arrive one sample at a time, on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis

from rewardq.producer.groups import GroupMedians, GroupStatus, member_id


async def _blocking(call: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(call)


def medians(redis_url: str, **kwargs: Any) -> GroupMedians:
    return GroupMedians(redis.Redis.from_url(redis_url), _blocking, **kwargs)


def test_members_in_separate_clients_agree_on_the_numpy_median(redis_url: str) -> None:
    async def run() -> list[Any]:
        # Four "processes": each its own client, arriving at spread times.
        async def one(i: int, length: int) -> Any:
            await asyncio.sleep(0.05 * i)
            return await medians(redis_url, wait_s=30).median("g", f"m{i}", length, 4)
        return list(await asyncio.gather(*(one(i, n) for i, n in enumerate([3, 10, 4, 7]))))

    results = asyncio.run(run())
    assert {(r.median, r.size, r.status) for r in results} == {(5.5, 4, GroupStatus.COMPLETE)}


def test_padding_copies_count_once(redis_url: str) -> None:
    groups = medians(redis_url, wait_s=30, settle_s=20)

    async def run() -> list[Any]:
        arrivals = [("a", 2), ("a", 2), ("b", 20), ("a", 2), ("c", 30), ("d", 40)]
        return list(await asyncio.gather(*(groups.median("p", m, n, 4) for m, n in arrivals)))

    results = asyncio.run(run())
    # The median of 2, 20, 30, 40; taking the repeats of "a" would have given 2 or 11.
    assert {(r.median, r.size) for r in results} == {(25.0, 4)}


def test_genuine_repeats_count_after_the_settle_window(redis_url: str) -> None:
    groups = medians(redis_url, wait_s=30, settle_s=0.2)
    same = member_id([1, 2], [3, 4])

    async def run() -> list[Any]:
        arrivals = [(same, 2), (same, 2), ("x", 9), ("y", 11)]
        return list(await asyncio.gather(*(groups.median("r", m, n, 4) for m, n in arrivals)))

    results = asyncio.run(run())
    assert {(r.median, r.size, r.status) for r in results} == {(5.5, 4, GroupStatus.COMPLETE)}


def test_a_group_that_never_completes_is_sealed_incomplete_and_late_members_agree(
        redis_url: str) -> None:
    groups = medians(redis_url, wait_s=0.3)

    async def run() -> tuple[Any, Any]:
        first = await asyncio.gather(groups.median("i", "a", 10, 4),
                                     groups.median("i", "b", 20, 4))
        late = await groups.median("i", "c", 90, 4)
        return first, late

    first, late = asyncio.run(run())
    assert {(r.median, r.size, r.status) for r in first} == {(15.0, 2, GroupStatus.INCOMPLETE)}
    assert (late.median, late.status) == (15.0, GroupStatus.INCOMPLETE)  # the seal holds


def test_no_uid_or_group_of_one_needs_no_redis() -> None:
    groups = GroupMedians(redis.Redis(port=1), _blocking, wait_s=1)  # nothing listens
    alone = asyncio.run(groups.median(None, "m", 7, 4))
    single = asyncio.run(groups.median("u", "m", 7, 1))
    assert (alone.median, alone.status) == (7.0, GroupStatus.SINGLE)
    assert (single.median, single.status) == (7.0, GroupStatus.SINGLE)
