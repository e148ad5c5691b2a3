"""The Celery task that scores a chunk, registered on the app ``rewardq.broker.app`` builds.

What the task guarantees, whatever arrives on the queue:

- A message that is not a chunk (wrong arguments, missing fields, an unknown task name)
  is dead-lettered with its reason and fails alone; the worker goes on.
- A bad item inside a good chunk becomes an ``invalid`` result naming its field; the
  other items are scored.
- Items that fail for good (``failed``, ``invalid``, ``budget_exceeded``) are
  dead-lettered, one pipeline per chunk, before the chunk's results are stored; in the
  same round trip, the chunk's ``ok`` verdicts clear the ``failed`` and
  ``budget_exceeded`` letters of the same work (``rewardq.workers.dead_lettering``).
- A Redis outage inside a chunk does not fail its items, wherever it hits (cache,
  in-flight locks, rate limiter, dead letters): the chunk is scored again in place after
  a backoff (finished items come from the cache) until ``Settings.redis_retry_s`` or the
  chunk's deadline runs out (``rewardq.broker.connections.with_outage_retries``). In place, not
  with ``Task.retry``: re-publishing needs the very broker that is away.
- A worker that dies mid-chunk loses nothing: the message stays unacked (late acks) and
  the Redis transport hands it to another worker once its lease lapses
  (``rewardq.workers.leases``).

Everything else a worker does around its tasks is a hook (``rewardq.workers.hooks``): dead
letters, metrics, chunk leases, heartbeat, the shutdown watchdog.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from celery import Celery, Task
from celery.signals import after_setup_logger
from pydantic import ValidationError

from rewardq.broker.app import TASK_SCORE_CHUNK, create_app
from rewardq.broker.connections import redis_client, with_outage_retries
from rewardq.broker.errors import InvalidItemError
from rewardq.broker.jobs import announce_chunk_done, chunk_result
from rewardq.broker.schemas import ResultStatus, ScoreChunk, ScoreItem, ScoreResult, parse_items
from rewardq.broker.settings import Settings
from rewardq.workers.dead_lettering import DeadLetterHook
from rewardq.workers.heartbeat import HeartbeatHook
from rewardq.workers.hooks import ChunkRun, MetricsHook, WorkerHooks
from rewardq.workers.intake import ChunkIntake
from rewardq.workers.leases import ChunkLeases
from rewardq.workers.logs import quiet_http_clients, use_json_format
from rewardq.workers.runtime import WorkerRuntime
from rewardq.workers.watchdog import ShutdownWatchdog

_PLACEHOLDER_ITEM = {"id": "-", "prompt": "-", "response": "-"}


class MalformedChunkError(ValueError):
    """A queue message that is not a valid ``ScoreChunk``; its items cannot be scored."""


def create_worker_app(settings: Settings) -> Celery:
    """The Celery app with the scoring task and the worker hooks, for one process."""
    app = create_app(settings)
    quiet_http_clients()
    if settings.log_format == "json":
        after_setup_logger.connect(_json_logs, weak=False)
    runtime = WorkerRuntime(settings)
    heartbeat = HeartbeatHook(settings)
    hooks = WorkerHooks([
        DeadLetterHook(settings, runtime.metrics),  # first: letters land before counts
        MetricsHook(runtime.metrics, settings.metrics_port,
                    fleet=redis_client(settings) if settings.metrics_port is not None
                    else None, host=settings.metrics_host),
        ChunkLeases(app, settings),
        heartbeat,
        # Last: the others have stopped when it exits (a warm stop, once the beat is gone).
        ShutdownWatchdog(runtime.close, settled=heartbeat.settled),
    ], patience_s=settings.redis_retry_s)
    hooks.connect_signals()
    app.steps["consumer"].add(ChunkIntake.for_slots(settings.max_concurrent_requests))
    announcer = redis_client(settings)

    def after_return(task: Task[Any, Any], status: str, retval: Any, task_id: str,
                     *_: Any) -> None:
        """Celery calls this once the result is stored: wake the producer waiting for it
        (a failure here is logged by Celery; the producer's next poll finds the result)."""
        announce_chunk_done(announcer, task_id)

    @app.task(name=TASK_SCORE_CHUNK, bind=True,  # type: ignore[untyped-decorator]
              throws=(MalformedChunkError,), after_return=after_return)
    def score_chunk(self: Task[Any, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Score one chunk; returns ``rewardq.broker.jobs.chunk_result``: the items per status and
        one result JSON per item, in order."""
        run = ChunkRun(self.request.id, self.request.hostname, list(args), time.time())
        results = score_message(runtime, hooks, run, kwargs, settings.redis_retry_s)
        return chunk_result([r.model_dump(mode="json") for r in results])

    return app


def _json_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    if logger is not None:
        use_json_format(logger)


def score_message(runtime: WorkerRuntime, hooks: WorkerHooks, run: ChunkRun,
                  kwargs: dict[str, Any], patience_s: float) -> list[ScoreResult]:
    """One result per item of the task message ``run``, in order; hooks run around it.

    Raises:
        MalformedChunkError: the message is not a chunk (dead-lettered as such).
        rewardq.broker.connections.OUTAGE_ERRORS: Redis stayed away longer than ``patience_s``.
        TimeoutError: the chunk outlived its deadline.
    """
    try:
        chunk, invalid = parse_chunk_message(tuple(run.args), kwargs)
    except MalformedChunkError as exc:
        hooks.chunk_failed(run, "malformed", exc)
        raise
    run = run.parsed(chunk)
    scored: list[ScoreResult] = []
    if chunk is not None:
        budget = max(1.0, chunk.deadline - time.time())
        try:
            # The gevent pool has no soft time limit: the bridge's wait is the limit.
            scored = with_outage_retries(
                lambda: runtime.score(chunk, timeout_s=budget + 5.0), patience_s,
                deadline=chunk.deadline, sleep=gevent.sleep)
        except Exception as exc:  # the chunk as a whole: Redis gone for good, a bug
            hooks.chunk_failed(run, "failed", exc)
            raise
    valid = iter(scored)
    results = [invalid[i] if i in invalid else next(valid)
               for i in range(len(run.args[0]["items"]))]
    hooks.chunk_done(run, results)
    return results


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
    try:  # the common case, every item valid: one validation pass
        return envelope.model_copy(update={"items": parse_items(raw_items)}), {}
    except InvalidItemError:
        pass  # item by item below, so that each bad one gets its own result
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


def _item_id(raw: object, position: int) -> str:
    item_id = raw.get("id") if isinstance(raw, dict) else None
    return item_id if isinstance(item_id, str) and item_id else f"<item {position}>"
