"""The Celery task that scores a chunk, registered on the app ``broker.app`` builds.

What the task guarantees, whatever arrives on the queue:

- A message that is not a chunk (wrong arguments, missing fields, an unknown task name)
  is dead-lettered with its reason and fails alone; the worker goes on.
- A bad item inside a good chunk becomes an ``invalid`` result naming its field; the
  other items are scored.
- Items that fail for good (``failed``, ``invalid``) are dead-lettered, one pipeline per
  chunk, before the chunk's results are stored.
- A Redis outage inside a chunk does not fail its items: the chunk is scored again in
  place after a backoff (finished items come from the cache) until
  ``Settings.redis_retry_s`` or the chunk's deadline runs out. In place, not with
  ``Task.retry``: re-publishing needs the very broker that is away.
- A worker that dies mid-chunk loses nothing: the message stays unacked (late acks) and
  the Redis transport hands it to another worker once its lease lapses.
  ``ChunkLeases`` renews the lease of every message a live worker holds, so the
  visibility timeout can be short (``Settings.chunk_lease_s``) without a slow chunk
  ever being handed out twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gevent
import redis
from celery import Celery, Task
from celery.signals import (
    task_rejected,
    task_unknown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker import state as worker_state
from gevent import monkey
from pydantic import ValidationError

from broker.app import TASK_SCORE_CHUNK, create_app
from broker.dead_letters import DeadLetter, DeadLetters, LetterKind
from broker.errors import InvalidItemError
from broker.keys import chunk_lease_key
from broker.schemas import ResultStatus, ScoreChunk, ScoreItem, ScoreResult, parse_items
from broker.settings import Settings
from monitoring.metrics import serve_worker_metrics
from workers.heartbeat import WorkerHeartbeat
from workers.retry import OUTAGE_ERRORS, outage_delay
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)
T = TypeVar("T")

_PLACEHOLDER_ITEM = {"id": "-", "prompt": "-", "response": "-"}


class MalformedChunkError(ValueError):
    """A queue message that is not a valid ``ScoreChunk``; its items cannot be scored."""


def create_worker_app(settings: Settings) -> Celery:
    """The Celery app with the scoring task bound to one ``WorkerRuntime`` per process."""
    app = create_app(settings)
    runtime = WorkerRuntime(settings)
    letters = _LazyDeadLetters(settings)

    @app.task(name=TASK_SCORE_CHUNK, bind=True,  # type: ignore[untyped-decorator]
              throws=(MalformedChunkError,))
    def score_chunk(self: Task[Any, Any], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """Score one chunk; returns one result JSON per item, in order."""
        received = time.time()
        request = self.request
        patience = settings.redis_retry_s
        try:
            chunk, invalid = parse_chunk_message(args, kwargs)
        except MalformedChunkError as exc:
            letter = DeadLetter(
                id=request.id or f"unknown-{time.time_ns()}", kind=LetterKind.CHUNK,
                reason="malformed", error=str(exc), task_id=request.id,
                worker=request.hostname, payload=list(args), received_at=received,
                failed_at=time.time())
            with_outage_retries(lambda: letters.get().record([letter]), patience)
            runtime.metrics.dead_letter(letter.kind.value)
            runtime.metrics.chunk("malformed")
            raise
        scored: Iterator[ScoreResult] = iter(())
        if chunk is not None:
            budget = max(1.0, chunk.deadline - time.time())
            try:
                # The gevent pool has no soft time limit: the bridge's wait is the limit.
                scored = iter(with_outage_retries(
                    lambda: runtime.score(chunk, timeout_s=budget + 5.0), patience,
                    deadline=chunk.deadline))
            except Exception as exc:  # the chunk as a whole: Redis gone for good, a bug
                _record_quietly(letters, DeadLetter(
                    id=request.id or f"unknown-{time.time_ns()}", kind=LetterKind.CHUNK,
                    reason="failed", error=f"{type(exc).__name__}: {exc}",
                    job_id=chunk.job_id, chunk_index=chunk.chunk_index, step=chunk.step,
                    task_id=request.id, worker=request.hostname, payload=list(args),
                    received_at=received, failed_at=time.time()))
                runtime.metrics.dead_letter(LetterKind.CHUNK.value)
                runtime.metrics.chunk("failed")
                raise
        results = [invalid[i] if i in invalid else next(scored)
                   for i in range(len(args[0]["items"]))]
        dead = item_letters(args[0], results, chunk, request.id, request.hostname, received)
        with_outage_retries(lambda: letters.get().record(dead), patience)
        for letter in dead:
            runtime.metrics.dead_letter(letter.kind.value)
        runtime.metrics.chunk("ok", (r.status.value for r in results))
        return [r.model_dump(mode="json") for r in results]

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _serve_metrics(sender: Any = None, **_: Any) -> None:
        if settings.metrics_port is not None:
            serve_worker_metrics(runtime.metrics, settings.metrics_port,
                                 node=sender.hostname)

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _start_leases(**_: Any) -> None:
        leases = ChunkLeases(app, settings)
        if leases.enabled:
            gevent.spawn(leases.run_forever)

    heartbeat: WorkerHeartbeat | None = None

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _start_heartbeat(sender: Any = None, **_: Any) -> None:
        nonlocal heartbeat
        heartbeat = WorkerHeartbeat.for_worker(settings, sender)
        heartbeat.start()

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _stop_heartbeat(**_: Any) -> None:  # a shutdown without a signal (remote control)
        if heartbeat is not None:
            heartbeat.stop()

    @task_unknown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _unknown_task(message: Any = None, name: str | None = None, id: str | None = None,
                      **_: Any) -> None:
        _record_rejected(letters, message, "unknown task", f"no task named {name!r}", id)
        runtime.metrics.dead_letter(LetterKind.CHUNK.value)

    @task_rejected.connect(weak=False)  # type: ignore[untyped-decorator]
    def _rejected(message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
        _record_rejected(letters, message, "rejected",
                         f"not a task message: {exc}" if exc else "not a task message", None)
        runtime.metrics.dead_letter(LetterKind.CHUNK.value)

    @worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
    def _exit_once_idle(**_: Any) -> None:
        # A signal handler: the heartbeat's delete runs in a greenlet of its own.
        if heartbeat is not None:
            heartbeat.stop_soon()
        start_watchdog(runtime)

    return app


def parse_chunk_message(args: tuple[Any, ...], kwargs: dict[str, Any]
                        ) -> tuple[ScoreChunk | None, dict[int, ScoreResult]]:
    """Validate a task message: the chunk of its valid items, and a result per bad item.

    Returns:
        The chunk holding the valid items (``None`` when none is valid), and an
        ``invalid`` result for each bad item, by position.

    Raises:
        MalformedChunkError: the message is not one chunk (wrong arguments, a bad or
            missing envelope field, no items list); the reason names the field.
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        raise MalformedChunkError(
            f"malformed chunk message: expected one chunk object as the only argument, got "
            f"{len(args)} positional ({', '.join(type(a).__name__ for a in args)}) and "
            f"{sorted(kwargs)} keyword argument(s)")
    payload = args[0]
    raw_items = payload.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise MalformedChunkError("malformed chunk message: field 'items': expected a "
                                  f"non-empty list, got {type(raw_items).__name__}")
    try:
        envelope = ScoreChunk.model_validate({**payload, "items": [_PLACEHOLDER_ITEM]})
    except ValidationError as exc:
        problems = "; ".join(f"field {'.'.join(str(p) for p in e['loc'])!r}: {e['msg']}"
                             for e in exc.errors())
        raise MalformedChunkError(f"malformed chunk message: {problems}") from None
    valid: list[ScoreItem] = []
    invalid: dict[int, ScoreResult] = {}
    for position, raw in enumerate(raw_items):
        try:
            valid.extend(parse_items([raw], label=f"item {position}".format))
        except InvalidItemError as exc:
            invalid[position] = ScoreResult.failure(_item_id(raw, position),
                                                    ResultStatus.INVALID, str(exc))
    chunk = envelope.model_copy(update={"items": valid}) if valid else None
    return chunk, invalid


