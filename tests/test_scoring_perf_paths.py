"""The lean per-item paths of issue 14, against a real Redis: verdicts stored in batches
(one Lua call for many, each caller back only once its own verdict is in Redis) and a
chunk that waits for all its items at once (timeouts, one-item failures, outages, dedup
and ensembles as before). The judge is a fake of our own ``rewardq.workers.scoring.Judge``
interface, so each test decides what every call does."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from rewardq.broker.connections import OUTAGE_ERRORS, async_redis_client
from rewardq.broker.embedded import EmbeddedRedis, free_port
from rewardq.broker.errors import BrokerUnavailableError
from rewardq.broker.keys import cache_key, inflight_key, judge_fingerprint, judge_fingerprints
from rewardq.broker.schemas import (
    GroupSpec,
    JudgeSpec,
    JudgeVerdict,
    ResultStatus,
    ScoreChunk,
    ScoreItem,
    ScoreResult,
    Usage,
    parse_items,
)
from rewardq.broker.settings import Settings
from rewardq.judge.rubrics import builtin_rubrics
from rewardq.monitoring.metrics import WorkerMetrics
from rewardq.producer.client import RewardClient
from rewardq.workers.cache import ClaimState, JudgeCache
from rewardq.workers.retry import RetryPolicy
from rewardq.workers.scoring import ChunkScorer

T = TypeVar("T")
SPEC = JudgeSpec(model="m", prompt_version="v1")


def run_with_cache(redis_url: str,
                   body: Callable[[aioredis.Redis, JudgeCache], Awaitable[T]]) -> T:
    """``body(client, cache)`` on a fresh loop, with a cache on this test's database."""
    async def main() -> T:
        client = async_redis_client(Settings(redis_url=redis_url))
        cache = JudgeCache(client, ttl_s=60, lock_ttl_ms=5000)
        try:
            return await body(client, cache)
        finally:
            await cache.close()
            await client.aclose()

    return asyncio.run(main())


def verdict(i: int) -> JudgeVerdict:
    return JudgeVerdict(score=i / 1000, raw_score=float(i))


class ScriptedJudge:
    """A ``Judge`` whose answer to each response is decided by the test: a verdict from
    the number in the response, after ``hold`` (if set) lets it go; responses in ``fail``
    raise what they map to."""

    def __init__(self, fail: dict[str, BaseException] | None = None,
                 hold: dict[str, asyncio.Event] | None = None) -> None:
        self.fail = fail or {}
        self.hold = hold or {}
        self.calls: list[tuple[str, str]] = []

    async def judge(self, spec: JudgeSpec, item: ScoreItem) -> JudgeVerdict:
        self.calls.append((spec.model, item.response))
        if item.response in self.hold:
            await self.hold[item.response].wait()
        if item.response in self.fail:
            raise self.fail[item.response]
        offset = 50 if spec.model == "m2" else 0
        return verdict(int(item.response.split("-")[1]) + offset)


def chunk_of(responses: list[str], spec: JudgeSpec = SPEC, deadline_s: float = 30.0
             ) -> ScoreChunk:
    return ScoreChunk(job_id="j", chunk_index=0, spec=spec, deadline=time.time() + deadline_s,
                      items=[ScoreItem(id=f"i{n}", prompt="p", response=r)
                             for n, r in enumerate(responses)])


def fingerprint(response: str, spec: JudgeSpec = SPEC) -> str:
    item = ScoreItem(id="x", prompt="p", response=response)
    return judge_fingerprint(spec, item.model_copy(
        update={"rubric": builtin_rubrics().select(item)}))


def test_concurrent_stores_share_calls_and_each_returns_once_its_verdict_is_in_redis(
        redis_url: str) -> None:
    """200 verdicts stored at once take fewer Lua calls than verdicts, every ``store``
    returns with its own verdict readable in Redis and its lock released, and a lock
    another owner holds now is left alone."""
    fps = [f"fp{i}" for i in range(200)]

    async def body(client: aioredis.Redis, cache: JudgeCache) -> list[bool]:
        claims = await cache.claim(fps, "tok")
        assert {c.state for c in claims} == {ClaimState.OWNED}
        await client.set(inflight_key("fp7"), "someone-else")  # our lock lapsed, re-taken

        async def store_then_read(i: int) -> bool:
            await cache.store(fps[i], verdict(i), "tok")
            raw = await client.get(cache_key(fps[i]))
            return raw is not None and JudgeVerdict.model_validate_json(raw) == verdict(i)

        seen = await asyncio.gather(*(store_then_read(i) for i in range(200)))
        locks = await client.mget([inflight_key(fp) for fp in fps])
        assert [fp for fp, lock in zip(fps, locks, strict=True) if lock is not None] == ["fp7"]
        assert cache.held_locks == 0
        assert cache.stored_verdicts == 200
        assert 1 <= cache.store_calls < 200, cache.store_calls
        print(f"\n200 verdicts stored in {cache.store_calls} Lua call(s)")
        return list(seen)

    assert all(run_with_cache(redis_url, body))


