"""How a step's chunks fall to workers.

A worker takes chunks only as its judge slots allow (``rewardq.workers.intake``): the gate weighs
the chunks it holds by their items against two waves of its judge slots, so the rest of
a step stays queued for whichever worker frees slots first, and the consumer loop waits
on the gate itself rather than in kombu's one-second poll. The producer makes chunks no
longer than a few rounds of the fewest calls a live worker makes
(``rewardq.broker.fleet.chunk_size_for``), so that the chunks still running at a step's end are
short.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery.worker import state as worker_state
from scoring_data import make_items

from rewardq.broker.app import QUEUE_JUDGE, create_app
from rewardq.broker.fleet import CHUNK_ROUNDS, WorkerBeat, chunk_size_for
from rewardq.broker.keys import WORKER_INDEX, worker_key
from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient
from rewardq.workers.intake import HELD_WAVES, ChunkIntake, items_held


class _Request:
    """What the gate reads of a Celery request: its task arguments."""

    def __init__(self, *args: Any) -> None:
        self.args = args


def test_items_held_weighs_each_reserved_chunk_by_its_items() -> None:
    held = [_Request({"items": [{}] * 5}), _Request({"items": [{}] * 3}),
            _Request("not a chunk"), _Request()]
    before = items_held()
    for request in held:
        worker_state.reserved_requests.add(request)
    try:
        assert items_held() - before == 5 + 3 + 1 + 1  # a non-chunk counts as one item
    finally:
        for request in held:
            worker_state.reserved_requests.discard(request)
    assert items_held() == before


def test_the_gate_closes_at_two_waves_of_judge_slots() -> None:
    intake = ChunkIntake.for_slots(4)(None)
    held = [_Request({"items": [{}] * 7})]
    worker_state.reserved_requests.add(held[0])
    try:
        assert HELD_WAVES * 4 == 8
        assert intake.has_room()  # 7 items held < 8
        held.append(_Request({"items": [{}] * 64}))
        worker_state.reserved_requests.add(held[1])
        assert not intake.has_room()  # one large chunk went in; nothing more
    finally:
        for request in held:
            worker_state.reserved_requests.discard(request)
    assert intake.has_room()


def test_waiting_for_room_returns_once_the_consumer_may_take_a_message() -> None:
    intake = ChunkIntake.for_slots(1)(None)
    answers = iter([False, False, True])
    asked: list[bool] = []

    def can_consume() -> bool:
        asked.append(next(answers))
        return asked[-1]

    intake.can_consume = can_consume
    assert intake.wait_for_room(60.0) is True
    assert asked == [False, False, True]
    intake.can_consume = lambda: False
    assert intake.wait_for_room(0.0) is False


def _held_chunks(app: Any) -> dict[str, int]:
    """Chunks each worker holds now (running or reserved), by node."""
    inspect = app.control.inspect(timeout=1.0, limit=2)
    held: dict[str, int] = {}
    for answer in (inspect.active() or {}, inspect.reserved() or {}):
        for node, tasks in answer.items():
            held[node] = held.get(node, 0) + len(tasks)
    return held


def test_workers_hold_no_more_chunks_than_their_judge_slots_allow(
        settings: Settings, workers, judge) -> None:
    # 2 judge calls per process: each may hold items < 4, i.e. two chunks of 2 items;
    # without the gate its pool of 32 would take every chunk of the step at once.
    judge.configure(latency_ms=300)
    workers(2, max_concurrent_requests=2)
    client = RewardClient(settings.model_copy(update={"chunk_size": 2}))
    app = create_app(settings)
    try:
        pending = client.submit(make_items(32, "intake"))
        assert len(pending.pending_task_ids) == 16
        samples: list[dict[str, int]] = []
        while not pending.done() and len(samples) < 20:
            samples.append(_held_chunks(app))
            time.sleep(0.1)
        results = pending.result(timeout=120)
        assert [r.status for r in results] == ["ok"] * 32
        busy = [s for s in samples if sum(s.values()) > 0]
        assert busy, f"no sample saw the step running: {samples}"
        assert all(n <= 2 for s in busy for n in s.values()), samples
    finally:
        client.close()


def _beat(node: str, judge_calls: int | None) -> WorkerBeat:
    return WorkerBeat(node=node, pid=1, queues=(QUEUE_JUDGE,), started_at=0.0, beat_at=0.0,
                      judge_calls=judge_calls)


def test_chunks_last_at_most_a_few_rounds_of_the_fewest_calls_a_worker_makes() -> None:
    assert chunk_size_for(64, []) == 64  # nobody says: as configured
    assert chunk_size_for(64, [_beat("a", None)]) == 64  # an older worker says nothing
    assert chunk_size_for(64, [_beat("a", 256), _beat("b", 128)]) == 64
    assert chunk_size_for(64, [_beat("a", 256), _beat("b", 2)]) == 2 * CHUNK_ROUNDS
    assert chunk_size_for(64, [_beat("a", 1)]) == CHUNK_ROUNDS
    assert chunk_size_for(4, [_beat("a", 1)]) == 4  # never more than configured


def test_the_producer_sizes_chunks_by_the_live_workers_heartbeats(
        settings: Settings) -> None:
    configured = settings.model_copy(update={"chunk_size": 64})
    raw = redis.Redis.from_url(settings.broker_url)
    with RewardClient(configured) as client:  # no heartbeat: as configured
        assert len(client.submit(make_items(40, "none")).pending_task_ids) == 1
    raw.set(worker_key("slow@host"), _beat("slow@host", 1).model_dump_json(), ex=60)
    raw.sadd(WORKER_INDEX, "slow@host")
    with RewardClient(configured) as client:
        pending = client.submit(make_items(40, "one-call"))
        assert len(pending.pending_task_ids) == 40 // CHUNK_ROUNDS


def test_without_redis_the_producer_keeps_the_configured_chunk_size() -> None:
    away = Settings(redis_url="redis://127.0.0.1:1/0", chunk_size=48, redis_retry_s=0.5)
    with RewardClient(away) as client:
        assert client.chunk_size() == 48