def item_letters(payload: dict[str, Any], results: list[ScoreResult],
                 chunk: ScoreChunk | None, task_id: str | None, worker: str | None,
                 received: float) -> list[DeadLetter]:
    """One dead letter per item of the chunk message that ended ``failed`` or ``invalid``."""
    now = time.time()
    letters = []
    for position, (raw, result) in enumerate(zip(payload["items"], results, strict=True)):
        if result.status not in (ResultStatus.FAILED, ResultStatus.INVALID):
            continue
        letters.append(DeadLetter(
            id=f"{task_id}.{position}", kind=LetterKind.ITEM, reason=result.status.value,
            error=result.error or "", attempts=result.attempts,
            job_id=chunk.job_id if chunk else _str_or_none(payload.get("job_id")),
            chunk_index=chunk.chunk_index if chunk else None, position=position,
            item_id=result.id, step=chunk.step if chunk else None, task_id=task_id,
            worker=worker, payload=raw,
            spec=chunk.spec.model_dump(mode="json") if chunk else payload.get("spec"),
            received_at=received, failed_at=now))
    return letters


def with_outage_retries(operation: Callable[[], T], patience_s: float,
                        deadline: float | None = None) -> T:
    """``operation()``, retried with backoff while Redis is unreachable.

    Args:
        operation: what to run (again); must be safe to repeat.
        patience_s: how long one outage may last before giving up.
        deadline: unix time after which nobody wants the answer any more.

    Raises:
        redis.ConnectionError, redis.TimeoutError: Redis still away after ``patience_s``
            (or at ``deadline``).
    """
    attempt = 0
    give_up = None
    while True:
        try:
            return operation()
        except OUTAGE_ERRORS as exc:
            attempt += 1
            now = time.time()
            give_up = give_up or now + patience_s
            delay = outage_delay(attempt)
            if now + delay >= min(give_up, deadline or give_up):
                raise
            log.warning("Redis unavailable (%s); retrying in %.2fs (attempt %d)",
                        exc, delay, attempt)
            gevent.sleep(delay)