def test_a_cancelled_store_caller_neither_loses_its_verdict_nor_disturbs_the_batch(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis, cache: JudgeCache) -> None:
        await cache.claim(["a", "b", "c"], "tok")
        stores = [asyncio.ensure_future(cache.store(fp, verdict(i), "tok"))
                  for i, fp in enumerate(["a", "b", "c"])]
        await asyncio.sleep(0)  # all three queued for one batch
        stores[1].cancel()
        done = await asyncio.gather(*stores, return_exceptions=True)
        assert done[0] is None and done[2] is None
        assert isinstance(done[1], asyncio.CancelledError)
        await cache.close()  # waits for a batch still on its way
        assert await client.get(cache_key("b")) is not None
        assert await client.exists(inflight_key("b")) == 0

    run_with_cache(redis_url, body)


def test_every_waiter_of_a_batch_redis_refuses_gets_the_error() -> None:
    """No Redis: each ``store`` raises a Redis connection error (an outage), none hangs."""
    async def main() -> list[BaseException | None]:
        client = async_redis_client(Settings(redis_url=f"redis://127.0.0.1:{free_port()}"))
        cache = JudgeCache(client, ttl_s=60, lock_ttl_ms=5000)
        try:
            outcomes = await asyncio.wait_for(asyncio.gather(
                *(cache.store(f"fp{i}", verdict(i), "tok") for i in range(5)),
                return_exceptions=True), timeout=60)
            return list(outcomes)
        finally:
            await cache.close()
            await client.aclose()

    outcomes = asyncio.run(main())
    assert all(isinstance(o, OUTAGE_ERRORS) for o in outcomes), outcomes


def test_waiters_on_other_owners_share_one_round_trip_per_round(redis_url: str) -> None:
    """300 callers wait on 100 fingerprints another process holds: each gets the owner's
    verdict, or ``None`` once its lock is gone without one or its deadline passed, and
    the waiting costs two MGETs per watcher round, however many wait."""
    fps = [f"w{i}" for i in range(100)]

    async def body(client: aioredis.Redis, cache: JudgeCache) -> None:
        owner = JudgeCache(client, ttl_s=60, lock_ttl_ms=60_000)
        try:
            assert {c.state for c in await owner.claim(fps, "owner")} == {ClaimState.OWNED}
            assert {c.state for c in await cache.claim(fps, "me")} == {ClaimState.BUSY}
            await client.config_resetstat()
            loop = asyncio.get_running_loop()
            far, near = loop.time() + 60, loop.time() + 0.05
            waits = [asyncio.ensure_future(cache.wait_for_owner(fps[i % 100], far))
                     for i in range(300)]
            waits.append(asyncio.ensure_future(cache.wait_for_owner("w99", near)))
            assert await waits[-1] is None  # its deadline passed while the lock is held
            # So far only the waiting talked to Redis: two MGETs a round, nothing per waiter.
            stats, rounds = await client.info("commandstats"), cache.watch_rounds
            assert rounds >= 1
            # (Redis 7 names subcommands: cmdstat_config|resetstat)
            assert {k for k in stats if not k.startswith(("cmdstat_config", "cmdstat_info"))
                    } == {"cmdstat_mget"}, stats
            assert stats["cmdstat_mget"]["calls"] in (2 * rounds, 2 * rounds - 2)  # one on its way
            await asyncio.gather(*(owner.store(fp, verdict(i), "owner")
                                   for i, fp in enumerate(fps[:90])))
            await client.delete(*(inflight_key(fp) for fp in fps[90:]))  # owner died
            found = await asyncio.gather(*waits[:300])
            assert found == [verdict(i % 100) if i % 100 < 90 else None for i in range(300)]
        finally:
            await owner.close()

    run_with_cache(redis_url, body)


def test_a_cached_value_that_is_no_verdict_fails_its_waiters_only(redis_url: str) -> None:
    async def body(client: aioredis.Redis, cache: JudgeCache) -> None:
        await client.set(inflight_key("bad"), "owner")
        await client.set(inflight_key("good"), "owner")
        loop = asyncio.get_running_loop()
        bad = asyncio.ensure_future(cache.wait_for_owner("bad", loop.time() + 60))
        good = asyncio.ensure_future(cache.wait_for_owner("good", loop.time() + 60))
        await asyncio.sleep(0.05)
        await client.set(cache_key("bad"), "not a verdict")
        await client.set(cache_key("good"), verdict(3).model_dump_json())
        with pytest.raises(ValueError):
            await bad
        assert await good == verdict(3)

    run_with_cache(redis_url, body)


