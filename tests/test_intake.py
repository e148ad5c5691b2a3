"""A worker takes chunks only as its judge slots allow (``workers.intake``).

The gate weighs the chunks a worker holds by their items against two waves of its judge
slots, so the rest of a step stays queued for whichever worker frees slots first, and
the consumer loop waits on the gate itself rather than in kombu's one-second poll.
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker import state as worker_state
from scoring_data import make_items

from broker.app import create_app
from broker.settings import Settings
from producer.client import RewardClient
from workers.intake import HELD_WAVES, ChunkIntake, items_held


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
