"""The dead-letter hook: what a worker could not score is kept in Redis, replayable.

- Items that end ``failed``, ``invalid`` or ``budget_exceeded`` become item letters, one
  MULTI pipeline per chunk, before the chunk's results are stored (a Redis outage holds
  the chunk: the hooks retry it, ``rewardq.workers.hooks``). A ``budget_exceeded`` item was never
  judged: ``rewardq failed replay`` scores it once the budget is raised.
- A chunk that fails as a whole (a malformed message, or Redis gone for good) becomes a
  chunk letter holding the task's arguments.
- A message no task can take (unknown task name, not a task message) becomes a chunk
  letter too; recording it is best effort, so a bad message never takes the consumer down.
- A letter is cleared once the same work gets a verdict: ``failed`` and
  ``budget_exceeded`` item letters carry the judge fingerprint of the item as the worker
  received it, and each chunk's ``ok`` results clear the letters of their fingerprints,
  in the same Redis round trip as the chunk's own letters (none for a chunk with neither).
  Without letters of its own, a chunk clears best effort: a full or unreachable Redis
  never holds its results for housekeeping.
  An ``invalid`` letter is never cleared this way: the item (or its group) is what is
  wrong, so the same work cannot succeed later; it waits for a replay or a purge.

The registry and its schema live in ``rewardq.broker.dead_letters``; this module only decides
what becomes a letter and which letters a chunk's verdicts clear. Every letter recorded,
and every letter cleared, is counted in the worker's metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis

from rewardq.broker.dead_letters import DeadLetter, DeadLetters, LetterKind
from rewardq.broker.errors import InvalidItemError
from rewardq.broker.keys import judge_fingerprints
from rewardq.broker.schemas import ResultStatus, ScoreChunk, ScoreItem, ScoreResult, parse_items
from rewardq.broker.settings import Settings
from rewardq.monitoring.metrics import WorkerMetrics
from rewardq.workers.hooks import ChunkRun, DroppedMessage, WorkerHook

log = logging.getLogger(__name__)

#: Item statuses that become dead letters.
LETTERED = frozenset({ResultStatus.FAILED, ResultStatus.INVALID,
                      ResultStatus.BUDGET_EXCEEDED})
#: Lettered statuses that a later verdict for the same work supersedes: the work itself
#: was fine, the judge or the budget was not. ``invalid`` is about the item itself.
SUPERSEDED = frozenset({ResultStatus.FAILED, ResultStatus.BUDGET_EXCEEDED})


class DeadLetterHook(WorkerHook):
    """Records dead letters for what a worker could not score.

    Args:
        settings: the Redis to record in and the letters' retention.
        metrics: counts every letter recorded, by kind, and every letter cleared.
    """

    def __init__(self, settings: Settings, metrics: WorkerMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._letters: DeadLetters | None = None

    @property
    def letters(self) -> DeadLetters:
        """The registry, built on first use (inside the worker process, after gevent)."""
        if self._letters is None:
            self._letters = DeadLetters.from_settings(self._settings)
        return self._letters

    def chunk_done(self, run: ChunkRun, results: Sequence[ScoreResult]) -> None:
        fingerprints = item_fingerprints(run, results)
        letters = item_letters(run, results, fingerprints)
        succeeded = [fp for fp, result in zip(fingerprints, results, strict=True)
                     if fp is not None and result.status is ResultStatus.OK]
        if letters:  # what failed must be kept: retried through outages like the results
            cleared = self.letters.settle(letters, succeeded)
        else:
            cleared = self._clear(run, succeeded)
        self._count(letters)
        if cleared:
            log.info("cleared %d dead letter(s): the same work got a verdict in chunk %s",
                     cleared, run.task_id)
            self._metrics.dead_letters_cleared(cleared)

    def _clear(self, run: ChunkRun, succeeded: Sequence[str]) -> int:
        """Clear the letters of work that now has a verdict, best effort: clearing is
        housekeeping, so a chunk's results never wait for it (a full or unreachable
        Redis); the letters stay until a later verdict, a replay, a purge or their TTL."""
        if not succeeded:
            return 0
        try:
            return self.letters.settle((), succeeded)
        except redis.RedisError as exc:
            log.debug("chunk %s: dead letters of its verdicts not cleared: %s",
                      run.task_id, exc)
            return 0

    def chunk_failed(self, run: ChunkRun, reason: str, error: BaseException) -> None:
        chunk = run.chunk
        message = str(error) if reason == "malformed" else f"{type(error).__name__}: {error}"
        self._record([DeadLetter(
            id=run.task_id or f"unknown-{time.time_ns()}", kind=LetterKind.CHUNK,
            reason=reason, error=message, job_id=chunk.job_id if chunk else None,
            chunk_index=chunk.chunk_index if chunk else None,
            step=chunk.step if chunk else None, task_id=run.task_id, worker=run.worker,
            payload=run.args, received_at=run.received_at, failed_at=time.time())])

    def message_dropped(self, message: DroppedMessage) -> None:
        self._record([DeadLetter(
            id=message.task_id or f"message-{time.time_ns()}", kind=LetterKind.CHUNK,
            reason=message.reason, error=message.error, task_id=message.task_id,
            payload=message.args, failed_at=time.time())])

    def worker_stopped(self) -> None:
        if self._letters is not None:
            self._letters.close()
            self._letters = None

    def _record(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        self.letters.record(letters)
        self._count(letters)

    def _count(self, letters: Sequence[DeadLetter]) -> None:
        for letter in letters:
            self._metrics.dead_letter(letter.kind.value)


def item_fingerprints(run: ChunkRun, results: Sequence[ScoreResult]) -> list[str | None]:
    """The judge fingerprint of each item of ``run``'s message whose result is ``ok`` or
    a :data:`SUPERSEDED` status, in order; ``None`` for the others.

    Computed from the items as the worker received them (``run.chunk``), the same
    whether the item arrived in a trainer's chunk, a gateway's re-send or a replay.
    """
    items = received_items(run, results)
    wanted = [(position, item) for position, (item, result) in enumerate(
        zip(items, results, strict=True))
        if item is not None and (result.status is ResultStatus.OK
                                 or result.status in SUPERSEDED)]
    fingerprints: list[str | None] = [None] * len(results)
    if wanted and run.chunk is not None:
        found = judge_fingerprints(run.chunk.spec, (item for _, item in wanted))
        for (position, _), fingerprint in zip(wanted, found, strict=True):
            fingerprints[position] = fingerprint
    return fingerprints


def received_items(run: ChunkRun, results: Sequence[ScoreResult]) -> list[ScoreItem | None]:
    """The parsed item behind each result of ``run``'s message, in order; ``None`` where
    the raw item did not parse (its result is the ``invalid`` one the task made).

    ``run.chunk`` holds the valid items only. When some are missing, an ``invalid``
    result may be a bad item or one the scorer judged invalid (group judging), so those
    raw items are parsed again to tell them apart: rare, and cheap for one item.
    """
    chunk = run.chunk
    if chunk is None:
        return [None] * len(results)
    if len(chunk.items) == len(results):
        return list(chunk.items)
    parsed = iter(chunk.items)
    raws = run.args[0]["items"]
    return [next(parsed) if result.status is not ResultStatus.INVALID or _parses(raw)
            else None for raw, result in zip(raws, results, strict=True)]


def _parses(raw: object) -> bool:
    try:
        parse_items([raw])
    except InvalidItemError:
        return False
    return True


def item_letters(run: ChunkRun, results: Sequence[ScoreResult],
                 fingerprints: Sequence[str | None] | None = None) -> list[DeadLetter]:
    """One letter per item of ``run``'s message that ended in a :data:`LETTERED` status.

    Args:
        run: the chunk task (its message's items in ``args[0]["items"]``).
        results: one result per item of the message, in order.
        fingerprints: one per item (``item_fingerprints``): a :data:`SUPERSEDED` letter
            carries its item's, so that a later verdict for that work clears it.
    """
    payload: dict[str, Any] = run.args[0]
    chunk: ScoreChunk | None = run.chunk
    fingerprints = fingerprints or [None] * len(results)
    now = time.time()
    letters = []
    for position, (raw, result, fingerprint) in enumerate(
            zip(payload["items"], results, fingerprints, strict=True)):
        if result.status not in LETTERED:
            continue
        job_id = payload.get("job_id")
        letters.append(DeadLetter(
            id=f"{run.task_id}.{position}", kind=LetterKind.ITEM, reason=result.status.value,
            error=result.error or "", attempts=result.attempts,
            job_id=chunk.job_id if chunk else job_id if isinstance(job_id, str) else None,
            chunk_index=chunk.chunk_index if chunk else None, position=position,
            item_id=result.id, step=chunk.step if chunk else None, task_id=run.task_id,
            worker=run.worker, payload=raw,
            spec=chunk.spec.model_dump(mode="json") if chunk else payload.get("spec"),
            fingerprint=fingerprint if result.status in SUPERSEDED else None,
            received_at=run.received_at, failed_at=now))
    return letters