class ChunkLeases:
    """Leases on chunks: live workers keep theirs, a dead worker's go back to the queue.

    The Redis transport hands an unacked message out again once its delivery time in
    ``unacked_index`` is older than the visibility timeout (``Settings.chunk_lease_s``).
    Every third of a lease this

    - bumps that time for every message this worker has reserved or is running
      (``ZADD XX``: a message acked meanwhile is not re-added), so a slow chunk is never
      handed out twice;
    - runs kombu's own restore of lapsed messages. Kombu only does that on an idle poll
      of its synchronous loop, which the gevent pool never reaches while a BRPOP is
      pending (measured: a SIGKILLed worker's chunks stayed unacked for good).

    A killed worker stops bumping, so its chunks return to the queue one lease later.

    Args:
        app: the worker's Celery app (its broker and transport options).
        settings: the lease length and the broker URL.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        url = settings.celery_broker_url or settings.broker_url
        self.enabled = url.startswith(("redis://", "rediss://", "unix://"))
        options = app.conf.broker_transport_options or {}
        self._app = app
        self._index = chunk_lease_key(options)
        self._period_s = settings.chunk_lease_s / 3
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5) \
            if self.enabled else None
        self._connection: Any = None

    def renew(self) -> int:
        """Renew the lease of every message held now; returns how many were renewed."""
        tags = [request.message.delivery_tag
                for request in list(worker_state.requests.values())
                if getattr(request, "message", None) is not None]
        if not tags or self._redis is None:
            return 0
        now = time.time()
        renewed = self._redis.zadd(self._index, dict.fromkeys(tags, now), xx=True, ch=True)
        return int(renewed or 0)

    def restore_lapsed(self) -> None:
        """Put messages whose lease lapsed back on their queue (kombu's restore)."""
        if self._connection is None:
            self._connection = self._app.connection_for_read()
        try:
            self._connection.default_channel.qos.restore_visible(num=None, interval=1)
        except Exception:
            self._connection.release()
            self._connection = None
            raise

    def run_forever(self) -> None:
        """Renew and restore every third of a lease until the process ends."""
        while True:
            gevent.sleep(self._period_s)
            try:
                self.renew()
                self.restore_lapsed()
            except Exception as exc:  # Redis away: the next round tries again
                log.warning("could not renew or restore chunk leases: %s", exc)


class _LazyDeadLetters:
    """``DeadLetters`` built on first use, inside the worker process (after gevent)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._letters: DeadLetters | None = None

    def get(self) -> DeadLetters:
        if self._letters is None:
            self._letters = DeadLetters.from_settings(self._settings)
        return self._letters


def _record_rejected(letters: _LazyDeadLetters, message: Any, reason: str, error: str,
                     task_id: str | None) -> None:
    """Dead-letter a message the worker could not even hand to a task."""
    try:
        body = message.payload if message is not None else None
    except Exception as exc:  # an undecodable body: keep what can be said about it
        body = f"<undecodable body: {exc}>"
    args = body[0] if isinstance(body, list | tuple) and body else body
    _record_quietly(letters, DeadLetter(
        id=task_id or f"message-{time.time_ns()}", kind=LetterKind.CHUNK, reason=reason,
        error=error, task_id=task_id, payload=args if isinstance(args, list) else [args],
        failed_at=time.time()))


def _record_quietly(letters: _LazyDeadLetters, letter: DeadLetter) -> None:
    """Record ``letter`` if Redis lets us; a failure is logged, never raised."""
    try:
        letters.get().record([letter])
    except Exception:  # never let a bad message take the consumer down
        log.exception("could not record dead letter %s: %s", letter.id, letter.error)


def _item_id(raw: object, position: int) -> str:
    item_id = raw.get("id") if isinstance(raw, dict) else None
    return item_id if isinstance(item_id, str) and item_id else f"<item {position}>"


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def start_watchdog(runtime: WorkerRuntime, grace_s: float = 3.0) -> None:
    """Finish the process once running tasks are done and acked.

    Celery's gevent pool can hang for ever while closing the broker connection on warm
    shutdown (celery/celery#6111). By then every task has finished and been acked (late
    acks), so after a grace period this native thread closes our clients and exits.
    Nothing is lost: an unacked message is redelivered after the visibility timeout.
    """
    start_new_thread = monkey.get_original("_thread", "start_new_thread")
    sleep = monkey.get_original("time", "sleep")

    def watch() -> None:
        while worker_state.active_requests:
            sleep(0.1)
        sleep(grace_s)
        runtime.close()
        log.info("worker stopped after its running tasks finished")
        logging.shutdown()
        os._exit(0)

    start_new_thread(watch, ())