def test_every_owner_waiter_gets_the_outage_when_redis_is_away() -> None:
    async def main() -> list[BaseException | JudgeVerdict | None]:
        client = async_redis_client(Settings(redis_url=f"redis://127.0.0.1:{free_port()}"))
        cache = JudgeCache(client, ttl_s=60, lock_ttl_ms=5000)
        try:
            deadline = asyncio.get_running_loop().time() + 120
            return list(await asyncio.wait_for(asyncio.gather(
                *(cache.wait_for_owner(f"fp{i % 2}", deadline) for i in range(5)),
                return_exceptions=True), timeout=60))
        finally:
            await cache.close()
            await client.aclose()

    outcomes = asyncio.run(main())
    assert all(isinstance(o, OUTAGE_ERRORS) for o in outcomes), outcomes


def score(redis_url: str, judge: ScriptedJudge, chunk: ScoreChunk,
          after: Callable[[aioredis.Redis, ChunkScorer], Awaitable[None]] | None = None
          ) -> tuple[list[ScoreResult], JudgeCache]:
    async def body(client: aioredis.Redis, cache: JudgeCache
                   ) -> tuple[list[ScoreResult], JudgeCache]:
        scorer = ChunkScorer(judge, cache, RetryPolicy(), WorkerMetrics())
        results = await scorer.score(chunk)
        if after is not None:
            await after(client, scorer)
        return results, cache

    return run_with_cache(redis_url, body)


def test_a_chunk_scores_duplicates_once_and_stores_its_verdicts_in_few_calls(
        redis_url: str) -> None:
    responses = [f"r-{i % 40}" for i in range(64)]  # 40 distinct, 24 repeats
    judge = ScriptedJudge()
    results, cache = score(redis_url, judge, chunk_of(responses))

    assert [r.status for r in results] == [ResultStatus.OK] * 64
    assert [r.raw_score for r in results] == [float(i % 40) for i in range(64)]
    assert len(judge.calls) == 40
    assert [(r.cached, r.attempts) for r in results[:40]] == [(False, 1)] * 40
    assert [(r.cached, r.attempts) for r in results[40:]] == [(True, 0)] * 24
    assert cache.stored_verdicts == 40 and cache.store_calls < 40


def test_one_item_s_bug_costs_that_item_only(redis_url: str) -> None:
    judge = ScriptedJudge(fail={"r-2": KeyError("boom")})
    results, _ = score(redis_url, judge, chunk_of(["r-1", "r-2", "r-3"]))

    assert [r.status for r in results] == [ResultStatus.OK, ResultStatus.FAILED, ResultStatus.OK]
    assert results[1].error is not None and "internal error: KeyError" in results[1].error
    assert [r.raw_score for r in results] == [1.0, None, 3.0]


def test_at_the_deadline_a_running_call_times_out_its_item_and_still_caches_its_verdict(
        redis_url: str) -> None:
    release = asyncio.Event()
    judge = ScriptedJudge(hold={"r-9": release})

    async def body(client: aioredis.Redis, cache: JudgeCache
                   ) -> tuple[list[ScoreResult], bytes | str | None]:
        scorer = ChunkScorer(judge, cache, RetryPolicy(), WorkerMetrics())
        results = await scorer.score(chunk_of(["r-1", "r-9"], deadline_s=1.0))
        key = cache_key(fingerprint("r-9"))
        assert await client.get(key) is None
        release.set()  # the call that outlived its chunk answers now
        for _ in range(500):
            if await client.get(key) is not None:
                break
            await asyncio.sleep(0.01)
        return results, await client.get(key)

    results, cached = run_with_cache(redis_url, body)
    assert [r.status for r in results] == [ResultStatus.OK, ResultStatus.TIMEOUT]
    assert cached is not None and JudgeVerdict.model_validate_json(cached) == verdict(9)


