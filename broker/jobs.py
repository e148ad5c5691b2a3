"""The fleet protocol in one place: send a chunk, read finished chunks, find lost ones.

A chunk is one Celery task (``TASK_SCORE_CHUNK``) whose single argument is a
``ScoreChunk`` as JSON; its result, stored by Celery's Redis backend under the task id,
is the list of ``ScoreResult`` JSONs in item order. The producer, dead-letter replay and
anything else that enqueues or waits for chunks go through these functions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from celery import Celery, states
from celery.backends.redis import RedisBackend
from kombu.exceptions import BatchPublishError, OperationalError
from kombu.messaging import Producer

from rewardq.broker.app import TASK_SCORE_CHUNK, result_backend_url
from rewardq.broker.connections import is_outage, is_redis_full, redis_full_error
from rewardq.broker.errors import BrokerUnavailableError
from rewardq.broker.keys import JOB_DONE_TTL_S, READ_RESULT_TTL_S, job_done_key

__all__ = ["ChunkMeta", "FullAwareRedisBackend", "PollingRedisBackend", "announce_chunk_done",
           "chunk_result", "forget_chunks", "item_results", "read_chunks",
           "read_results_by_polling", "send_chunk", "send_chunks", "visible_chunks",
           "wait_for_chunk_done"]

log = logging.getLogger(__name__)

#: What a broker that cannot be reached (or refuses writes) raises through kombu:
#: redis-py's errors, or kombu's ``OperationalError`` that Celery wraps them in.
_BROKER_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, ConnectionError, OSError,
                                               OperationalError)
#: Messages per Redis pipeline when chunks are sent together (a 131k-item step is 2,048
#: chunks of ~30 KB: pipelines of 128 bound the buffered bytes).
_BATCH_MAX = 128

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


def announce_chunk_done(client: redis.Redis, task_id: str) -> None:
    """Wake whoever waits for ``task_id``'s job: called once the chunk's result is stored.

    The task id is ``<job id>-<chunk index>``. One pipelined LPUSH + EXPIRE. A lost
    announcement (Redis away) costs its waiter one poll interval, nothing else: waiters
    poll the results anyway.
    """
    job_id, _, index = task_id.rpartition("-")
    if not job_id:
        return
    key = job_done_key(job_id)
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, index)
    pipe.expire(key, JOB_DONE_TTL_S)
    pipe.execute()


def wait_for_chunk_done(client: redis.Redis, job_ids: Sequence[str], timeout_s: float
                        ) -> bool:
    """Block until a chunk of one of ``job_ids`` is announced done, or ``timeout_s``.

    Returns whether one was: then every announcement of those jobs so far is consumed
    (one wake-up for chunks that finished together), and results stored before them are
    readable. Redis errors pass through.
    """
    keys = [job_done_key(job_id) for job_id in job_ids]
    if not keys or timeout_s <= 0:
        return False
    # BLPOP's timeout is in seconds, 0 meaning forever: never round down to it.
    if client.blpop(keys, timeout=max(timeout_s, 0.001)) is None:
        return False
    client.delete(*keys)
    return True


def send_chunk(app: Celery, args: list[Any], task_id: str) -> None:
    """Enqueue one chunk task as ``task_id``.

    Args:
        app: the fleet's Celery app (``rewardq.broker.app.create_app``).
        args: the task's positional arguments: ``[ScoreChunk.model_dump(mode="json")]``,
            or a dead letter's original arguments when it is replayed as it came.
        task_id: ``<job id>-<chunk index>``.

    Raises:
        BrokerUnavailableError: the broker could not be reached.
    """
    send_chunks(app, [(args, task_id)])


def send_chunks(app: Celery, chunks: Sequence[tuple[list[Any], str]]) -> None:
    """Enqueue chunk tasks, each ``(args, task_id)`` as :func:`send_chunk` takes them.

    Several go through one producer and kombu publish batches of up to ``_BATCH_MAX``:
    their messages' LPUSHes in one Redis pipeline, one round trip per batch instead of
    one per chunk. A batch whose pipeline fails may have been delivered in part (kombu
    cannot tell), so its chunks and those after it are then sent one by one, with
    kombu's publish retries, as single chunks always are: a chunk may arrive twice,
    which the fleet tolerates as it does a redelivery (its verdicts are cached by then,
    its result is stored under the same task id), but none is lost.

    Raises:
        RedisFullError: Redis refused the chunks for memory (a ``BrokerUnavailableError``:
            it answers, but its used memory is at maxmemory); those before it were sent.
        BrokerUnavailableError: the broker could not be reached.
    """
    sent = 0  # chunks surely delivered
    if len(chunks) > 1:
        try:
            with app.producer_or_acquire() as producer:
                while sent < len(chunks):
                    batch = chunks[sent:sent + _BATCH_MAX]
                    with producer.batch(len(batch)):
                        for i, (args, task_id) in enumerate(batch):
                            # The queue is declared (once per connection) with the first
                            # message; binding it again for each costs ~0.05 ms.
                            _publish(app, args, task_id, producer, declare=sent + i == 0)
                    sent += len(batch)  # delivered: the batch's pipeline ran
            return
        except Exception as exc:  # kombu's BatchPublishError, or redis' connection errors
            if not isinstance(exc, (BatchPublishError, *_BROKER_ERRORS)):
                raise
            if is_redis_full(exc):  # one by one would only be refused again
                raise _full(app, f"cannot enqueue chunk {chunks[sent][1]} "
                                 f"({len(chunks) - sent} of {len(chunks)} not sent)",
                            exc) from exc
            log.warning("publishing chunks %d-%d in one batch failed (%s); sending them "
                        "one by one", sent, min(sent + _BATCH_MAX, len(chunks)) - 1, exc)
    for args, task_id in chunks[sent:]:
        try:
            _publish(app, args, task_id, None)
        except Exception as exc:  # kombu raises its own and redis' connection errors
            if is_redis_full(exc):
                raise _full(app, f"cannot enqueue chunk {task_id}", exc) from exc
            if isinstance(exc, _BROKER_ERRORS):
                raise BrokerUnavailableError(f"cannot enqueue chunk {task_id}: {exc}") from exc
            raise


def _full(app: Celery, what: str, exc: BaseException) -> BrokerUnavailableError:
    """The ``RedisFullError`` of ``what``, with the memory figures of the app's Redis
    (read on a connection of its own: the error path only), logged."""
    url = str(app.conf.broker_url or "")
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) \
        if url.startswith(("redis://", "rediss://", "unix://")) else None
    try:
        error = redis_full_error(what, exc, client=client)
    finally:
        if client is not None:
            client.close()
    log.error("%s", error)
    return error


def _publish(app: Celery, args: list[Any], task_id: str, producer: Producer | None, *,
             declare: bool = True) -> None:
    # argsrepr: Celery would otherwise saferepr() the whole chunk for every message
    # (~5 ms each), only for Flower to show it truncated.
    items = args[0].get("items") if args and isinstance(args[0], dict) else None
    label = f"<chunk {task_id}: {len(items)} items>" if isinstance(items, list) \
        else f"<chunk {task_id}>"
    options: dict[str, Any] = {} if declare else {"declare": []}
    app.send_task(TASK_SCORE_CHUNK, args=args, task_id=task_id, argsrepr=label,
                  producer=producer, **options)


class FullAwareRedisBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, for which a full Redis is an outage to wait out.

    Celery retries storing a result (``result_backend_always_retry``) only through
    connection errors. A Redis at ``maxmemory`` answers the store with ``OOM command not
    allowed``, which Celery would give up on at once: the chunk would be acked without a
    result, and its producer would find it lost and send it again seconds later. Here
    a full Redis (:func:`~rewardq.broker.connections.is_redis_full`) is retried the same way, with
    Celery's backoff, up to ``result_backend_max_retries`` (about
    ``Settings.redis_retry_s`` in all): the result lands as soon as memory is freed. Each
    refusal is counted (``redis_full_errors``) and named in the log ("Redis is full"),
    at most once per ``_FULL_LOG_EVERY_S``.
    """

    _FULL_LOG_EVERY_S = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._full_logged_at = 0.0

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Celery's connection errors, and whatever the outage policy waits out
        (:func:`~rewardq.broker.connections.is_outage`: a full Redis included, counted and named
        here, where every Celery version asks before its backoff)."""
        if is_redis_full(exc):
            self._note_full()
            return True
        return bool(super().exception_safe_to_retry(exc)) or is_outage(exc)

    def _note_full(self) -> None:
        # Not ``from exc``: Redis' answer quotes the whole result being stored.
        error = redis_full_error("cannot store a chunk's state or results (retrying)",
                                 client=self._memory_client())
        now = time.monotonic()
        if now - self._full_logged_at >= self._FULL_LOG_EVERY_S:
            self._full_logged_at = now
            log.warning("%s", error)

    def _memory_client(self) -> redis.Redis | None:
        try:
            client: redis.Redis = self.client
        except Exception:  # the figures are a courtesy; the retry is what matters
            return None
        return client


class PollingRedisBackend(FullAwareRedisBackend):
    """Celery's Redis result backend for a client that reads results by polling them
    (:func:`read_chunks`, one MGET over the chunks' result keys), as the producer does.

    Celery's own subscribes to each task's result channel as the task is sent, for an
    ``AsyncResult.get()`` that may come (two Redis commands per chunk, a pub/sub
    connection, and ~0.1 ms of the sender's CPU each). Nothing here waits that way, so
    sending subscribes to nothing; an ``AsyncResult.get()`` still works: it subscribes
    when it starts waiting and reads a result stored before that from its key.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe to nothing when a task is sent (see the class)."""


def read_results_by_polling(app: Celery) -> Celery:
    """Give ``app`` a :class:`PollingRedisBackend` on its Redis result backend URL (left
    as it is for any other backend); call before its first use. Returns ``app``."""
    url = result_backend_url(str(app.conf.result_backend or ""))
    if url.startswith(("redis://", "rediss://")):
        # Celery's "<backend class>+<url>" form: the class, on the same URL and options.
        app.conf.result_backend = f"{__name__}:{PollingRedisBackend.__name__}+{url}"
    return app


def read_chunks(app: Celery, client: redis.Redis, task_ids: Sequence[str]
                ) -> dict[str, ChunkMeta]:
    """The finished chunks among ``task_ids`` and their stored results (one MGET).

    A finished chunk's result, once read, is left to expire ``READ_RESULT_TTL_S`` later
    instead of the hour Celery gives it (one more round trip, only when chunks finished):
    at 16k items a minute, an hour of read results was ~0.7 GB that nobody reads again.
    :func:`forget_chunks` deletes them at once.

    Raises:
        BrokerUnavailableError: the result backend could not be reached.
    """
    if not task_ids:
        return {}
    backend = app.backend
    keys = [backend.get_key_for_task(t) for t in task_ids]
    try:
        raws = client.mget(keys)
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"result backend unreachable: {exc}") from exc
    done: dict[str, ChunkMeta] = {}
    read: list[bytes | str] = []
    for task_id, key, raw in zip(task_ids, keys, raws, strict=True):
        if raw is None:
            continue
        meta: ChunkMeta = backend.decode_result(raw)
        if meta["status"] in states.READY_STATES:
            done[task_id] = meta
            read.append(key)
    if read:
        _expire_read(client, read)
    return done


def forget_chunks(app: Celery, client: redis.Redis, task_ids: Sequence[str]) -> None:
    """Delete the stored results of ``task_ids`` (chunks whose results were taken in):
    their memory is free at once rather than ``READ_RESULT_TTL_S`` later. Best effort
    (UNLINK: a read Redis may refuse no delete, full or not)."""
    if not task_ids:
        return
    try:
        client.unlink(*(app.backend.get_key_for_task(t) for t in task_ids))
    except redis.RedisError as exc:
        log.debug("read results not deleted (they expire): %s", exc)


def _expire_read(client: redis.Redis, keys: Sequence[bytes | str]) -> None:
    """Cut the TTL of results that were read to ``READ_RESULT_TTL_S`` (``EXPIRE ... LT``
    where Redis has it: never lengthen one). Best effort: a result left as it was
    expires with Celery's own TTL."""
    try:
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.expire(key, READ_RESULT_TTL_S)
            pipe.execute()
    except redis.RedisError as exc:
        log.debug("results read but not expired early: %s", exc)


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
