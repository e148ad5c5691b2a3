"""The fleet protocol in one place: send a chunk, read finished chunks, find lost ones.

A chunk is one Celery task (``TASK_SCORE_CHUNK``) whose single argument is a
``ScoreChunk`` as JSON; its result, stored by Celery's Redis backend under the task id,
is the list of ``ScoreResult`` JSONs in item order. The producer, dead-letter replay and
anything else that enqueues or waits for chunks go through these two functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from celery import Celery, states

from broker.app import TASK_SCORE_CHUNK
from broker.errors import BrokerUnavailableError

__all__ = ["ChunkMeta", "chunk_result", "item_results", "read_chunks", "send_chunk",
           "visible_chunks"]

#: A finished chunk's Celery result: ``status``, ``result`` (see :func:`chunk_result`, or
#: the exception), ``date_done``.
ChunkMeta = dict[str, Any]


def chunk_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What a chunk task returns: ``outcome`` (items per status, first, so that Flower's
    task list, which shows the start of a result, says "60 ok, 4 failed" where the task
    state can only say SUCCESS) and ``results`` (one result JSON per item, in order)."""
    outcome: dict[str, int] = {}
    for result in results:
        outcome[result["status"]] = outcome.get(result["status"], 0) + 1
    return {"outcome": outcome, "results": results}


def item_results(meta: ChunkMeta) -> list[dict[str, Any]]:
    """The item results of a successful chunk's ``meta`` (also from a worker that
    returned the bare list, as workers before ``chunk_result`` did)."""
    value = meta["result"]
    results: list[dict[str, Any]] = value["results"] if isinstance(value, dict) else value
    return results


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
        # argsrepr: Celery would otherwise saferepr() the whole chunk for every message
        # (~5 ms each), only for Flower to show it truncated.
        items = args[0].get("items") if args and isinstance(args[0], dict) else None
        label = f"<chunk {task_id}: {len(items)} items>" if isinstance(items, list) \
            else f"<chunk {task_id}>"
        app.send_task(TASK_SCORE_CHUNK, args=args, task_id=task_id, argsrepr=label)
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


def visible_chunks(app: Celery, client: redis.Redis, queue: str, task_ids: Sequence[str]
                   ) -> set[str] | None:
    """Which of ``task_ids`` Redis still knows: queued, held by a worker, or with a result.

    A chunk in none of those places was lost (Redis restarted without its data, or
    crashed between kombu's pop and its unacked record). Reads the whole queue and
    kombu's unacked hash, so callers check rarely and only while a job waits.

    Returns:
        The visible task ids, or ``None`` when the broker is not this Redis (e.g.
        RabbitMQ): then nothing can be said.

    Raises:
        BrokerUnavailableError: Redis could not be reached.
    """
    if not str(app.conf.broker_url or "").startswith(("redis://", "rediss://", "unix://")):
        return None
    wanted = set(task_ids)
    options = app.conf.broker_transport_options or {}
    backend = app.backend
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.mget([backend.get_key_for_task(t) for t in task_ids])
            pipe.lrange(queue, 0, -1)
            pipe.hvals(str(options.get("unacked_key", "unacked")))
            results, queued, unacked = pipe.execute()
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"cannot look for lost chunks: {exc}") from exc
    seen = {t for t, raw in zip(task_ids, results, strict=True) if raw is not None}
    seen |= _message_ids(queued, unwrap=False) & wanted
    seen |= _message_ids(unacked, unwrap=True) & wanted
    return seen


def _message_ids(raws: Iterable[bytes], *, unwrap: bool) -> set[str]:
    """Task ids of kombu Redis messages (unacked entries wrap them as [message, ...])."""
    ids = set()
    for raw in raws:
        try:
            message = json.loads(raw)
            if unwrap:
                message = message[0]
            ids.add(str(message["headers"]["id"]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not a task message of ours
    return ids
