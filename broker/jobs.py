"""The fleet protocol's two moves, in one place: send a chunk, read finished chunks.

A chunk is one Celery task (``TASK_SCORE_CHUNK``) whose single argument is a
``ScoreChunk`` as JSON; its result, stored by Celery's Redis backend under the task id,
is the list of ``ScoreResult`` JSONs in item order. The producer, dead-letter replay and
anything else that enqueues or waits for chunks go through these two functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery, states

from broker.app import TASK_SCORE_CHUNK
from broker.errors import BrokerUnavailableError

__all__ = ["ChunkMeta", "read_chunks", "send_chunk"]

#: A finished chunk's Celery result: ``status``, ``result`` (the item results, or the
#: exception), ``date_done``.
ChunkMeta = dict[str, Any]


def send_chunk(app: Celery, args: list[Any], task_id: str) -> None:
    """Enqueue one chunk task as ``task_id``.

    Args:
        app: the fleet's Celery app (``broker.app.create_app``).
        args: the task's positional arguments: ``[ScoreChunk.model_dump(mode="json")]``,
            or a dead letter's original arguments when it is replayed as it came.
        task_id: ``<job id>-<chunk index>``.

    Raises:
        BrokerUnavailableError: the broker could not be reached.
    """
    try:
        app.send_task(TASK_SCORE_CHUNK, args=args, task_id=task_id)
    except Exception as exc:  # kombu raises its own and redis' connection errors
        if isinstance(exc, (redis.RedisError, ConnectionError, OSError)):
            raise BrokerUnavailableError(f"cannot enqueue chunk {task_id}: {exc}") from exc
        raise


def read_chunks(app: Celery, client: redis.Redis, task_ids: Sequence[str]
                ) -> dict[str, ChunkMeta]:
    """The finished chunks among ``task_ids`` and their stored results (one MGET).

    Raises:
        BrokerUnavailableError: the result backend could not be reached.
    """
    if not task_ids:
        return {}
    backend = app.backend
    try:
        raws = client.mget([backend.get_key_for_task(t) for t in task_ids])
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"result backend unreachable: {exc}") from exc
    done: dict[str, ChunkMeta] = {}
    for task_id, raw in zip(task_ids, raws, strict=True):
        if raw is None:
            continue
        meta: ChunkMeta = backend.decode_result(raw)
        if meta["status"] in states.READY_STATES:
            done[task_id] = meta
    return done