def test_an_outage_ends_the_chunk_attempt_at_once_and_the_retry_joins_running_calls(
        redis_url: str) -> None:
    """An item that meets a Redis outage makes ``score`` raise while its chunk's other calls
    still run; scoring the chunk again joins those calls instead of judging them twice."""
    release = asyncio.Event()
    judge = ScriptedJudge(fail={"r-2": BrokerUnavailableError("rate limiter: gone")},
                          hold={"r-1": release, "r-3": release})

    async def body(client: aioredis.Redis, cache: JudgeCache) -> list[ScoreResult]:
        scorer = ChunkScorer(judge, cache, RetryPolicy(), WorkerMetrics())
        chunk = chunk_of(["r-1", "r-2", "r-3"])
        with pytest.raises(BrokerUnavailableError):
            await asyncio.wait_for(scorer.score(chunk), timeout=20)
        assert not release.is_set()  # raised without waiting for the held calls
        del judge.fail["r-2"]
        again = asyncio.ensure_future(scorer.score(chunk))
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.wait_for(again, timeout=20)

    results = run_with_cache(redis_url, body)
    assert [(r.status, r.raw_score) for r in results] == [
        (ResultStatus.OK, 1.0), (ResultStatus.OK, 2.0), (ResultStatus.OK, 3.0)]
    assert sorted(judge.calls) == [("m", "r-1"), ("m", "r-2"), ("m", "r-2"), ("m", "r-3")]


def test_an_ensemble_scores_each_member_through_the_same_path(redis_url: str) -> None:
    spec = SPEC.model_copy(update={"judges": ("m1", "m2")})
    judge = ScriptedJudge()
    results, cache = score(redis_url, judge, chunk_of(["r-10", "r-20", "r-10"], spec=spec))

    assert [r.status for r in results] == [ResultStatus.OK] * 3
    assert [r.raw_score for r in results] == [35.0, 45.0, 35.0]  # mean of x and x + 50
    assert sorted(judge.calls) == [("m1", "r-10"), ("m1", "r-20"),
                                   ("m2", "r-10"), ("m2", "r-20")]
    assert cache.stored_verdicts == 4


# The producer's side: a submit's chunks go out in one kombu publish batch, subscribe to
# nothing, and cache hits are answered in bulk.


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own: its command counts are this test's alone."""
    with EmbeddedRedis() as server:
        yield server


def submit_items(n: int, tag: str) -> list[dict[str, str]]:
    return [{"id": f"{tag}-{i}", "prompt": "p", "response": f"{tag} response {i}"}
            for i in range(n)]


def test_a_submit_sends_every_chunk_once_and_subscribes_to_nothing(
        own_redis: EmbeddedRedis) -> None:
    with RewardClient(Settings(redis_url=own_redis.url, chunk_size=64)) as client:
        client.redis.config_resetstat()
        pending = client.submit(submit_items(300, "a"))
        stats = client.redis.info("commandstats")
        queued = client.redis.lrange(client.queue, 0, -1)
        visible = client.visible_chunks(pending.pending_task_ids)

    ids = [json.loads(raw)["headers"]["id"] for raw in reversed(queued)]  # LPUSH: newest first
    assert ids == [f"{pending.job_id}-{n}" for n in range(5)]
    assert visible == set(ids)
    assert stats["cmdstat_lpush"]["calls"] == 5
    # Celery's backend would SUBSCRIBE per chunk (and UNSUBSCRIBE when the result object
    # is collected); the producer polls results instead.
    assert not {"cmdstat_subscribe", "cmdstat_unsubscribe"} & set(stats), sorted(stats)


def test_cache_hits_at_submit_equal_the_verdicts_they_come_from(
        own_redis: EmbeddedRedis) -> None:
    items = submit_items(200, "h")
    with RewardClient(Settings(redis_url=own_redis.url, chunk_size=64)) as client:
        parsed = client.rubrics.assign(parse_items(items))
        verdicts = {i: JudgeVerdict(score=i / 200, raw_score=float(i),
                                    usage=Usage(prompt_tokens=i, completion_tokens=2),
                                    agreement=0.5 if i % 2 else None)
                    for i in range(0, 200, 3)}
        client.redis.mset({cache_key(judge_fingerprint(client.spec, parsed[i])):
                           v.model_dump_json() for i, v in verdicts.items()})
        pending = client.submit(items)
        fresh = dict(pending.take_fresh())

    assert pending.cache_hits_at_submit == len(verdicts) == len(fresh)
    assert fresh == {i: ScoreResult.from_verdict(f"h-{i}", v, cached=True)
                     for i, v in verdicts.items()}
    assert pending.chunk_count == 3  # the 133 misses


def test_a_broker_refusing_the_chunks_fails_the_submit_as_unavailable(
        own_redis: EmbeddedRedis) -> None:
    """Redis out of memory refuses the batch's LPUSHes; the chunks are sent again one by
    one, refused again, and the submit raises ``BrokerUnavailableError``."""
    with RewardClient(Settings(redis_url=own_redis.url, chunk_size=16)) as client:
        used = int(client.redis.info("memory")["used_memory"])
        client.redis.config_set("maxmemory", used + 200_000)
        client.redis.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(BrokerUnavailableError, match="cannot enqueue chunk"):
            client.submit(submit_items(2000, "o"))
        client.redis.config_set("maxmemory", 0)


