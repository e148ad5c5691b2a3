"""A worker announces each chunk once its result is stored; waiters wake on it.

The producer polls the chunks' results (one MGET per round) and, between rounds, blocks
on its job's "done" list (``rewardq.broker.jobs.wait_for_chunk_done``) instead of sleeping; a
worker pushes the chunk's index there from Celery's ``after_return``, which runs after
the result is stored. So a result is read as soon as it lands. These tests check the
contract on a real Redis and real gevent workers: every chunk is announced exactly
once, never before its result can be read, and a wait returns at the announcement.
"""

from __future__ import annotations

import redis
from scoring_data import make_items

from rewardq.broker.jobs import announce_chunk_done, wait_for_chunk_done
from rewardq.broker.keys import job_done_key
from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient


def test_an_announcement_wakes_a_waiter_and_is_consumed(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.broker_url)
    assert wait_for_chunk_done(client, ["job-a"], 0.01) is False  # nothing announced
    announce_chunk_done(client, "job-a-3")
    announce_chunk_done(client, "job-a-4")
    assert client.lrange(job_done_key("job-a"), 0, -1) == [b"4", b"3"]
    assert client.ttl(job_done_key("job-a")) > 0
    # Another job's announcement does not wake this waiter; its own does, at once.
    announce_chunk_done(client, "job-b-0")
    assert wait_for_chunk_done(client, ["job-a"], 60.0) is True
    assert client.exists(job_done_key("job-a")) == 0  # both consumed by one wake-up
    assert wait_for_chunk_done(client, ["job-a"], 0.01) is False
    assert wait_for_chunk_done(client, ["job-a", "job-b"], 60.0) is True
    assert wait_for_chunk_done(client, [], 60.0) is False


def test_workers_announce_every_chunk_once_after_its_result_is_stored(
        settings: Settings, workers) -> None:
    workers(2)
    client = RewardClient(settings.model_copy(update={"chunk_size": 4}))
    raw = redis.Redis.from_url(settings.broker_url)
    try:
        pending = client.submit(make_items(40, "wake"))
        task_ids = pending.pending_task_ids
        assert len(task_ids) == 10
        announced: list[str] = []
        while len(announced) < len(task_ids):
            popped = raw.blpop([job_done_key(pending.job_id)], timeout=120)
            assert popped is not None, f"announced so far: {announced}"
            task_id = f"{pending.job_id}-{popped[1].decode()}"
            # Announced only once its result is there to read.
            assert task_id in client.read_chunks([task_id]), task_id
            announced.append(task_id)
        assert sorted(announced) == sorted(task_ids)  # each chunk exactly once
        assert raw.llen(job_done_key(pending.job_id)) == 0
        results = pending.result(timeout=60)
        assert [r.status for r in results] == ["ok"] * 40
    finally:
        client.close()