# --- the fingerprint is the SHA-256 of the documented JSON, however it is computed ---

def _documented_fingerprint(spec: JudgeSpec, item: ScoreItem) -> str:
    """``judge_fingerprint``'s definition, spelled out with ``json.dumps`` of the list."""
    rubric = item.rubric or ("correctness" if item.reference is not None else "quality")
    material: list[object] = [spec.model, spec.prompt_version, spec.temperature,
                              spec.max_tokens, rubric, item.prompt, item.response,
                              item.reference]
    if spec.score_mode != "parsed":
        material.append(spec.score_mode)
    if rubric in spec.rubrics:
        material.append(spec.rubrics[rubric])
    if spec.group is not None:
        material += ["group", spec.group.mode, spec.group.size, item.uid]
    blob = json.dumps(material, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


_TEXT = st.text(min_size=1, max_size=40)  # any code point: quotes, controls, emoji


@given(spec=st.builds(
           JudgeSpec, model=_TEXT, prompt_version=_TEXT,
           temperature=st.floats(0, 2), max_tokens=st.integers(1, 10_000),
           score_mode=st.sampled_from(["parsed", "logprobs"]),
           rubrics=st.dictionaries(st.sampled_from(["correctness", "quality", "r1"]),
                                   st.text(max_size=12), max_size=3),
           group=st.one_of(st.none(), st.builds(
               GroupSpec, mode=st.sampled_from(["listwise", "pairwise"]),
               size=st.integers(2, 64)))),
       items=st.lists(st.builds(
           ScoreItem, id=st.just("i"), prompt=_TEXT, response=_TEXT,
           reference=st.one_of(st.none(), st.text(max_size=20)),
           uid=st.one_of(st.none(), _TEXT),
           rubric=st.one_of(st.none(), st.sampled_from(["correctness", "quality", "r1"]))),
           min_size=1, max_size=5))
def test_batched_fingerprints_are_the_documented_sha256_of_the_json(
        spec: JudgeSpec, items: list[ScoreItem]) -> None:
    expected = [_documented_fingerprint(spec, item) for item in items]
    assert judge_fingerprints(spec, items) == expected
    assert [judge_fingerprint(spec, item) for item in items] == expected


# --- cache hits at submit: one validation pass, the same results as one by one ---

@given(verdicts=st.lists(st.builds(
           JudgeVerdict, score=st.floats(0, 1), raw_score=st.floats(-1e6, 1e6),
           usage=st.builds(Usage, prompt_tokens=st.integers(0, 10**6),
                           completion_tokens=st.integers(0, 10**6)),
           score_source=st.sampled_from(["parsed", "logprobs", "parsed_fallback"]),
           agreement=st.one_of(st.none(), st.floats(0, 1))), min_size=1, max_size=8),
       ids=st.lists(st.text(min_size=1, max_size=20), min_size=8, max_size=8))
def test_cached_verdicts_become_the_results_from_verdict_builds(
        verdicts: list[JudgeVerdict], ids: list[str]) -> None:
    ids = ids[:len(verdicts)]
    found = ScoreResult.from_cached_verdicts(ids, [v.model_dump_json() for v in verdicts])
    assert [r.model_dump() for r in found] == [
        ScoreResult.from_verdict(i, v, cached=True).model_dump()
        for i, v in zip(ids, verdicts, strict=True)]


def test_a_verdict_cached_before_a_field_existed_gets_the_verdicts_default() -> None:
    [result] = ScoreResult.from_cached_verdicts(["a"], [b'{"score":0.5,"raw_score":5}'])
    assert result.usage == Usage() and result.score_source == "parsed"
    assert result.model_dump() == ScoreResult.from_verdict(
        "a", JudgeVerdict(score=0.5, raw_score=5), cached=True).model_dump()


@pytest.mark.parametrize("value", [
    b'{"score":1.5,"raw_score":2}', b'{"raw_score":2}', b'{"score":0.2}', b"[0.2]",
    b'{"score":0.2,"raw_score":2,"unknown":1}', b'{"score":0.2,"raw_score":2,"error":"e"}',
    b'{"score":"0.2","raw_score":2}', b"not json"])
def test_a_cached_value_that_is_not_a_verdict_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        ScoreResult.from_cached_verdicts(["a", "b"], [JudgeVerdict(
            score=0.1, raw_score=1).model_dump_json().encode(), value])
